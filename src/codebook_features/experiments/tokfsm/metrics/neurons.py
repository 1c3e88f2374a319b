"""The neuron baseline: each neuron thresholded, per state, to a recall."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ....errors import CodebookError
from .state_codes import _check_states


@dataclass
class NeuronStatePrecision:
    """Neurons thresholded to a given recall for each state."""

    precision: torch.Tensor
    """(H, S) precision of neuron h for state s at the threshold giving the target recall
    (NaN for states with no positions)."""
    thresholds: torch.Tensor
    """(H, S) the thresholds used."""
    best_state: torch.Tensor
    """(H,) the state of highest precision for each neuron."""
    best_precision: torch.Tensor
    """(H,) that precision."""


def _recall_rank(recall: float, n: int) -> int:
    """Number of top positions a threshold must admit to reach ``recall`` of ``n``
    (``ceil(recall * n)``, forgiving a relative rounding error of 1e-6 in ``recall``)."""
    return min(n, max(1, math.ceil(recall * n * (1 - 1e-6))))


def _precision_at(acts_sorted: torch.Tensor, state_sorted: torch.Tensor,
                  thr: torch.Tensor) -> torch.Tensor:
    """Precision of ``act >= thr`` for one state. acts_sorted: (H, N) ascending over all
    positions; state_sorted: (H, n_s) ascending over the state's positions; thr: (H, m)."""
    n_all, n_s = acts_sorted.shape[1], state_sorted.shape[1]
    pos_all = n_all - torch.searchsorted(acts_sorted, thr.contiguous(), side="left")
    pos_s = n_s - torch.searchsorted(state_sorted, thr.contiguous(), side="left")
    return pos_s.double() / pos_all.double()


def _state_blocks(acts: torch.Tensor, states: torch.Tensor, s_count: int):
    for s in range(s_count):
        mask = states == s
        if mask.any():
            yield s, acts[mask].T.sort(dim=1).values.contiguous()  # (H, n_s) ascending


def _prepare_acts(acts: torch.Tensor, states: torch.Tensor, what: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    acts = torch.as_tensor(acts).detach().cpu()
    if acts.dim() != 2:
        raise CodebookError(f"{what}: acts of shape {tuple(acts.shape)}, expected (N, H)")
    states = _check_states(states, acts.shape[0], what)
    keep = states >= 0
    return acts[keep].float(), states[keep]


def neuron_state_precision(acts: torch.Tensor, states: torch.Tensor,
                           recalls: float | torch.Tensor = 0.5,
                           num_states: int | None = None) -> NeuronStatePrecision:
    """The paper's neuron baseline: each neuron thresholded, for each state, to a recall.

    ``acts``: (N, H) activations; ``states``: (N,) current state per position (negative:
    ignored). ``recalls``: a float, or (S,) one recall per state. For neuron h and state s with
    ``n_s`` positions, the threshold ``t`` is the ``ceil(r * n_s)``-th largest activation of h
    over the state's positions (at least the largest), so ``act >= t`` has recall >= r
    (exactly r without ties); precision is ``#(act >= t and state = s) / #(act >= t)``.
    A neuron's best state is the one of highest precision.
    """
    acts, states = _prepare_acts(acts, states, "neuron_state_precision")
    if states.numel() == 0:
        raise CodebookError("neuron_state_precision: no positions with a state (>= 0)")
    s_count = int(num_states if num_states is not None else int(states.max()) + 1)
    r = torch.as_tensor(recalls, dtype=torch.float64).reshape(-1)
    if r.numel() == 1:
        r = r.expand(s_count)
    if r.numel() != s_count:
        raise CodebookError(f"recalls has {r.numel()} entries for {s_count} states; pass a "
                            "float or one recall per state")
    h = acts.shape[1]
    acts_sorted = acts.T.sort(dim=1).values.contiguous()
    precision = torch.full((h, s_count), float("nan"), dtype=torch.float64)
    thresholds = torch.full((h, s_count), float("nan"))
    for s, block in _state_blocks(acts, states, s_count):
        k = _recall_rank(float(r[s]), block.shape[1])
        thr = block[:, block.shape[1] - k]  # k-th largest
        thresholds[:, s] = thr
        precision[:, s] = _precision_at(acts_sorted, block, thr[:, None])[:, 0]
    best_precision, best_state = precision.nan_to_num(-1.0).max(1)
    return NeuronStatePrecision(precision=precision, thresholds=thresholds,
                                best_state=best_state, best_precision=best_precision)


def neuron_precision_at_code_recall(acts: torch.Tensor, states: torch.Tensor,
                                    code_states: torch.Tensor, code_recalls: torch.Tensor
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every code, the best neuron's precision for the code's state at the code's recall.

    ``code_states``/``code_recalls``: (C,) e.g. ``CodeStateStats.best_state`` / ``.recall``
    (restricted to state codes if wanted). Each neuron is thresholded as in
    :func:`neuron_state_precision` with ``r = code_recall`` for ``s = code_state``. Returns
    ``(precision (C,), neuron (C,))``; codes whose state is negative or absent from ``states``
    get NaN and -1.
    """
    acts, states = _prepare_acts(acts, states, "neuron_precision_at_code_recall")
    code_states = torch.as_tensor(code_states, dtype=torch.long).reshape(-1).cpu()
    code_recalls = torch.as_tensor(code_recalls, dtype=torch.float64).reshape(-1).cpu()
    if code_states.shape != code_recalls.shape:
        raise CodebookError("code_states and code_recalls must have the same length")
    return _best_neurons(acts, states, code_states, code_recalls)


def _best_neurons(acts: torch.Tensor, pos_states: torch.Tensor, want: torch.Tensor,
                  recalls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each entry of ``want`` (a state) and ``recalls``, the best neuron's precision for
    the state at that recall, over positions whose states are ``pos_states``: ``(precision,
    neuron)``, NaN and -1 where the state is negative or has no positions."""
    out_p = torch.full(want.shape, float("nan"), dtype=torch.float64)
    out_n = torch.full(want.shape, -1, dtype=torch.long)
    if want.numel() == 0 or pos_states.numel() == 0:
        return out_p, out_n
    acts_sorted = acts.T.sort(dim=1).values.contiguous()  # (H, N)
    for s in want.unique().tolist():
        mask = pos_states == s
        if s < 0 or not mask.any():
            continue
        block = acts[mask].T.sort(dim=1).values.contiguous()  # (H, n_s)
        n_s = block.shape[1]
        idx = torch.nonzero(want == s).reshape(-1)
        ks = torch.tensor([_recall_rank(float(recalls[i]), n_s) for i in idx.tolist()])
        prec = _precision_at(acts_sorted, block, block[:, n_s - ks])  # (H, m)
        best_p, best_n = prec.max(0)
        out_p[idx], out_n[idx] = best_p, best_n
    return out_p, out_n
