"""Intervention measures: next-state mass on a target's successors, Jensen–Shannon divergence."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ....errors import CodebookError


def _successor_mask(successors: Sequence[int] | torch.Tensor, size: int) -> torch.Tensor:
    succ = torch.as_tensor(successors)
    if succ.dtype == torch.bool:
        if succ.shape[-1] != size:
            raise CodebookError(f"successor mask has {succ.shape[-1]} entries for {size} states")
        return succ
    mask = torch.zeros(size, dtype=torch.bool)
    mask[succ.long()] = True
    return mask


def successor_mass(probs: torch.Tensor, successors: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Share of next-state probability on ``successors`` (ids or a bool mask):
    ``sum_{s in succ} p[s] / sum_s p[s]`` over the last dimension (so distributions that do
    not sum to one, e.g. from :func:`next_state_probs`, are renormalised over states)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    mask = _successor_mask(successors, p.shape[-1]).to(p.device)
    return (p * mask).sum(-1) / p.sum(-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Jensen–Shannon divergence over the last dimension.

    ``p`` and ``q`` are first renormalised to sum to one. ``JSD = (KL(p||m) + KL(q||m)) / 2``
    with ``m = (p + q) / 2``, natural logarithms and ``0 log 0 = 0``. With ``normalized``
    (default) the result is divided by ``ln 2``, so it lies in [0, 1]: 0 for identical
    distributions, 1 for disjoint supports.
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    q = torch.as_tensor(q, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True)
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a / m).log(), torch.zeros((), dtype=a.dtype)).sum(-1)

    jsd = (kl(p) + kl(q)) / 2
    return jsd / math.log(2) if normalized else jsd


@dataclass
class InterventionEffect:
    """How an intervention moved next-state probability towards a target state B.

    All fields are tensors over the batch dimensions of the inputs (0-d for one
    distribution)."""

    mass_before: torch.Tensor
    """Share of next-state probability on B's successors before the intervention."""
    mass_after: torch.Tensor
    """The same share after it."""
    moved: torch.Tensor
    """mass_after - mass_before."""
    jsd_before: torch.Tensor
    """Normalised JSD (÷ ln 2) between the distribution before and B's true next-state
    distribution (uniform over B's successors)."""
    jsd_after: torch.Tensor
    """The same after the intervention (0: exactly B's behaviour)."""

    def summary(self) -> dict[str, float]:
        """Means over the batch, as floats."""
        return {k: float(getattr(self, k).double().mean()) for k in
                ("mass_before", "mass_after", "moved", "jsd_before", "jsd_after")}


def intervention_effect(probs_before: torch.Tensor, probs_after: torch.Tensor,
                        target_successors: Sequence[int] | torch.Tensor) -> InterventionEffect:
    """Compare next-state distributions (..., S) before/after an intervention towards B.

    ``target_successors``: B's successors (ids or bool mask over S states). The target
    distribution is uniform over them (the FSM's true next-state distribution of B).
    """
    pb = torch.as_tensor(probs_before, dtype=torch.float64)
    pa = torch.as_tensor(probs_after, dtype=torch.float64)
    if pb.shape != pa.shape:
        raise CodebookError(f"probs_before {tuple(pb.shape)} and probs_after "
                            f"{tuple(pa.shape)} differ; pass distributions over the same states")
    mask = _successor_mask(target_successors, pb.shape[-1])
    target = mask.double() / mask.sum()
    mb, ma = successor_mass(pb, mask), successor_mass(pa, mask)
    return InterventionEffect(mass_before=mb, mass_after=ma, moved=ma - mb,
                              jsd_before=js_divergence(pb, target),
                              jsd_after=js_divergence(pa, target))
