"""State codes: every code's best-matching state, with its precision and recall."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ....errors import CodebookError


@dataclass
class CodeStateStats:
    """Every code's best-matching state. Codes that never fire have best_state -1 and
    precision = recall = 0."""

    best_state: torch.Tensor
    """(C,) the state most often current when the code fires (ties: lowest state)."""
    precision: torch.Tensor
    """(C,) fraction of the code's activations whose current state is best_state."""
    recall: torch.Tensor
    """(C,) fraction of best_state's positions where the code fires."""
    activations: torch.Tensor
    """(C,) number of positions where the code fires."""
    counts: torch.Tensor
    """(C, S) positions where code c fires and the current state is s."""
    state_codes: torch.Tensor
    """Ids of the codes with precision >= threshold and enough activations."""

    def codes_for_state(self, state: int) -> torch.Tensor:
        """The state codes whose best state is ``state``."""
        return self.state_codes[self.best_state[self.state_codes] == state]

    @property
    def mean_state_code_precision(self) -> float:
        """Mean precision over the state codes (NaN when there are none)."""
        if self.state_codes.numel() == 0:
            return float("nan")
        return float(self.precision[self.state_codes].mean())

    def states_covered(self) -> int:
        """Number of distinct states that have at least one state code."""
        return int(self.best_state[self.state_codes].unique().numel())


def _check_states(states: torch.Tensor, n: int, what: str) -> torch.Tensor:
    states = torch.as_tensor(states, dtype=torch.long).reshape(-1).cpu()
    if states.numel() != n:
        raise CodebookError(f"{what}: states has {states.numel()} entries but there are {n} "
                            "positions; pass one current state per position")
    return states


def _check_codes(codes: torch.Tensor, states: torch.Tensor, num_codes: int, what: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``codes`` as (N, k) ids in ``0..num_codes - 1`` ((N,) means k = 1) and ``states`` as
    one entry per position, both on the CPU."""
    codes = torch.as_tensor(codes, dtype=torch.long).cpu()
    if codes.dim() == 1:
        codes = codes[:, None]
    if codes.dim() != 2:
        raise CodebookError(f"codes of shape {tuple(codes.shape)}: expected (N, k)")
    states = _check_states(states, codes.shape[0], what)
    if codes.numel() and (codes.min() < 0 or codes.max() >= num_codes):
        raise CodebookError(f"codes must lie in 0..{num_codes - 1}; pass the codebook's "
                            "num_codes")
    return codes, states


def _distinct_pairs(codes: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct (position, code) pairs of (N, k) ``codes``: (positions, codes)."""
    n, k = codes.shape
    pos = torch.arange(n).repeat_interleave(k)
    pairs = torch.unique(pos * num_codes + codes.reshape(-1))  # distinct (position, code)
    return pairs // num_codes, pairs % num_codes


def code_state_precision(codes: torch.Tensor, states: torch.Tensor, num_codes: int,
                         num_states: int | None = None, precision_threshold: float = 0.9,
                         min_activations: int = 10) -> CodeStateStats:
    """Precision and recall of every code of one codebook for its best-matching state.

    ``codes``: (N, k) LongTensor, the codes firing at each of N positions (a code listed twice
    in a row counts once; (N,) means k = 1). ``states``: (N,) current state per position;
    positions with a negative state (BOS) are ignored. A code's *precision* for state s is
    ``#(code fires and state = s) / #(code fires)``; its best state maximises it; *recall* is
    ``#(code fires and state = s) / #(state = s)``. State codes: precision >=
    ``precision_threshold`` and at least ``min_activations`` activations.
    """
    codes, states = _check_codes(codes, states, num_codes, "code_state_precision")
    keep = states >= 0
    codes, states = codes[keep], states[keep]
    s_count = int(num_states if num_states is not None else
                  (int(states.max()) + 1 if states.numel() else 1))
    if states.numel() and int(states.max()) >= s_count:
        raise CodebookError(f"states reach {int(states.max())} but num_states={s_count}")
    p_pos, p_code = _distinct_pairs(codes, num_codes)
    counts = torch.zeros(num_codes * s_count, dtype=torch.long)
    counts.index_add_(0, p_code * s_count + states[p_pos], torch.ones_like(p_code))
    counts = counts.reshape(num_codes, s_count)
    activations = counts.sum(1)
    state_totals = torch.bincount(states, minlength=s_count)
    top, best = counts.max(1)
    fired = activations > 0
    zero = torch.zeros((), dtype=torch.float64)
    precision = torch.where(fired, top.double() / activations.clamp(min=1), zero)
    recall = torch.where(fired, top.double() / state_totals[best].clamp(min=1), zero)
    best = torch.where(fired, best, torch.full_like(best, -1))
    state_codes = torch.nonzero(fired & (precision >= precision_threshold)
                                & (activations >= min_activations)).reshape(-1)
    return CodeStateStats(best_state=best, precision=precision, recall=recall,
                          activations=activations, counts=counts, state_codes=state_codes)

