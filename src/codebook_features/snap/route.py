""":func:`search`: top-k codes of every token in every group, by the backend
:func:`~.backends.resolve_backend` picks."""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import resolve_backend
from .faiss_search import _search_faiss
from .scores import SearchResult, Workspace, _finish_scores, search_keys
from .screen import _search_screened
from .screen_kernel import _screen_kernel_ok, _search_screened_kernel
from .torch_bf16 import _search_bf16
from .torch_search import _search_torch


@torch.no_grad()
def search(x: Tensor, codebook: Tensor, k: int, similarity: str = "cosine",
           chunk_mib: float = 16.0, backend: str = "auto", workspace: Workspace | None = None,
           ) -> SearchResult:
    """Top-k codes of every token in every group; exact except for ``torch_bf16``.

    Extra memory is bounded: one ``(G, chunk, C)`` score block of ``chunk_mib`` (torch) or
    FAISS's fixed query x database block (faiss), never ``N x C``. Scores are true
    similarities: cosine (``x . c / |x||c|``), inner product, or negative squared Euclidean
    distance. See the module docstring for the backends. ``workspace`` (one per layer) keeps
    the scratch buffers between calls.
    """
    backend = resolve_backend(backend, x, codebook)
    if backend == "faiss":
        return _search_faiss(x, codebook, k, similarity, workspace)
    if backend == "bf16_screen" and _screen_kernel_ok(x, codebook):
        codes, scores, norms = _search_screened_kernel(x, codebook, k, similarity, chunk_mib,
                                                       workspace)
        return SearchResult(codes, _finish_scores(scores, x, similarity, norms))
    keys, bias = search_keys(codebook, similarity, workspace)
    if backend == "torch_bf16":
        return _search_bf16(x, keys, bias, k, similarity, chunk_mib)
    if backend == "bf16_screen":
        codes, scores = _search_screened(x, keys, bias, k, similarity, chunk_mib, workspace)
    else:
        codes, scores = _search_torch(x, keys, bias, k, chunk_mib, workspace)
    return SearchResult(codes, _finish_scores(scores, x, similarity))
