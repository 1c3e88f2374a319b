"""The ``torch_bf16`` backend (approximate): a bfloat16 similarity, then an exact re-rank of
a shortlist per token."""

from __future__ import annotations

import torch
from torch import Tensor

from .scores import SearchResult, _finish_scores
from .torch_search import _rerank, _search_torch


def shortlist_size(k: int) -> int:
    """Codes per token re-ranked exactly after a bfloat16 similarity (``torch_bf16``)."""
    return max(2 * k, k + 8)


def _search_bf16(x: Tensor, keys: Tensor, bias: Tensor | None, k: int, similarity: str,
                 chunk_mib: float) -> SearchResult:
    """Approximate: bfloat16 similarity, then an exact re-rank of a shortlist per token."""
    num_codes = keys.shape[1]
    m = min(num_codes, shortlist_size(k))
    short, _ = _search_torch(x.to(torch.bfloat16), keys.to(torch.bfloat16),
                             None if bias is None else bias.to(torch.bfloat16), m, chunk_mib)
    codes, scores = _rerank(x, keys, bias, short, k, chunk_mib)
    return SearchResult(codes, _finish_scores(scores, x, similarity))
