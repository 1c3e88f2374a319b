"""The ``torch`` backend: exact chunked top-k on any device and dtype, with the exact
re-rank of a shortlist and the scaled-score search the screens fall back to."""

from __future__ import annotations

import torch
from torch import Tensor

from .scores import Workspace, _score_blocks, _scratch, default_chunk
from .topk import block_size, topk_last


def _search_torch(x: Tensor, keys: Tensor, bias: Tensor | None, k: int, chunk_mib: float,
                  ws: Workspace | None = None) -> tuple[Tensor, Tensor]:
    """Exact chunked top-k of ``x . key + bias``: codes and ranking scores ``(N, G, k)``."""
    n, g, dg = x.shape
    num_codes = keys.shape[1]
    keys_t = keys.transpose(1, 2)  # (G, dg, C)
    xt = x.transpose(0, 1)  # (G, N, dg)
    chunk = default_chunk(n, g, num_codes, chunk_mib, x.element_size())
    bs = block_size(num_codes, k)
    codes = torch.empty(g, n, k, dtype=torch.long, device=x.device)
    scores = torch.empty(g, n, k, dtype=x.dtype, device=x.device)
    buf = _scratch(ws, "scores", (g * chunk * num_codes,), x)
    bias3 = None if bias is None else bias.unsqueeze(1)
    for start, end, s in _score_blocks(xt, keys_t, bias3, chunk, buf):
        v, i = topk_last(s, k, bs)
        scores[:, start:end] = v
        codes[:, start:end] = i
    return codes.transpose(0, 1).contiguous(), scores.transpose(0, 1).contiguous()


def _rerank(x: Tensor, keys: Tensor, bias: Tensor | None, short: Tensor, k: int,
            chunk_mib: float, ws: Workspace | None = None) -> tuple[Tensor, Tensor]:
    """The exact top k of each token's shortlisted codes ``short`` ``(N, G, m)``: codes and
    ranking scores ``x . key + bias`` ``(N, G, k)``. Key rows are gathered in chunks into a
    reused buffer (fresh multi-MiB gathers page-fault)."""
    n, g, dg = x.shape
    m = short.shape[-1]
    offsets = torch.arange(g, device=x.device).view(1, g, 1) * keys.shape[1]
    flat = (short + offsets).reshape(n * g * m)
    book = keys.reshape(-1, dg)
    exact = torch.empty(n * g, m, dtype=x.dtype, device=x.device)
    xf = x.reshape(n * g, dg, 1)
    step = max(1, min(n * g, int(chunk_mib / 8 * 2**20 / (m * dg * x.element_size()))))
    rows = _scratch(ws, "shortlist_keys", (step * m, dg), x)
    for start in range(0, n * g, step):
        end = min(n * g, start + step)
        got = torch.index_select(book, 0, flat[start * m:end * m], out=rows[: (end - start) * m])
        torch.bmm(got.view(end - start, m, dg), xf[start:end],
                  out=exact[start:end].unsqueeze(-1))
    exact = exact.view(n, g, m)
    if bias is not None:
        exact += bias.reshape(-1)[flat].view(n, g, m)
    v, j = exact.topk(k, -1) if k > 1 else exact.max(-1, keepdim=True)
    return short.gather(-1, j), v


def _search_scaled(x: Tensor, book: Tensor, scale: Tensor | None, bias: Tensor | None, k: int,
                   chunk_mib: float) -> tuple[Tensor, Tensor]:
    """Exact top-k of ``(x . code) * scale + bias`` (float32): codes and ranking scores
    ``(N, G, k)``, one group and token chunk at a time. The screen's fallback for tokens it
    cannot certify (no unit-key copy of the codebook)."""
    n, g, dg = x.shape
    num_codes = book.shape[1]
    codes = torch.empty(n, g, k, dtype=torch.long)
    scores = torch.empty(n, g, k, dtype=x.dtype)
    rows = default_chunk(n, 1, num_codes, chunk_mib)
    buf = torch.empty(min(n, rows) * num_codes, dtype=x.dtype)
    bs = block_size(num_codes, k)
    for gi in range(g):
        for start in range(0, n, rows):
            end = min(n, start + rows)
            s = torch.mm(x[start:end, gi], book[gi].t(), out=buf[: (end - start) * num_codes]
                         .view(end - start, num_codes))
            if scale is not None:
                s.mul_(scale[gi])
            if bias is not None:
                s.add_(bias[gi])
            scores[start:end, gi], codes[start:end, gi] = topk_last(s, k, bs)
    return codes, scores
