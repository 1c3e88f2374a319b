"""The ``bf16_screen`` backend without the compiled kernel: a certified bfloat16 screen in
torch (a fixed shortlist of ``2k + 4`` codes re-scored exactly, the rest bounded)."""

from __future__ import annotations

import torch
from torch import Tensor

from .scores import Workspace, _score_blocks, _scratch, default_chunk
from .topk import topk_last
from .torch_search import _rerank, _search_torch

_U = 2.0**-8  # bfloat16 unit roundoff (8 significant bits, round to nearest)
_U32 = 2.0**-24  # float32 unit roundoff


def screen_sizes(num_codes: int, k: int) -> tuple[int, int] | None:
    """``(shortlist, block_width)`` of the bfloat16 screen, or None where it cannot run (too
    few codes to split into blocks). The shortlist (``2k + 4`` codes) is sized so that the
    exact top k is certified for all but ~1% of tokens on random data (``benchmarks/snap.py``
    counts them)."""
    m = 2 * k + 4
    fits = [bs for bs in range(8, 257) if num_codes % bs == 0 and 4 * m * bs <= num_codes]
    return (m, min(fits, key=lambda bs: abs(bs - 100))) if fits else None


def _bf16_value(bits: Tensor) -> Tensor:
    """float32 values of bfloat16 bit patterns held as int32 (upper bound 0 for negatives:
    see :func:`_screen_chunk`)."""
    return (bits.clamp_min(0) << 16).view(torch.float32)


def _screen_chunk(s: Tensor, m: int, bs: int) -> tuple[Tensor, Tensor]:
    """The ``m`` best codes of one bfloat16 score block ``s`` ``(G, r, C)`` and ``bound``
    ``(G, r)`` float32: an upper bound on the score of every code left out.

    Block-max top-k (as :func:`topk_last`) on the bit patterns as int16: non-negative bfloat16
    values order like their bits and every negative value's bits are below every non-negative
    one's, so the shortlist is exact among codes scoring >= 0, and a negative bound (every
    left-out code scores < 0) is raised to 0. Integer ``amax`` is several times faster than
    bfloat16's.
    """
    v, i = topk_last(s.view(torch.int16), m, bs)
    return i, _bf16_value(v[..., -1].int())


def _search_screened(x: Tensor, keys: Tensor, bias: Tensor | None, k: int, similarity: str,
                     chunk_mib: float, ws: Workspace | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k with a bfloat16 screen: a bfloat16 ``bmm`` ranks every code, a shortlist is
    re-scored exactly, and a rigorous error bound certifies per token that no code left out can
    beat the k-th exact score; tokens it cannot certify are searched exactly again.

    Bound: with ``x~``, ``c~`` the bfloat16 roundings, ``|x.c - x~.c~| <= |x - x~| max|c| +
    |x~| max|c - c~|``, plus float32 accumulation (``dg`` ulps of ``|x~| max|c~|``, for the
    screen and the re-score alike) and the bfloat16 rounding of each score (relative ``2^-8``;
    and of the bias, for Euclidean).
    """
    n, g, dg = x.shape
    num_codes = keys.shape[1]
    sizes = screen_sizes(num_codes, k)
    if sizes is None or n == 0:
        return _search_torch(x, keys, bias, k, chunk_mib, ws)
    m, bs = sizes
    xb = x.to(torch.bfloat16)
    kb = keys.to(torch.bfloat16)
    kbt = _scratch(ws, "kbt", (g, dg, num_codes), kb)  # contiguous: 2-3x faster bmm
    kbt.copy_(kb.transpose(1, 2))
    xbt = _scratch(ws, "xbt", (g, n, dg), xb)
    xbt.copy_(xb.transpose(0, 1))
    bias_b = None if bias is None else bias.to(torch.bfloat16).unsqueeze(1)
    rows = default_chunk(n, g, num_codes, chunk_mib, 2)
    short = torch.empty(g, n, m, dtype=torch.long, device=x.device)
    bound = torch.empty(g, n, dtype=torch.float32, device=x.device)
    buf = _scratch(ws, "scores_bf16", (g * rows * num_codes,), xb)
    for start, end, st in _score_blocks(xbt, kbt, bias_b, rows, buf):
        short[:, start:end], bound[:, start:end] = _screen_chunk(st, m, bs)
    short = short.transpose(0, 1)  # (N, G, m)
    codes, v = _rerank(x, keys, bias, short, k, chunk_mib, ws)
    # The certificate: the k-th exact score beats every left-out code's largest possible one.
    xn = x.norm(dim=-1)  # (N, G)
    dx = torch.linalg.vector_norm(x - xb, dim=-1)
    dkmax = torch.linalg.vector_norm(keys - kb, dim=-1).amax(-1)  # (G,)
    kmax = (torch.ones_like(dkmax) if similarity == "cosine"  # unit keys
            else keys.norm(dim=-1).amax(-1)) * (1 + 1e-6)
    bmax = None if bias is None else bias.abs().amax(-1)  # (G,)
    ok = _certified(v, bound.t().to(x.dtype), xn, dx, kmax, dkmax, bmax, dg)  # (N,)
    if not bool(ok.all()):  # rare: redo the tokens the bound cannot certify exactly
        redo = (~ok).nonzero().squeeze(-1)
        rc, rv = _search_torch(x[redo], keys, bias, k, chunk_mib)
        codes[redo], v[redo] = rc, rv
    return codes, v


def _certified(v: Tensor, bound: Tensor, xn: Tensor, dx: Tensor, kmax: Tensor, dkmax: Tensor,
               bmax: Tensor | None, dg: int, extra_ulps: int = 0) -> Tensor:
    """Bool ``(N,)``: tokens whose k-th exact ranking score ``v[..., -1]`` beats ``bound``
    ``(N, G)`` (every left-out code's bfloat16 score) by more than the screen's worst-case
    error, in every group. ``xn``, ``dx``: ``|x|``, ``|x - bf16(x)|`` ``(N, G)``; ``kmax``,
    ``dkmax``: ``max |key|``, ``max |key - bf16(key)|`` ``(G,)``; ``bmax``: ``max |bias|``
    ``(G,)``; ``extra_ulps``: float32 roundings of the exact score beyond its dot product.
    ``cbf_screen_rows`` in ``csrc/topm.cpp`` applies the same bound in the compiled screen."""
    err = (dx * kmax + xn * (1 + _U) * dkmax
           + (2 * dg + extra_ulps) * _U32 * xn * kmax * (1 + _U) ** 2)
    if bmax is not None:  # the bias and the sum are rounded to bfloat16 too
        err = err + 3 * _U * bmax + 2 * _U * (xn * kmax + bmax)
    return (v[..., -1] - 1.1 * err > bound + 2 * _U * bound.abs()).all(-1)
