"""The ``bf16_screen`` backend with the compiled kernel: screen scores from AMX tiles or a
bfloat16 ``mm``, an adaptive shortlist re-scored exactly and certified per token."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from .scores import Workspace, _bias, _inv_norms, _scratch, default_chunk
from .torch_search import _search_scaled


def _screen_kernel_ok(x: Tensor, codebook: Tensor) -> bool:
    """Whether the compiled screen (:mod:`codebook_features.kernels`) runs for these float32
    CPU inputs."""
    return (kernels.available() and x.device.type == "cpu" and x.dtype == torch.float32
            and codebook.dtype == torch.float32 and codebook.device.type == "cpu")


def _search_screened_kernel(x: Tensor, codebook: Tensor, k: int, similarity: str,
                            chunk_mib: float, ws: Workspace | None = None,
                            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The certified bfloat16 screen with the compiled kernel (the bound of
    :func:`_search_screened`). Screen scores come from AMX tiles inside the kernel, 16 tokens
    at a time (:func:`kernels.amx_screen`: no score matrix, no bfloat16 copies of the inputs),
    or else from a bfloat16 ``mm`` per group and token block; then per token one
    compiled pass finds the k-th best screen score, re-scores exactly every code within
    twice the token's error bound of it (usually k plus a few: the shortlist adapts to how
    close the scores are) and certifies the result. Cosine never forms unit keys in float32:
    exact scores are ``(x . code) / |code|``. Returns codes, ranking scores and ``|x|``
    ``(N, G)`` (None when it fell back to plain exact search)."""
    n, g, dg = x.shape
    num_codes = codebook.shape[1]
    if n == 0 or 4 * k > num_codes:
        return (*_search_scaled(x, codebook, _inv_norms(codebook, similarity),
                                _bias(codebook, similarity), k, chunk_mib), None)
    book = codebook.contiguous()
    x = x.contiguous()
    codes = torch.empty(n, g, k, dtype=torch.long)
    v = torch.empty(n, g, k)
    ok = torch.empty(n, g, dtype=torch.uint8)
    norms = torch.empty(n, g)
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    if _amx_fits(g, num_codes, dg, k):  # scores made by AMX tiles, 16 tokens at a time
        keys = _ScreenKeys(book, similarity,
                           _scratch(ws, "kb_tiles", kernels.amx_tiles(g, num_codes, dg), bf16))
        kernels.amx_screen(x, keys.kb, book, keys.scale, keys.bias, k, keys.kmax, keys.dkmax,
                           keys.bmax, keys.extra_ulps, codes, v, ok, norms)
    else:
        keys = _ScreenKeys(book, similarity, _scratch(ws, "kbt", (g, dg, num_codes), bf16))
        _screen_mm(x, book, keys, k, chunk_mib, ws, codes, v, ok, norms)
    certified = ok.bool().all(-1)
    if not bool(certified.all()):  # rare: redo the tokens the bound cannot certify exactly
        redo = (~certified).nonzero().squeeze(-1)
        codes[redo], v[redo] = _redo(x[redo], book, keys.scale, keys.bias, k, chunk_mib)
    return codes, v, norms


class _ScreenKeys:
    """The compiled screen's bfloat16 keys, written into ``kb`` (AMX tiles when its shape is
    :func:`kernels.amx_tiles`, else transposed ``(G, dg, C)``), and what the certificate needs
    of them: the cosine ``scale`` and Euclidean ``bias`` of the exact scores (None where they
    do not apply) and per-group bounds ``kmax`` (max key norm), ``dkmax`` (max key rounding
    error), ``bmax`` (max |bias|), float32 ``(G,)`` with the norms' rounding allowed for."""

    TOL = 1 + 1e-6  # the float32 roundings of the norms

    def __init__(self, book: Tensor, similarity: str, kb: Tensor) -> None:
        cos = similarity == "cosine"
        self.kb = kb
        tiles = kb.dim() == 4  # kernels.amx_tiles shape
        scale, dk, kn = kernels.bf16_keys(book, cos, kb, tiles=tiles)
        self.scale = scale if cos else None
        self.bias = -0.5 * kn * kn if similarity == "euclidean" else None
        self.kmax, self.dkmax = kn.amax(-1) * self.TOL, dk.amax(-1) * self.TOL
        self.bmax = None if self.bias is None else self.bias.abs().amax(-1) * self.TOL
        self.extra_ulps = 4 if cos else 1  # the exact score's own roundings


AMX_KEY_BYTES = 512 << 10
"""The AMX screen streams every key of a group past each 16 tokens. While a group's key tiles
(``C x dg`` bfloat16, padded) stay in L2 it beat the bfloat16 ``mm`` route (C = 1000, dg = 32:
21 against 31 ms for a layer's forward + backward); at C = 10000 it lost (dg = 512: 283
against 210; dg = 64: 306 against 274): ``benchmarks/snap.py --impls
codebook_screen_mm,codebook_screen_amx``."""


def _amx_fits(g: int, c: int, dg: int, k: int) -> bool:
    """Whether the screen scores with AMX tiles: AMX is usable, a group's key tiles fit
    :data:`AMX_KEY_BYTES`, and k <= 16 (its threshold comes from 64 lane maxima)."""
    _, ncb, nq, tile = kernels.amx_tiles(g, c, dg)
    return k <= 16 and ncb * nq * tile * 2 <= AMX_KEY_BYTES and kernels.amx()


def _screen_mm(x: Tensor, book: Tensor, keys: _ScreenKeys, k: int, chunk_mib: float,
               ws: Workspace | None, codes: Tensor, v: Tensor, ok: Tensor, norms: Tensor,
               ) -> None:
    """The screen's scores by a bfloat16 ``mm`` per group and token block against the
    transposed ``keys``, then the compiled per-token pass on each block; fills the outputs."""
    n, g, dg = x.shape
    num_codes = book.shape[1]
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    kbt = keys.kb
    bias_b = None if keys.bias is None else keys.bias.to(torch.bfloat16)
    xbt = _scratch(ws, "xbt", (g, n, dg), bf16)
    xbt.copy_(x.transpose(0, 1))
    # Score blocks of ~1 MiB (they stay in L2 between the mm and the per-token pass) but at
    # least 256 rows (fewer make the mm slow): measured fastest at C = 1000 and 10000.
    rows = default_chunk(n, 1, num_codes, min(chunk_mib, 1.0), 2)
    if chunk_mib >= 1.0:
        rows = max(rows, min(n, 256))
    buf = _scratch(ws, "scores_bf16", (rows * num_codes,), bf16)
    kmax, dkmax = keys.kmax.tolist(), keys.dkmax.tolist()
    bmax = [None] * g if keys.bmax is None else keys.bmax.tolist()
    for gi in range(g):
        for start in range(0, n, rows):
            end = min(n, start + rows)
            s = buf[: (end - start) * num_codes].view(end - start, num_codes)
            if bias_b is None:
                torch.mm(xbt[gi, start:end], kbt[gi], out=s)
            else:
                torch.addmm(bias_b[gi], xbt[gi, start:end], kbt[gi], out=s)
            kernels.screen_rows(s.view(torch.int16), start, gi, x, book, keys.scale, keys.bias,
                                k, kmax[gi], dkmax[gi], bmax[gi], keys.extra_ulps, codes, v, ok,
                                norms)


def _redo(x: Tensor, book: Tensor, scale: Tensor | None, bias: Tensor | None, k: int,
          chunk_mib: float) -> tuple[Tensor, Tensor]:
    """Exact search of the tokens the compiled screen could not certify."""
    return _search_scaled(x, book, scale, bias, k, chunk_mib)
