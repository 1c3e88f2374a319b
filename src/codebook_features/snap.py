"""The numerical core of a codebook: similarity search, exact top-k, and the combine step.

Shapes: ``x`` is ``(N, G, dg)`` (N tokens, G groups of width dg), a codebook ``(G, C, dg)``.
Search never holds the full ``N x C`` similarity matrix: it walks over token chunks whose
score block is bounded by ``chunk_mib``. ``snap_combine`` is one autograd function with a
straight-through input gradient and a sparse codebook gradient (only chosen codes get any).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

SIMILARITIES = ("cosine", "inner", "euclidean")
COMBINES = ("mean", "sum")


class SearchResult(NamedTuple):
    """Top-k codes per token and group, best first."""

    codes: Tensor  # (N, G, k) int64
    scores: Tensor  # (N, G, k) similarity of each chosen code (cosine, inner, or -squared dist)


def search_keys(codebook: Tensor, similarity: str) -> tuple[Tensor, Tensor | None]:
    """What inputs are matched against: keys ``(G, C, dg)`` and an optional bias ``(G, C)``.

    Ranking by ``x . key + bias`` equals ranking by the similarity: cosine needs only unit
    codes (``|x|`` does not change a row's ranking); Euclidean ranks by ``x . c - |c|^2 / 2``.
    """
    if similarity == "cosine":
        return F.normalize(codebook, dim=-1, eps=1e-12), None
    if similarity == "inner":
        return codebook, None
    if similarity == "euclidean":
        return codebook, -0.5 * codebook.pow(2).sum(-1)
    raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}")


def default_chunk(n_tokens: int, groups: int, num_codes: int, chunk_mib: float) -> int:
    """Tokens per chunk so that one float32 score block ``(G, chunk, C)`` fits ``chunk_mib``."""
    rows = int(chunk_mib * 2**20 / (4 * groups * num_codes))
    return max(1, min(n_tokens, rows))


@torch.no_grad()
def search(x: Tensor, codebook: Tensor, k: int, similarity: str = "cosine",
           chunk_mib: float = 16.0) -> SearchResult:
    """Exact top-k codes of every token in every group, in token chunks.

    Extra memory is one ``(G, chunk, C)`` score block (``chunk_mib``), never ``N x C``.
    Scores are true similarities: cosine (``x . c / |x||c|``), inner product, or negative
    squared Euclidean distance.
    """
    n, g, dg = x.shape
    num_codes = codebook.shape[1]
    keys, bias = search_keys(codebook, similarity)
    keys_t = keys.transpose(1, 2)  # (G, dg, C)
    xt = x.transpose(0, 1)  # (G, N, dg)
    chunk = default_chunk(n, g, num_codes, chunk_mib)
    codes = torch.empty(g, n, k, dtype=torch.long, device=x.device)
    scores = torch.empty(g, n, k, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        if bias is None:
            s = torch.bmm(xt[:, start:end], keys_t)
        else:
            s = torch.baddbmm(bias.unsqueeze(1), xt[:, start:end], keys_t)
        if k == 1:
            v, i = s.max(dim=-1, keepdim=True)
        else:
            v, i = s.topk(k, dim=-1)
        scores[:, start:end] = v
        codes[:, start:end] = i
    codes = codes.transpose(0, 1)
    scores = scores.transpose(0, 1)
    if similarity == "cosine":
        scores = scores / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    elif similarity == "euclidean":
        scores = 2 * scores - x.pow(2).sum(-1, keepdim=True)
    return SearchResult(codes.contiguous(), scores.contiguous())


def combine_weights(k: int, combine: str) -> float:
    """The weight of every slot of a plain top-k: ``1/k`` for mean, 1 for sum."""
    return 1.0 / k if combine == "mean" else 1.0


def _flat_codes(codes: Tensor, num_codes: int) -> Tensor:
    """Codes ``(N, G, K)`` as rows of the flattened ``(G*C, dg)`` codebook: ``(N*G, K)``."""
    n, g, k = codes.shape
    if g == 1:
        return codes.view(n, k)
    offsets = torch.arange(g, device=codes.device).mul_(num_codes).view(1, g, 1)
    return (codes + offsets).view(n * g, k)


class _SnapCombine(torch.autograd.Function):
    """``y[n, g] = sum_j w[n, g, j] * codebook[g, codes[n, g, j]]`` with codebook gradients.

    Backward: ``dL/dx = dL/dy`` (straight-through); each chosen code gets
    ``w * (dL/dy + mse_coeff * d MSE(y, stop_grad(x)) / dy)``, accumulated with ``index_add_``;
    no ``N x C`` tensor is formed. ``weights`` is a float (the same for every slot) or a
    ``(N, G, K)`` tensor (after interventions).
    """

    @staticmethod
    def forward(ctx, x: Tensor, codebook: Tensor, codes: Tensor, weights: Tensor | float,
                mse_coeff: float) -> Tensor:
        n, g, dg = x.shape
        num_codes = codebook.shape[1]
        k = codes.shape[-1]
        flat = _flat_codes(codes, num_codes)
        book = codebook.reshape(-1, dg)
        if isinstance(weights, Tensor):
            w = weights.to(codebook.dtype).reshape(n * g, k)
            y = F.embedding_bag(flat, book, per_sample_weights=w, mode="sum")
        elif k == 1:
            y = book.index_select(0, flat.view(-1))
            if weights != 1.0:
                y = y.mul_(weights)
            w = weights
        else:  # weights is 1 (sum) or 1/k (mean)
            y = F.embedding_bag(flat, book, mode="sum" if weights == 1.0 else "mean")
            w = weights
        y = y.view(n, g, dg)
        ctx.save_for_backward(x, y, flat, *([w] if isinstance(w, Tensor) else []))
        ctx.scalar_w = None if isinstance(w, Tensor) else float(w)
        ctx.mse_coeff = mse_coeff
        ctx.codebook_shape = codebook.shape
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, y, flat, *w = ctx.saved_tensors
        grad_codebook = None
        if ctx.needs_input_grad[1]:
            g_c, c, dg = ctx.codebook_shape
            row = grad_y
            if ctx.mse_coeff:
                row = torch.add(grad_y, y - x, alpha=2.0 * ctx.mse_coeff / x.numel())
            row = row.reshape(-1, dg)
            k = flat.shape[1]
            if w:
                src = (w[0].unsqueeze(-1) * row.unsqueeze(1)).reshape(-1, dg)
            else:
                src = row * ctx.scalar_w if ctx.scalar_w != 1.0 else row
                if k > 1:
                    src = src.unsqueeze(1).expand(-1, k, dg).reshape(-1, dg)
            grad_codebook = torch.zeros(g_c * c, dg, dtype=grad_y.dtype, device=grad_y.device)
            grad_codebook.index_add_(0, flat.reshape(-1), src)
            grad_codebook = grad_codebook.view(g_c, c, dg)
        grad_x = grad_y if ctx.needs_input_grad[0] else None
        return grad_x, grad_codebook, None, None, None


def snap_combine(x: Tensor, codebook: Tensor, codes: Tensor, weights: Tensor | float,
                 mse_coeff: float = 1.0) -> Tensor:
    """Combine the chosen codes into the output; see :class:`_SnapCombine` for gradients.

    ``x`` ``(N, G, dg)`` is the (layer-normed) input, used for the straight-through gradient and
    the MSE term; ``codes`` is ``(N, G, K)``; ``weights`` a float or ``(N, G, K)``.
    """
    return _SnapCombine.apply(x, codebook, codes, weights, float(mse_coeff))
