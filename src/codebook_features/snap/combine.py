"""The combine step: the chosen codes into the output, one autograd function with a
straight-through input gradient and a sparse codebook gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels

COMBINES = ("mean", "sum")


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
    ``w * (dL/dy + mse_scale * (y - x))`` (the reconstruction term's gradient; without
    ``dL/dy`` when ``lm_grad`` is off), accumulated with one
    ``index_add_`` per slot; no ``N x C`` tensor is formed and the ``(N*G, dg)`` rows are never
    copied k times. ``weights`` is a float (the same for every slot) or a
    ``(N, G, K)`` tensor (after interventions).
    """

    @staticmethod
    def forward(ctx, x: Tensor, codebook: Tensor, codes: Tensor, weights: Tensor | float,
                mse_scale: float, commit_scale: float, lm_grad: bool) -> Tensor:
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
        ctx.save_for_backward(x, y, flat, codebook, *([w] if isinstance(w, Tensor) else []))
        ctx.scalar_w = None if isinstance(w, Tensor) else float(w)
        ctx.mse_scale, ctx.commit_scale, ctx.lm_grad = mse_scale, commit_scale, lm_grad
        ctx.codebook_shape = codebook.shape
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, y, flat, codebook, *w = ctx.saved_tensors
        a = ctx.mse_scale
        grad_codebook = None
        if not ctx.needs_input_grad[1]:
            pass
        elif ctx.lm_grad and not w and kernels.dense_ok(grad_y, x, y, flat):
            # One compiled pass over the rows, any k, no (N, d) temporary.
            g_c, c, dg = ctx.codebook_shape
            grad_codebook = torch.zeros(g_c * c, dg, dtype=grad_y.dtype)
            kernels.scatter_slots(grad_codebook, flat, grad_y, y, x, ctx.scalar_w, a)
            grad_codebook = grad_codebook.view(g_c, c, dg)
        elif ctx.lm_grad and flat.shape[1] == 1 and not w:
            grad_codebook = _single_code_grad(x, grad_y, flat.view(-1), codebook,
                                              ctx.scalar_w, a)
        else:
            g_c, c, dg = ctx.codebook_shape
            scale = 1.0 if w else ctx.scalar_w  # tensor weights are applied per slot
            if a:  # one temporary: ((y - x) * a + grad_y) * scale
                row = torch.sub(y, x).mul_(a)
                if ctx.lm_grad:
                    row.add_(grad_y)
                if scale != 1.0:
                    row.mul_(scale)
            elif ctx.lm_grad:
                row = grad_y * scale if scale != 1.0 else grad_y
            else:
                row = torch.zeros_like(grad_y)
            row = row.reshape(-1, dg)
            grad_codebook = torch.zeros(g_c * c, dg, dtype=grad_y.dtype, device=grad_y.device)
            # One index_add_ per slot: never expands the rows to (N*G*K, dg).
            slots = flat.t().contiguous()
            for j in range(slots.shape[0]):
                src = row * w[0][:, j : j + 1] if w else row
                grad_codebook.index_add_(0, slots[j], src)
            grad_codebook = grad_codebook.view(g_c, c, dg)
        grad_x = None
        if ctx.needs_input_grad[0]:  # straight-through, plus the commitment pull toward y
            grad_x = grad_y if not ctx.commit_scale else torch.sub(x, y).mul_(
                ctx.commit_scale).add_(grad_y)
        return grad_x, grad_codebook, None, None, None, None, None


def sq_error(y: Tensor, x: Tensor) -> Tensor:
    """``sum((y - x)^2)`` as a 0-d tensor of ``y``'s dtype, without an ``(N, d)`` temporary."""
    if kernels.dense_ok(y, x) and y.shape == x.shape:
        return torch.tensor(kernels.sq_dist(y, x), dtype=y.dtype)
    return torch.dist(y, x).square()


def _single_code_grad(x: Tensor, grad_y: Tensor, idx: Tensor, codebook: Tensor, w: float,
                      a: float) -> Tensor:
    """The codebook gradient when every token has one code (k = 1) of weight ``w``, with no
    ``(N, d)`` temporary: code c gets ``w * sum_(tokens of c) (grad_y + a (y - x))`` with
    ``a`` the MSE gradient's scale (see :func:`mse_scale`), and since every such ``y`` is
    ``w * code``, the ``y`` sum is ``count_c * w * code``: two ``index_add_`` passes and one
    over the codebook (the torch path; with the compiled kernel,
    :func:`kernels.scatter_slots` does it in one pass)."""
    g_c, c, dg = codebook.shape
    grad = torch.zeros(g_c * c, dg, dtype=grad_y.dtype, device=grad_y.device)
    grad.index_add_(0, idx, grad_y.reshape(-1, dg), alpha=w)
    if a:
        grad.index_add_(0, idx, x.reshape(-1, dg), alpha=-a * w)
        counts = torch.bincount(idx, minlength=g_c * c).to(grad.dtype).unsqueeze(-1)
        grad.addcmul_(counts, codebook.reshape(-1, dg), value=a * w * w)
    return grad.view(g_c, c, dg)


def mse_scale(mse_coeff: float, x: Tensor, reduction: str = "sum") -> float:
    """``a`` such that the reconstruction term's gradient is ``a * (y - x)``.

    ``sum`` (the paper's, the authors' ``aeloss``): ``mse_coeff * mean over tokens of the sum
    over the site's features``, so ``a = 2 * mse_coeff / tokens``; ``mean`` (codebooks saved
    before format 2): the per-element mean, ``a = 2 * mse_coeff / (tokens * width)``.
    ``x`` is ``(tokens, G, dg)``.
    """
    if not mse_coeff:
        return 0.0
    return 2.0 * mse_coeff / (x.shape[0] if reduction == "sum" else x.numel())


def snap_combine(x: Tensor, codebook: Tensor, codes: Tensor, weights: Tensor | float,
                 mse_coeff: float = 1.0, *, reduction: str = "sum",
                 commitment_coeff: float = 0.0, codes_lm_grad: bool = True) -> Tensor:
    """Combine the chosen codes into the output; see :class:`_SnapCombine` for gradients.

    ``x`` ``(N, G, dg)`` is the (layer-normed) input, used for the straight-through gradient and
    the reconstruction term (``mse_coeff``, reduced as ``reduction``: see :func:`mse_scale`);
    ``codes`` is ``(N, G, K)``; ``weights`` a float or ``(N, G, K)``. ``commitment_coeff``
    (beta) adds ``2 beta (x - y)`` to the input's gradient, as the authors' ``fullaeloss`` and
    ``vqvae`` losses do (the gradient of ``beta * sum |x - stop_grad(y)|^2``, summed over tokens
    as in their code). ``codes_lm_grad=False`` gives the codes only the reconstruction
    gradient (their ``vqvae``).
    """
    return _SnapCombine.apply(x, codebook, codes, weights, mse_scale(mse_coeff, x, reduction),
                              2.0 * float(commitment_coeff), bool(codes_lm_grad))
