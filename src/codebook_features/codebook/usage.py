"""A layer's usage statistics and its dead codes: counted in training, summarised by
:class:`CodebookStats`, replaced from recent inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import snap
from ..errors import CodebookError

RECENT_ROWS = 4096
"""Recent normed inputs kept per layer as candidates for replacing dead codes."""


@dataclass
class CodebookStats:
    """Summary of a layer's usage since the statistics were last reset."""

    tokens: int
    active_codes: int
    dead_codes: int
    dead_fraction: float
    usage_entropy: float
    """Mean over groups of the entropy (nats) of code usage."""
    mse: float
    fvu: float
    """Fraction of variance unexplained: sum |y - x|^2 / sum |x - mean(x)|^2."""
    activation_frequency: Tensor = field(repr=False)
    """(G, C): activations of each code per token."""


class _Usage:
    """The :class:`~.CodebookLayer` methods that count its usage and replace its dead codes."""

    @torch.no_grad()
    def _update_stats(self, xg: Tensor, codes: Tensor, err: Tensor) -> None:
        c = self.config
        flat = snap._flat_codes(codes, c.num_codes).reshape(-1)
        counts = torch.bincount(flat, minlength=c.groups * c.num_codes).view(c.groups, -1)
        self.step += 1
        self.code_counts += counts
        self.last_fired.masked_fill_(counts > 0, self.step)
        n = xg.shape[0]
        self.tokens_seen += n
        self.sse += err
        flat_x = xg.reshape(n, c.dim)
        self.sum_x += flat_x.sum(0)
        self.sum_x2 += torch.linalg.vector_norm(flat_x).square()
        # Rows for dead-code replacement: up to RECENT_ROWS, spread over the batch, copied so
        # that the batch itself is not kept alive between steps. The old rows go first, so the
        # two never coexist (unless someone else holds them).
        self._recent = None
        self._recent = xg[:: max(1, -(-n // RECENT_ROWS))].clone()

    def reset_stats(self) -> None:
        """Zero the usage counters and error sums (the dead-code clock keeps running)."""
        for name in ("code_counts", "tokens_seen", "sse", "sum_x", "sum_x2"):
            getattr(self, name).zero_()

    def dead_codes(self) -> Tensor:
        """Bool ``(G, C)``: codes that have not fired in the last ``dead_code_window`` steps."""
        return (self.step - self.last_fired) >= self.config.dead_code_window

    def stats(self) -> CodebookStats:
        """Usage, entropy, MSE, FVU and dead codes since the last ``reset_stats``."""
        c = self.config
        tokens = int(self.tokens_seen)
        counts = self.code_counts.double()
        totals = counts.sum(-1, keepdim=True)
        p = counts / totals.clamp_min(1)
        ent = -(p * p.clamp_min(1e-300).log()).sum(-1)
        dead = self.dead_codes()
        mean_sq = self.sum_x2 - self.sum_x.pow(2).sum() / max(tokens, 1)
        return CodebookStats(
            tokens=tokens,
            active_codes=int((self.code_counts > 0).sum()),
            dead_codes=int(dead.sum()),
            dead_fraction=float(dead.float().mean()),
            usage_entropy=float(ent.mean()),
            mse=float(self.sse / max(tokens * c.dim, 1)),
            fvu=float(self.sse / mean_sq) if tokens and float(mean_sq) > 0 else float("nan"),
            activation_frequency=(counts / max(tokens, 1)).float(),
        )

    @torch.no_grad()
    def replace_dead_codes(self, inputs: Tensor | None = None, noise: float = 0.01,
                           generator: torch.Generator | None = None) -> int:
        """Re-initialise dead codes to random recent inputs plus small noise.

        ``inputs``: normed inputs ``(M, G, dg)`` to draw from (default: a sample of the last
        training batch). Returns how many codes were replaced. Deterministic given
        ``generator`` (a CPU generator) and ``inputs``, so every process of a distributed run
        can do the same.
        """
        dead = self.dead_codes()
        src = inputs if inputs is not None else self._recent
        if src is None:
            raise CodebookError(f"{self.config.name}: no recent inputs to draw replacement "
                                "codes from; run a training forward first or pass inputs")
        src = src.to(self.codebook.device, self.codebook.dtype)
        src = src.reshape(-1, self.config.groups, self.config.group_dim)
        g_idx, c_idx = dead.nonzero(as_tuple=True)
        n = g_idx.numel()
        if n == 0:
            return 0
        # Random draws on the CPU generator, so that every process draws the same.
        rows = torch.randint(src.shape[0], (n,), generator=generator)
        eps = torch.randn(n, self.config.group_dim, generator=generator)
        picked = src[rows.to(src.device), g_idx]
        scale = picked.std().clamp_min(1e-6) if n > 1 else picked.abs().mean().clamp_min(1e-6)
        picked = picked + noise * scale * eps.to(picked)
        self.codebook[g_idx, c_idx] = picked
        self.last_fired[g_idx, c_idx] = self.step
        return n
