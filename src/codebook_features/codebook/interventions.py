"""Interventions on the chosen codes (replace, append, ablate), applied after the search."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CodebookError


@dataclass
class Intervention:
    """One edit of the chosen codes, applied after the search.

    kind: ``replace`` (put ``codes[0]`` at ``slot``), ``append`` (add ``codes`` as extra slots)
    or ``ablate`` (``codes`` contribute zero wherever chosen). ``positions`` index the token
    axis (the input's second-to-last dimension); None means every position.
    """

    kind: str
    codes: tuple[int, ...]
    group: int = 0
    slot: int = -1
    positions: tuple[int, ...] | None = None


class _Interventions:
    """The :class:`~.CodebookLayer` methods that edit the chosen codes."""

    def replace_code(self, code: int, slot: int = -1, group: int = 0,
                     positions: Sequence[int] | None = None) -> None:
        """Force ``code`` into ``slot`` (default the weakest) of ``group``."""
        self._add(Intervention("replace", (int(code),), group, slot, positions))

    def append_code(self, code: int | Sequence[int], group: int = 0,
                    positions: Sequence[int] | None = None) -> None:
        """Add ``code`` (or several) as extra slots of ``group``; mean divides by the new count."""
        codes = (code,) if isinstance(code, int) else tuple(code)
        self._add(Intervention("append", tuple(int(x) for x in codes), group, -1, positions))

    def ablate_codes(self, codes: int | Sequence[int], group: int = 0,
                     positions: Sequence[int] | None = None) -> None:
        """Make ``codes`` of ``group`` contribute zero wherever they are chosen."""
        codes = (codes,) if isinstance(codes, int) else tuple(codes)
        self._add(Intervention("ablate", tuple(int(x) for x in codes), group, -1, positions))

    def clear_interventions(self) -> None:
        self.interventions = []
        self.bypass = False

    def _add(self, iv: Intervention) -> None:
        c = self.config
        if not 0 <= iv.group < c.groups:
            raise CodebookError(f"{c.name}: group {iv.group} does not exist "
                                f"(groups 0..{c.groups - 1})")
        bad = [x for x in iv.codes if not 0 <= x < c.num_codes]
        if bad or not iv.codes:
            raise CodebookError(f"{c.name}: code(s) {bad or '[]'} do not exist "
                                f"(codes 0..{c.num_codes - 1})")
        if iv.kind == "replace" and not -c.k <= iv.slot < c.k:
            raise CodebookError(f"{c.name}: slot {iv.slot} does not exist (k={c.k})")
        if iv.positions is not None:
            iv.positions = tuple(int(p) for p in iv.positions)
        self.interventions.append(iv)

    def _intervene(self, codes: Tensor, lead: torch.Size) -> tuple[Tensor, Tensor]:
        """Apply the interventions to ``codes`` ``(N, G, K)``; returns codes and slot weights."""
        c = self.config
        n = codes.shape[0]
        dev = codes.device
        present = torch.ones(codes.shape, dtype=torch.bool, device=dev)
        ablated = torch.zeros(codes.shape, dtype=torch.bool, device=dev)
        for iv in self.interventions:
            rows = self._rows(iv.positions, lead, dev, self.position_offset)
            if iv.kind == "replace":
                slot = iv.slot % c.k
                codes[rows, iv.group, slot] = iv.codes[0]
            elif iv.kind == "append":
                m = len(iv.codes)
                extra = torch.zeros(n, c.groups, m, dtype=codes.dtype, device=dev)
                extra_on = torch.zeros(n, c.groups, m, dtype=torch.bool, device=dev)
                extra[rows, iv.group] = torch.tensor(iv.codes, device=dev)
                extra_on[rows, iv.group] = True
                codes = torch.cat([codes, extra], -1)
                present = torch.cat([present, extra_on], -1)
                ablated = torch.cat([ablated, torch.zeros_like(extra_on)], -1)
        for iv in self.interventions:
            if iv.kind == "ablate":
                rows = self._rows(iv.positions, lead, dev, self.position_offset)
                hit = torch.zeros_like(ablated)
                hit[rows, iv.group] = torch.isin(
                    codes[rows, iv.group], torch.tensor(iv.codes, device=dev))
                ablated |= hit & present
        w = present.float()
        if c.combine == "mean":
            w = w / w.sum(-1, keepdim=True).clamp_min(1)
        w = w.masked_fill(ablated, 0.0)
        return codes, w

    @staticmethod
    def _rows(positions: tuple[int, ...] | None, lead: torch.Size, dev, offset: int = 0
              ) -> Tensor | slice:
        """Flat token rows at the given positions of the token axis (``lead[-1]``).

        A position ``p >= 0`` is absolute: the input's first token is at ``offset`` (non-zero
        while generating with a cache); a negative ``p`` counts from the input's end."""
        if positions is None:
            return slice(None)
        t = lead[-1] if len(lead) else 1
        rel = [p - offset if p >= 0 else p % t for p in positions if p >= -t]
        pos = torch.tensor([r for r in rel if 0 <= r < t], dtype=torch.long, device=dev)
        outer = math.prod(lead[:-1]) if len(lead) > 1 else 1
        return (torch.arange(outer, device=dev).view(-1, 1) * t + pos.view(1, -1)).reshape(-1)
