"""TokFSM metrics: sampled state accuracy, state codes vs. neurons, interventions.

The model side works with any causal LM :mod:`codebook_features.lm` serves (LM loss and
accuracy, ``lm_metrics``, live there and are re-exported here); the analysis functions take
plain tensors. Token ids follow :mod:`.data`: digits are ids 0..9,
BOS is 10.

Definitions used throughout:

* *current state* of a token position: the state whose digit sits there; BOS has state -1
  and is ignored by the code/neuron statistics.
* *state accuracy*: sample sequences from the model starting at BOS, decode them into states,
  and count the fraction of consecutive state pairs ``(s_i, s_{i+1})`` that are edges of the
  FSM; a pair involving an undecodable state (a BOS token in a digit slot, or a number
  >= num_states) counts as invalid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ... import lm
from ...errors import CodebookError
from ...lm import LMMetrics, _eval_mode, _logits, lm_metrics, model_device
from .data import BOS_TOKEN_ID, NUM_DIGIT_TOKENS, TokFSM

__all__ = [
    "CodeStateStats",
    "InterventionEffect",
    "LMMetrics",
    "NeuronStatePrecision",
    "StateCodeSearch",
    "best_neuron_at_recall",
    "code_state_precision",
    "first_transition_accuracy",
    "intervention_effect",
    "js_divergence",
    "lm_metrics",
    "neuron_precision_at_code_recall",
    "neuron_state_precision",
    "next_state_probs",
    "sample_states_from_model",
    "sample_tokens",
    "state_accuracy",
    "state_code_search",
    "successor_mass",
    "transition_accuracy",
]


def sample_tokens(model: Any, n: int, length: int, prompt: torch.Tensor | int | None = None,
                  **kwargs: Any) -> torch.Tensor:
    """:func:`codebook_features.lm.sample_tokens` from ``[BOS]`` unless ``prompt`` is given."""
    return lm.sample_tokens(model, n, length, BOS_TOKEN_ID if prompt is None else prompt,
                            **kwargs)


def sample_states_from_model(model: Any, fsm: TokFSM, n_sequences: int = 100,
                             num_states: int | None = None, batch_size: int = 100,
                             temperature: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Sample ``n_sequences`` sequences of ``num_states`` states (default: the FSM's
    states_per_sequence) from BOS; returns decoded (n, num_states) states, -1 where invalid."""
    length = fsm.config.states_per_sequence if num_states is None else num_states
    toks = sample_tokens(model, n_sequences, length * fsm.digits, batch_size=batch_size,
                         temperature=temperature, seed=seed)
    return fsm.decode(toks, bos=True)


def transition_accuracy(states: torch.Tensor, fsm: TokFSM) -> float:
    """Fraction of consecutive pairs ``(states[:, i], states[:, i+1])`` that are FSM edges;
    pairs with an invalid state (-1 or out of range) count as wrong."""
    states = torch.as_tensor(states, dtype=torch.long)
    if states.dim() == 1:
        states = states[None]
    if states.shape[1] < 2:
        raise CodebookError("transition_accuracy needs at least 2 states per sequence")
    return float(fsm.valid_edges(states[:, :-1], states[:, 1:]).float().mean())


def state_accuracy(model: Any, fsm: TokFSM, n_sequences: int = 100,
                   num_states: int | None = None, batch_size: int = 100,
                   temperature: float = 1.0, seed: int = 0) -> float:
    """Sampled state (transition) accuracy, the paper's metric.

    Samples ``n_sequences`` sequences of ``num_states`` states (default: the FSM's
    ``states_per_sequence``, i.e. 2 * 64 tokens) from ``[BOS]`` at ``temperature``, decodes
    them, and returns :func:`transition_accuracy`: the share of the ``n * (num_states - 1)``
    consecutive state pairs that are valid edges.
    """
    states = sample_states_from_model(model, fsm, n_sequences, num_states, batch_size,
                                      temperature, seed)
    return transition_accuracy(states, fsm)


def next_state_probs(model: Any, prefix_ids: torch.Tensor, fsm: TokFSM,
                     temperature: float = 1.0, batch_size: int = 1024) -> torch.Tensor:
    """The model's distribution over the next state after ``prefix_ids`` (ending at a state
    boundary): ``P(s) = prod_j p(digit_j(s) | prefix, digits_<j(s))``.

    ``prefix_ids``: (T,) or (B, T). Returns (B, num_states) float64 (or (num_states,)). The
    digit probabilities come from the full softmax over the vocabulary, so the row sums to at
    most 1: the rest is mass on BOS tokens or numbers >= num_states. Costs one forward pass on
    the prefix and one on each of the ``10 ** j`` continuations for digit ``j >= 1`` (for two
    digits: B + 10 B sequences).
    """
    prefix = torch.as_tensor(prefix_ids, dtype=torch.long)
    squeeze = prefix.dim() == 1
    if squeeze:
        prefix = prefix[None]
    b, t = prefix.shape
    d = fsm.digits
    device = model_device(model)
    probs = torch.ones(b, 1, dtype=torch.float64)  # (B, 10**j) over digit prefixes
    with _eval_mode(model):
        for j in range(d):
            # All 10**j digit continuations (lexicographic), appended to every prefix.
            conts = fsm_digit_grid(j)  # (10**j, j)
            rows = torch.cat([prefix.repeat_interleave(len(conts), 0),
                              conts.repeat(b, 1)], dim=1)
            last = []
            for i in range(0, len(rows), batch_size):
                logits = _logits(model(rows[i:i + batch_size].to(device)))[:, -1].float()
                if temperature != 1.0:
                    logits = logits / temperature
                last.append(torch.softmax(logits, -1)[:, :NUM_DIGIT_TOKENS].double().cpu())
            p = torch.cat(last).reshape(b, len(conts), NUM_DIGIT_TOKENS)
            probs = (probs[:, :, None] * p).reshape(b, -1)
    out = probs[:, : fsm.num_states]
    return out[0] if squeeze else out


def fsm_digit_grid(j: int) -> torch.Tensor:
    """(10**j, j) all digit strings of length j in lexicographic order."""
    if j == 0:
        return torch.zeros(1, 0, dtype=torch.long)
    powers = 10 ** torch.arange(j - 1, -1, -1)
    return (torch.arange(10**j)[:, None] // powers) % 10


def first_transition_accuracy(model: Any, fsm: TokFSM, samples_per_state: int = 10,
                              states: Iterable[int] | None = None, temperature: float = 1.0,
                              seed: int = 0, exact: bool = False) -> float:
    """Accuracy of the first transition after a one-state prompt.

    For every prompt state ``s`` (default: all states of the FSM), the prompt is
    ``[BOS, digits(s)]``; the model samples ``digits`` more tokens, ``samples_per_state``
    times, which decode to ``s'``. The result is the fraction of all (prompt, sample) pairs
    with ``s -> s'`` a valid edge (an undecodable ``s'`` counts as wrong).
    With ``exact=True`` no sampling is done: the result is the mean over prompt states of the
    model's probability mass on valid successors, ``sum_{s' in succ(s)} P(s')`` from
    :func:`next_state_probs`, which is the expectation of the sampled value.
    """
    prompt_states = torch.arange(fsm.num_states) if states is None else torch.as_tensor(
        list(states), dtype=torch.long)
    if prompt_states.numel() == 0:
        raise CodebookError("first_transition_accuracy: no prompt states given")
    prompts = fsm.encode(prompt_states[:, None], bos=True)  # (S, 1 + digits)
    if exact:
        probs = next_state_probs(model, prompts, fsm, temperature=temperature)
        mass = (probs * fsm.adjacency[prompt_states].double()).sum(-1)
        return float(mass.mean())
    if samples_per_state < 1:
        raise CodebookError(f"samples_per_state={samples_per_state}: must be >= 1")
    prompts = prompts.repeat_interleave(samples_per_state, 0)
    toks = sample_tokens(model, len(prompts), fsm.digits, prompt=prompts,
                         temperature=temperature, seed=seed, batch_size=1000)
    nxt = fsm.decode(toks[:, 1 + fsm.digits:], bos=False)[:, 0]
    src = prompt_states.repeat_interleave(samples_per_state)
    return float(fsm.valid_edges(src, nxt).float().mean())


# ---------------------------------------------------------------------------- state codes
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
    codes = torch.as_tensor(codes, dtype=torch.long).cpu()
    if codes.dim() == 1:
        codes = codes[:, None]
    if codes.dim() != 2:
        raise CodebookError(f"codes of shape {tuple(codes.shape)}: expected (N, k)")
    states = _check_states(states, codes.shape[0], "code_state_precision")
    if codes.numel() and (codes.min() < 0 or codes.max() >= num_codes):
        raise CodebookError(f"codes must lie in 0..{num_codes - 1}; pass the codebook's "
                            "num_codes")
    keep = states >= 0
    codes, states = codes[keep], states[keep]
    s_count = int(num_states if num_states is not None else
                  (int(states.max()) + 1 if states.numel() else 1))
    if states.numel() and int(states.max()) >= s_count:
        raise CodebookError(f"states reach {int(states.max())} but num_states={s_count}")
    n, k = codes.shape
    pos = torch.arange(n).repeat_interleave(k)
    pairs = torch.unique(pos * num_codes + codes.reshape(-1))  # distinct (position, code)
    p_pos, p_code = pairs // num_codes, pairs % num_codes
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


# ---------------------------------------------------------------------------- neuron baseline
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
    out_p = torch.full(code_states.shape, float("nan"), dtype=torch.float64)
    out_n = torch.full(code_states.shape, -1, dtype=torch.long)
    if code_states.numel() == 0 or states.numel() == 0:
        return out_p, out_n
    acts_sorted = acts.T.sort(dim=1).values.contiguous()
    wanted = code_states.unique()
    for s in wanted.tolist():
        mask = states == s
        if s < 0 or not mask.any():
            continue
        block = acts[mask].T.sort(dim=1).values.contiguous()  # (H, n_s)
        n_s = block.shape[1]
        idx = torch.nonzero(code_states == s).reshape(-1)
        ks = torch.tensor([_recall_rank(float(code_recalls[i]), n_s) for i in idx.tolist()])
        thr = block[:, n_s - ks]  # (H, m)
        prec = _precision_at(acts_sorted, block, thr)  # (H, m)
        best_p, best_n = prec.max(0)
        out_p[idx], out_n[idx] = best_p, best_n
    return out_p, out_n


# ------------------------------------------------------------- the authors' code search
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
    codes = torch.as_tensor(codes, dtype=torch.long).cpu()
    if codes.dim() == 1:
        codes = codes[:, None]
    if codes.dim() != 2:
        raise CodebookError(f"codes of shape {tuple(codes.shape)}: expected (N, k)")
    targets = _check_states(targets, codes.shape[0], "state_code_search")
    if codes.numel() and (codes.min() < 0 or codes.max() >= num_codes):
        raise CodebookError(f"codes must lie in 0..{num_codes - 1}; pass the codebook's "
                            "num_codes")
    if targets.numel() and int(targets.max()) >= num_states:
        raise CodebookError(f"targets reach {int(targets.max())} but num_states={num_states}")
    n, k = codes.shape
    pos = torch.arange(n).repeat_interleave(k)
    pairs = torch.unique(pos * num_codes + codes.reshape(-1))  # distinct (position, code)
    p_pos, p_code = pairs // num_codes, pairs % num_codes
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
    out_p = torch.full(states.shape, float("nan"), dtype=torch.float64)
    out_n = torch.full(states.shape, -1, dtype=torch.long)
    if states.numel() == 0:
        return out_p, out_n
    acts_sorted = acts.T.sort(dim=1).values.contiguous()  # (H, N)
    for s in states.unique().tolist():
        mask = targets == s
        if s < 0 or not mask.any():
            continue
        block = acts[mask].T.sort(dim=1).values.contiguous()  # (H, n_s)
        n_s = block.shape[1]
        idx = torch.nonzero(states == s).reshape(-1)
        ks = torch.tensor([_recall_rank(float(recalls[i]), n_s) for i in idx.tolist()])
        prec = _precision_at(acts_sorted, block, block[:, n_s - ks])  # (H, m)
        best_p, best_n = prec.max(0)
        out_p[idx], out_n[idx] = best_p, best_n
    return out_p, out_n


# ---------------------------------------------------------------------------- interventions
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
