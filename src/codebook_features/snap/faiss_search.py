"""The ``faiss`` backend: FAISS's blocked brute-force search, one call per group."""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import _faiss, _sync_faiss_threads
from .scores import SearchResult, Workspace, _scratch, _unit_keys


def _search_faiss(x: Tensor, codebook: Tensor, k: int, similarity: str,
                  ws: Workspace | None = None) -> SearchResult:
    """Exact search by FAISS's blocked brute force, one call per group (CPU float32)."""
    faiss = _faiss()
    if faiss is None:
        raise RuntimeError("search backend 'faiss' needs the faiss package (faiss-cpu)")
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"search backend 'faiss' needs float32 CPU inputs, got {x.dtype} on "
                         f"{x.device}; use backend 'torch' or 'auto'")
    _sync_faiss_threads(faiss)
    n, g, dg = x.shape
    num_codes = codebook.shape[1]
    keys = (_unit_keys(codebook, ws) if similarity == "cosine" else codebook).contiguous()
    if g == 1:
        xt = x.reshape(n, dg).contiguous().view(1, n, dg)
    else:
        xt = _scratch(ws, "xt", (g, n, dg), x)
        xt.copy_(x.transpose(0, 1))
    dist = torch.empty(g, n, k, dtype=torch.float32)
    labels = torch.empty(g, n, k, dtype=torch.long)
    knn = faiss.knn_L2sqr if similarity == "euclidean" else faiss.knn_inner_product
    ptr = faiss.swig_ptr
    if n:
        for i in range(g):  # one C++ call per group; all the work is inside FAISS
            knn(ptr(xt[i].numpy()), ptr(keys[i].numpy()), dg, n, num_codes, k,
                ptr(dist[i].numpy()), ptr(labels[i].numpy()))
    codes = labels.transpose(0, 1).contiguous()
    scores = dist.transpose(0, 1)
    if similarity == "cosine":
        scores = scores / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    elif similarity == "euclidean":
        scores = scores.neg()
    return SearchResult(codes, scores.contiguous())
