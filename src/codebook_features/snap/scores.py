"""What a search matches and returns: the keys and bias that rank codes like the similarity,
true similarities from ranking scores, token chunks of bounded score blocks, the result
tuple and a layer's reusable scratch buffers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

SIMILARITIES = ("cosine", "inner", "euclidean")


class SearchResult(NamedTuple):
    """Top-k codes per token and group, best first."""

    codes: Tensor  # (N, G, k) int64
    scores: Tensor  # (N, G, k) similarity of each chosen code (cosine, inner, or -squared dist)


class Workspace:
    """Reusable scratch buffers of one layer's search (normalised keys, score blocks, a
    transposed copy of the inputs), so that a step does not page-fault fresh multi-MiB
    allocations. Buffers only grow; contents never outlive one search.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A contiguous uninitialised ``shape`` tensor with ``like``'s dtype and device."""
        numel = 1
        for s in shape:
            numel *= s
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or \
                buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:numel].view(shape)


def _scratch(ws: Workspace | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if ws is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return ws.get(name, shape, like)


def _unit_keys(codebook: Tensor, ws: Workspace | None) -> Tensor:
    """``F.normalize(codebook, dim=-1)``, written into the workspace when there is one."""
    norms = torch.linalg.vector_norm(codebook, dim=-1, keepdim=True).clamp_min_(1e-12)
    return torch.div(codebook, norms, out=_scratch(ws, "keys", tuple(codebook.shape), codebook))


def search_keys(codebook: Tensor, similarity: str, ws: Workspace | None = None,
                ) -> tuple[Tensor, Tensor | None]:
    """What inputs are matched against: keys ``(G, C, dg)`` and an optional bias ``(G, C)``.

    Ranking by ``x . key + bias`` equals ranking by the similarity: cosine needs only unit
    codes (``|x|`` does not change a row's ranking, so the input is never normalised);
    Euclidean ranks by ``x . c - |c|^2 / 2``.
    """
    if similarity == "cosine":
        return _unit_keys(codebook, ws), None
    if similarity == "inner":
        return codebook, None
    if similarity == "euclidean":
        return codebook, -0.5 * codebook.pow(2).sum(-1)
    raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}")


def default_chunk(n_tokens: int, groups: int, num_codes: int, chunk_mib: float,
                  itemsize: int = 4) -> int:
    """Tokens per chunk so that one score block ``(G, chunk, C)`` fits ``chunk_mib``."""
    rows = int(chunk_mib * 2**20 / (itemsize * groups * num_codes))
    return max(1, min(n_tokens, rows))


def _finish_scores(scores: Tensor, x: Tensor, similarity: str, norms: Tensor | None = None,
                   ) -> Tensor:
    """Turn ranking scores ``x . key + bias`` ``(N, G, k)`` into true similarities (``norms``:
    ``|x|`` ``(N, G)`` when already known)."""
    if similarity == "cosine":
        xn = x.norm(dim=-1) if norms is None else norms
        return scores / xn.unsqueeze(-1).clamp_min(1e-12)
    if similarity == "euclidean":
        sq = x.pow(2).sum(-1) if norms is None else norms.square()
        return 2 * scores - sq.unsqueeze(-1)
    return scores


def _score_blocks(xt: Tensor, keys_t: Tensor, bias3: Tensor | None, rows: int, buf: Tensor,
                  ) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, end, scores)`` for token chunks of ``rows``: ``scores`` ``(G, end - start, C)``
    is ``xt[:, start:end] @ keys_t (+ bias3)``, written into the reused ``buf``."""
    g, n, _ = xt.shape
    num_codes = keys_t.shape[-1]
    for start in range(0, n, rows):
        end = min(n, start + rows)
        s = buf[: g * (end - start) * num_codes].view(g, end - start, num_codes)
        if bias3 is None:
            torch.bmm(xt[:, start:end], keys_t, out=s)
        else:
            torch.baddbmm(bias3, xt[:, start:end], keys_t, out=s)
        yield start, end, s


def _inv_norms(codebook: Tensor, similarity: str) -> Tensor | None:
    if similarity != "cosine":
        return None
    return 1 / torch.linalg.vector_norm(codebook, dim=-1).clamp_min(1e-12)


def _bias(codebook: Tensor, similarity: str) -> Tensor | None:
    return search_keys(codebook, similarity)[1] if similarity == "euclidean" else None
