"""The model side of the TokFSM metrics: sampled state accuracy, next-state probabilities."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .... import lm
from ....errors import CodebookError
from ....lm import _eval_mode, _logits, model_device
from ..data import BOS_TOKEN_ID, NUM_DIGIT_TOKENS, TokFSM


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

