"""The authors' code search: each state's best code, and the best neuron at its recall, on
the positions of the state's final digit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ....errors import CodebookError
from .neurons import _best_neurons
from .state_codes import _check_codes, _check_states, _distinct_pairs


@dataclass
class StateCodeSearch:
    """Each state's best code in one codebook, found the authors' way (their
    ``get_code_precision_and_recall``): on the positions of the state's final digit."""

    code: torch.Tensor
    """(S,) the state's best code (-1 when no code has recall above ``min_recall``)."""
    precision: torch.Tensor
    """(S,) share of the code's firings (over every position) that are on the state's
    positions; NaN where there is no code."""
    recall: torch.Tensor
    """(S,) share of the state's positions where the code fires; NaN where there is no code."""
    activations: torch.Tensor
    """(S,) how often the code fires over every position (0 where there is no code)."""
    positions: torch.Tensor
    """(S,) number of positions of each state."""

    @property
    def found(self) -> torch.Tensor:
        """(S,) bool: states with a code."""
        return self.code >= 0

    def mean(self, field: str) -> float:
        """Mean of ``precision`` or ``recall`` over the states with a code (NaN if none)."""
        v = getattr(self, field)[self.found]
        return float(v.mean()) if v.numel() else float("nan")


def state_code_search(codes: torch.Tensor, targets: torch.Tensor, num_codes: int,
                      num_states: int, min_recall: float = 0.01) -> StateCodeSearch:
    """Best code per state, the paper's way.

    ``codes``: (N, k) codes firing at each of N positions (every position of the data, BOS
    included; (N,) means k = 1; a code listed twice at one position counts once).
    ``targets``: (N,) the state whose positions these are (the paper: a state's final
    digit), -1 elsewhere. For state s with ``n_s`` positions and code c,
    ``recall = #(c fires at s's positions) / n_s`` and
    ``precision = #(c fires at s's positions) / #(c fires anywhere)``. Codes with recall
    <= ``min_recall`` are dropped; of the rest, the state keeps the one of highest precision
    (ties: higher recall, then lower id).
    """
    codes, targets = _check_codes(codes, targets, num_codes, "state_code_search")
    if targets.numel() and int(targets.max()) >= num_states:
        raise CodebookError(f"targets reach {int(targets.max())} but num_states={num_states}")
    p_pos, p_code = _distinct_pairs(codes, num_codes)
    fired = torch.bincount(p_code, minlength=num_codes)
    on = targets[p_pos] >= 0
    hits = torch.zeros(num_states * num_codes, dtype=torch.long)
    hits.index_add_(0, targets[p_pos[on]] * num_codes + p_code[on],
                    torch.ones(int(on.sum()), dtype=torch.long))
    hits = hits.view(num_states, num_codes)
    n_s = torch.bincount(targets[targets >= 0], minlength=num_states)
    recall = hits.double() / n_s.clamp(min=1)[:, None]
    precision = hits.double() / fired.clamp(min=1)[None]
    ok = recall > min_recall
    # rank: precision, then recall, then the lower id (argmax returns the first maximum)
    p_ok = torch.where(ok, precision, torch.full_like(precision, -1.0))
    top = ok & (p_ok == p_ok.max(1, keepdim=True).values)
    best = torch.where(top, recall, torch.full_like(recall, -1.0)).argmax(1)
    has = ok.any(1)
    rows = torch.arange(num_states)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return StateCodeSearch(
        code=torch.where(has, best, torch.full_like(best, -1)),
        precision=torch.where(has, precision[rows, best], nan),
        recall=torch.where(has, recall[rows, best], nan),
        activations=torch.where(has, fired[best], torch.zeros_like(best)),
        positions=n_s)


def best_neuron_at_recall(acts: torch.Tensor, targets: torch.Tensor, states: torch.Tensor,
                          recalls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's neuron baseline: for each (state, recall), the best single neuron.

    ``acts``: (N, H) activations at every position (no position is dropped: the precision's
    denominator counts every position); ``targets``: (N,) the state of each position to be
    found (-1 elsewhere). Neuron h is thresholded at ``t``, the ``ceil(r * n_s)``-th
    largest of its activations on the state's ``n_s`` positions, so ``act >= t`` has recall
    r there; its precision is ``#(act >= t at s's positions) / #(act >= t anywhere)``.
    Returns ``(precision (m,), neuron (m,))`` of the best neuron for each requested state
    (NaN and -1 for states without positions).
    """
    acts = torch.as_tensor(acts).detach().cpu().float()
    if acts.dim() != 2:
        raise CodebookError(f"best_neuron_at_recall: acts of shape {tuple(acts.shape)}, "
                            "expected (N, H)")
    targets = _check_states(targets, acts.shape[0], "best_neuron_at_recall")
    states = torch.as_tensor(states, dtype=torch.long).reshape(-1).cpu()
    recalls = torch.as_tensor(recalls, dtype=torch.float64).reshape(-1).cpu()
    if states.shape != recalls.shape:
        raise CodebookError("states and recalls must have the same length")
    return _best_neurons(acts, targets, states, recalls)

