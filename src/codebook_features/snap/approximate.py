"""Approximate inference search: FAISS HNSW or IVF indexes, one per group, rebuilt when the
codebook changes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import _faiss, _sync_faiss_threads
from .route import search
from .scores import SearchResult

APPROXIMATE_KINDS = ("hnsw", "ivf")


class ApproximateIndex:
    """Approximate search (FAISS HNSW or IVF, one index per group) for inference.

    The indexes are built on the codebook's keys (unit codes for cosine) on first use and
    rebuilt whenever the codebook changes: any in-place update through the parameter (an
    optimizer step, ``load_state_dict``, dead-code replacement) bumps its version counter.
    Edits through ``.data`` bypass that counter: call :meth:`reset` after them.

    ``hnsw``: ``m`` links per node, ``ef_search`` (recall/speed), ``ef_construction``.
    ``ivf``: ``nlist`` lists (default ``sqrt(C)``, at most ``C // 39``), ``nprobe`` lists
    visited per query. Rows for which the index finds fewer than k codes fall back to exact.
    """

    def __init__(self, kind: str, similarity: str, *, m: int = 32, ef_search: int = 64,
                 ef_construction: int = 80, nlist: int | None = None, nprobe: int = 8) -> None:
        if kind not in APPROXIMATE_KINDS:
            raise ValueError(f"unknown approximate search {kind!r}; choose one of "
                             f"{APPROXIMATE_KINDS}")
        if _faiss() is None:
            raise RuntimeError("approximate search needs the faiss package (faiss-cpu)")
        self.kind, self.similarity = kind, similarity
        self.m, self.ef_search, self.ef_construction = m, ef_search, ef_construction
        self.nlist, self.nprobe = nlist, nprobe
        self._tag: tuple | None = None
        self._indexes: list[Any] = []

    def reset(self) -> None:
        """Forget the built indexes; the next search rebuilds them."""
        self._tag, self._indexes = None, []

    def _build(self, codebook: Tensor) -> None:
        faiss = _faiss()
        _sync_faiss_threads(faiss)
        g, c, dg = codebook.shape
        keys = (F.normalize(codebook, dim=-1, eps=1e-12) if self.similarity == "cosine"
                else codebook).detach().to("cpu", torch.float32).contiguous()
        metric = faiss.METRIC_L2 if self.similarity == "euclidean" else faiss.METRIC_INNER_PRODUCT
        self._indexes = []
        for i in range(g):
            data = keys[i].numpy()
            if self.kind == "hnsw":
                index = faiss.IndexHNSWFlat(dg, self.m, metric)
                index.hnsw.efConstruction = self.ef_construction
                index.hnsw.efSearch = self.ef_search
            else:
                nlist = self.nlist or max(1, min(int(c**0.5), c // 39))
                quantizer = (faiss.IndexFlatL2(dg) if self.similarity == "euclidean"
                             else faiss.IndexFlatIP(dg))
                index = faiss.IndexIVFFlat(quantizer, dg, nlist, metric)
                index.cp.seed = 1234 + i
                index.train(data)
                index.nprobe = min(self.nprobe, nlist)
            index.add(data)
            self._indexes.append(index)
        self._tag = _version_tag(codebook)

    @torch.no_grad()
    def search(self, x: Tensor, codebook: Tensor, k: int) -> SearchResult:
        """Approximate top-k of float32 CPU inputs ``(N, G, dg)``; true similarities."""
        if self._tag != _version_tag(codebook):
            self._build(codebook)
        _sync_faiss_threads(_faiss())
        n, g, dg = x.shape
        xt = x.transpose(0, 1).to(torch.float32).contiguous()
        dist = torch.empty(g, n, k, dtype=torch.float32)
        labels = torch.empty(g, n, k, dtype=torch.long)
        for i, index in enumerate(self._indexes):
            index.search(xt[i].numpy(), k, D=dist[i].numpy(), I=labels[i].numpy())
        codes = labels.transpose(0, 1).contiguous()
        scores = dist.transpose(0, 1)
        if self.similarity == "cosine":
            scores = scores / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        elif self.similarity == "euclidean":
            scores = scores.neg()
        scores = scores.contiguous()
        missing = (codes < 0).any(-1).any(-1)
        if bool(missing.any()):  # too few codes found (e.g. IVF lists too small): exact there
            exact = search(x[missing], codebook, k, self.similarity, backend="auto")
            codes[missing], scores[missing] = exact.codes, exact.scores.to(scores.dtype)
        return SearchResult(codes, scores)


def _version_tag(codebook: Tensor) -> tuple:
    """Identifies a codebook's contents: storage, shape and in-place version counter."""
    return (codebook.data_ptr(), tuple(codebook.shape), codebook._version)
