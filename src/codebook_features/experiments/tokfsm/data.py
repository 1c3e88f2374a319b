"""TokFSM: a random finite state machine written as digit tokens (DESIGN.md §2).

Every state ``s`` of the machine has ``successors`` distinct successor states, drawn uniformly
at random (without replacement) from all ``num_states`` states, so a state may be its own
successor. A sequence starts in a uniformly random state and moves to a uniformly random
successor at every step.

A state is written as ``digits`` zero-padded decimal digits, one token per digit. Token ids:
the digit ``d`` is token id ``d`` (0..9) and the single special token ``<|endoftext|>`` is id 10;
it serves as BOS, EOS, padding and unknown token. A sequence of ``states_per_sequence`` states is
``[BOS, d(s_0, 0), d(s_0, 1), d(s_1, 0), ...]``: ``1 + digits * states_per_sequence`` tokens
(129 with the defaults).

Ground truth per token position ``t >= 1``: the *current state* is the state whose digit token
sits at ``t`` (``states[(t - 1) // digits]``) and the *digit index* is ``(t - 1) % digits``.
The BOS position has state -1 and digit index -1.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ...errors import CodebookError
from ...io import read_json, write_json
from ..seeds import derive_seed

NUM_DIGIT_TOKENS = 10
"""Token ids 0..9 are the digits 0..9."""
BOS_TOKEN = "<|endoftext|>"
"""The one special token: BOS, EOS, padding and unknown token."""
BOS_TOKEN_ID = 10
VOCAB_SIZE = 11
FORMAT_NAME = "tokfsm"
FORMAT_VERSION = 1


@dataclass
class TokFSMConfig:
    """Shape of a TokFSM (paper defaults: 100 states, 10 successors, 2 digits, 64 states)."""

    num_states: int = 100
    """Number of states of the machine."""
    successors: int = 10
    """Distinct successors of every state, chosen uniformly at random."""
    digits: int = 2
    """Digit tokens per state; needs 10**digits >= num_states."""
    states_per_sequence: int = 64
    """States in one training sequence (each sequence is BOS + digits * states tokens)."""
    seed: int = 0
    """Seed of the transition table (sequences take their own seeds)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise CodebookError for an impossible configuration."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise CodebookError(f"TokFSMConfig.{f.name}={v!r}: must be an integer")
        if self.num_states < 1:
            raise CodebookError(f"TokFSMConfig.num_states={self.num_states}: must be >= 1")
        if not 1 <= self.successors <= self.num_states:
            raise CodebookError(
                f"TokFSMConfig.successors={self.successors}: must be between 1 and "
                f"num_states={self.num_states}; lower successors or raise num_states")
        if self.digits < 1:
            raise CodebookError(f"TokFSMConfig.digits={self.digits}: must be >= 1")
        if 10**self.digits < self.num_states:
            raise CodebookError(
                f"TokFSMConfig.digits={self.digits} cannot write {self.num_states} states "
                f"(10**digits < num_states); raise digits or lower num_states")
        if self.states_per_sequence < 1:
            raise CodebookError(
                f"TokFSMConfig.states_per_sequence={self.states_per_sequence}: must be >= 1")

    @property
    def seq_len(self) -> int:
        """Tokens per sequence, BOS included."""
        return 1 + self.digits * self.states_per_sequence


@dataclass
class TokFSMSample:
    """Sequences drawn from a TokFSM, with their ground truth."""

    states: torch.Tensor
    """(n, states_per_sequence) LongTensor of states."""
    input_ids: torch.Tensor
    """(n, seq_len) LongTensor of token ids, BOS first."""
    position_states: torch.Tensor
    """(n, seq_len) current state at every token position (-1 at BOS)."""
    digit_index: torch.Tensor
    """(n, seq_len) index of the token's digit within its state (-1 at BOS)."""


class TokFSM:
    """A TokFSM: its transition table, sampling, encoding and ground truth."""

    def __init__(self, config: TokFSMConfig | None = None,
                 transitions: torch.Tensor | None = None) -> None:
        """Build the machine from ``config`` (random table from ``config.seed``), or adopt a
        given ``transitions`` table of shape (num_states, successors)."""
        self.config = config if config is not None else TokFSMConfig()
        self.config.validate()
        c = self.config
        if transitions is None:
            gen = torch.Generator().manual_seed(derive_seed(c.seed, "transitions"))
            rows = [torch.randperm(c.num_states, generator=gen)[: c.successors]
                    for _ in range(c.num_states)]
            transitions = torch.stack(rows).sort(dim=1).values
        transitions = torch.as_tensor(transitions, dtype=torch.long)
        if tuple(transitions.shape) != (c.num_states, c.successors):
            raise CodebookError(
                f"TokFSM transitions have shape {tuple(transitions.shape)}, expected "
                f"({c.num_states}, {c.successors}); the table does not match the config")
        if transitions.numel() and (transitions.min() < 0 or transitions.max() >= c.num_states):
            raise CodebookError("TokFSM transitions name a state outside 0..num_states-1; "
                                "the table is corrupt, rebuild the FSM")
        adjacency = torch.zeros(c.num_states, c.num_states, dtype=torch.bool)
        adjacency.scatter_(1, transitions, True)
        if int(adjacency.sum()) != c.num_states * c.successors:
            raise CodebookError("TokFSM transitions repeat a successor within a state; "
                                "each state needs distinct successors, rebuild the FSM")
        self.transitions = transitions
        """(num_states, successors) LongTensor: row ``s`` lists the successors of ``s``."""
        self.adjacency = adjacency
        """(num_states, num_states) BoolTensor: ``adjacency[a, b]`` iff a -> b is an edge."""

    # ----------------------------------------------------------------- ground truth
    @property
    def num_states(self) -> int:
        return self.config.num_states

    @property
    def digits(self) -> int:
        return self.config.digits

    def successors(self, state: int) -> list[int]:
        """The successors of ``state``, sorted."""
        self._check_state(state)
        return self.transitions[state].tolist()

    def successor_sets(self) -> list[frozenset[int]]:
        """Every state's successor set, indexed by state."""
        return [frozenset(row) for row in self.transitions.tolist()]

    def is_valid_edge(self, a: int, b: int) -> bool:
        """Whether a -> b is a transition of the machine (False for out-of-range states)."""
        n = self.num_states
        return 0 <= a < n and 0 <= b < n and bool(self.adjacency[a, b])

    def valid_edges(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Element-wise :meth:`is_valid_edge` over tensors (invalid states such as -1 give
        False)."""
        a = torch.as_tensor(a, dtype=torch.long).cpu()
        b = torch.as_tensor(b, dtype=torch.long).cpu()
        n = self.num_states
        ok = (a >= 0) & (a < n) & (b >= 0) & (b < n)
        out = torch.zeros(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.bool)
        a, b, ok = torch.broadcast_tensors(a, b, ok)
        out[ok] = self.adjacency[a[ok], b[ok]]
        return out

    def next_state_distribution(self, state: int) -> torch.Tensor:
        """The true next-state distribution of ``state``: uniform over its successors."""
        self._check_state(state)
        return self.adjacency[state].double() / self.config.successors

    def _check_state(self, state: int) -> None:
        if not 0 <= int(state) < self.num_states:
            raise CodebookError(f"state {state} is outside 0..{self.num_states - 1}; "
                                "pass a state of this FSM")

    # ----------------------------------------------------------------- sampling
    def sample_states(self, n: int, seed: int | None = 0,
                      generator: torch.Generator | None = None,
                      num_states: int | None = None) -> torch.Tensor:
        """(n, num_states or states_per_sequence) walks: uniform start, uniform successors.

        Deterministic given ``seed`` (ignored when a ``generator`` is passed)."""
        if n < 0:
            raise CodebookError(f"sample_states(n={n}): n must be >= 0")
        length = self.config.states_per_sequence if num_states is None else int(num_states)
        if length < 1:
            raise CodebookError(f"sample_states(num_states={length}): must be >= 1")
        if generator is None:
            generator = torch.Generator().manual_seed(derive_seed(seed or 0, "sequences"))
        out = torch.empty(n, length, dtype=torch.long)
        out[:, 0] = torch.randint(self.num_states, (n,), generator=generator)
        if length > 1:
            choices = torch.randint(self.config.successors, (n, length - 1), generator=generator)
            for i in range(1, length):
                out[:, i] = self.transitions[out[:, i - 1], choices[:, i - 1]]
        return out

    def sample(self, n: int, seed: int | None = 0,
               generator: torch.Generator | None = None) -> TokFSMSample:
        """``n`` sequences with token ids and per-position ground truth."""
        states = self.sample_states(n, seed=seed, generator=generator)
        pos_states, digit_index = self.position_states(states)
        return TokFSMSample(states=states, input_ids=self.encode(states),
                            position_states=pos_states, digit_index=digit_index)

    # ----------------------------------------------------------------- encoding
    def state_digits(self, states: torch.Tensor) -> torch.Tensor:
        """(..., digits) digit token ids of each state, most significant first."""
        states = torch.as_tensor(states, dtype=torch.long)
        powers = 10 ** torch.arange(self.digits - 1, -1, -1)
        return (states.unsqueeze(-1) // powers) % 10

    def encode(self, states: torch.Tensor, bos: bool = True) -> torch.Tensor:
        """(n, L) states -> (n, bos + digits * L) token ids (a 1-D input gives 1-D output)."""
        states = torch.as_tensor(states, dtype=torch.long)
        if states.numel() and (states.min() < 0 or states.max() >= self.num_states):
            raise CodebookError(f"encode: states must lie in 0..{self.num_states - 1}")
        toks = self.state_digits(states).flatten(-2)
        if bos:
            pad = torch.full((*toks.shape[:-1], 1), BOS_TOKEN_ID, dtype=torch.long)
            toks = torch.cat([pad, toks], dim=-1)
        return toks

    def decode(self, token_ids: torch.Tensor, bos: bool = True) -> torch.Tensor:
        """Token ids -> states: (n, T) -> (n, (T - bos) // digits).

        A state whose digit slots hold a non-digit token, or which names a number
        >= num_states, decodes to -1. A trailing incomplete state is dropped."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).cpu()
        squeeze = ids.dim() == 1
        if squeeze:
            ids = ids.unsqueeze(0)
        if bos:
            ids = ids[:, 1:]
        d = self.digits
        n_states = ids.shape[1] // d
        slots = ids[:, : n_states * d].reshape(ids.shape[0], n_states, d)
        is_digit = (slots >= 0) & (slots < NUM_DIGIT_TOKENS)
        powers = 10 ** torch.arange(d - 1, -1, -1)
        values = (slots.clamp(0, 9) * powers).sum(-1)
        ok = is_digit.all(-1) & (values < self.num_states)
        states = torch.where(ok, values, torch.full_like(values, -1))
        return states[0] if squeeze else states

    def position_states(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, L) states -> ((n, 1 + digits*L) current state per token position,
        (n, 1 + digits*L) digit index per position); both -1 at BOS."""
        states = torch.as_tensor(states, dtype=torch.long)
        n, length = states.shape
        d = self.digits
        per_tok = states.repeat_interleave(d, dim=1)
        digit = torch.arange(d).repeat(length).expand(n, -1)
        neg = torch.full((n, 1), -1, dtype=torch.long)
        return torch.cat([neg, per_tok], 1), torch.cat([neg, digit], 1)

    def state_string(self, state: int) -> str:
        """The text of one state, e.g. ``'07'``."""
        self._check_state(state)
        return str(int(state)).zfill(self.digits)

    # ----------------------------------------------------------------- HF pieces
    def tokenizer(self, model_max_length: int | None = None):
        """This FSM's character-level ``PreTrainedTokenizerFast`` (see :func:`build_tokenizer`)."""
        return build_tokenizer(model_max_length or max(1024, self.config.seq_len))

    def dataset(self, n: int, seed: int = 0, labels: bool = True):
        """A ``datasets.Dataset`` of ``n`` sequences (see :func:`build_dataset`)."""
        return build_dataset(self, n, seed=seed, labels=labels)

    # ----------------------------------------------------------------- save / load
    def fingerprint(self) -> str:
        """Short sha256 of the config shape and transition table: names this exact FSM."""
        c = self.config
        payload = json.dumps([c.num_states, c.successors, c.digits, self.transitions.tolist()])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """A readable name, e.g. ``tokfsm-100s-10succ-seed0-1a2b3c4d``."""
        c = self.config
        return (f"tokfsm-{c.num_states}s-{c.successors}succ-seed{c.seed}-"
                f"{self.fingerprint()[:8]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description: format, config, transition table and fingerprint."""
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "name": self.name,
                "fingerprint": self.fingerprint(), "config": asdict(self.config),
                "transitions": self.transitions.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokFSM:
        """Inverse of :meth:`to_dict`; checks format, shape and fingerprint."""
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise CodebookError("not a TokFSM description (format != 'tokfsm'); "
                                "pass a file written by TokFSM.save")
        if d.get("version") != FORMAT_VERSION:
            raise CodebookError(f"TokFSM format version {d.get('version')!r} is not supported "
                                f"(expected {FORMAT_VERSION}); upgrade codebook_features")
        known = {f.name for f in fields(TokFSMConfig)}
        cfg = d.get("config") or {}
        unknown = set(cfg) - known
        if unknown:
            raise CodebookError(f"TokFSM config has unknown fields {sorted(unknown)}; "
                                "the file is from a newer version or corrupt")
        try:
            fsm = cls(TokFSMConfig(**cfg), transitions=torch.tensor(d["transitions"]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CodebookError):
                raise
            raise CodebookError(f"TokFSM description is malformed ({e}); save it again") from None
        if "fingerprint" in d and d["fingerprint"] != fsm.fingerprint():
            raise CodebookError("TokFSM fingerprint does not match its table; "
                                "the file was edited or is corrupt, save it again")
        return fsm

    def save(self, path: str | os.PathLike) -> Path:
        """Write the FSM as JSON; a directory path gets ``tokfsm.json`` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokfsm.json"
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokFSM:
        """Read an FSM written by :meth:`save` (a file, or a directory with tokfsm.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokfsm.json"
        return cls.from_dict(read_json(path))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, TokFSM) and self.config == other.config
                and torch.equal(self.transitions, other.transitions))

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return f"TokFSM({self.name})"


def build_tokenizer(model_max_length: int = 1024):
    """The TokFSM tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    Vocabulary: ``'0'..'9'`` -> ids 0..9 and ``<|endoftext|>`` -> id 10 (BOS = EOS = pad =
    unk). Text is split into single characters after whitespace is dropped, so ``"07 42"``
    encodes to ``[0, 7, 4, 2]``; any other character becomes id 10. No BOS is added
    automatically: prepend ``<|endoftext|>`` (or use :meth:`TokFSM.encode`). Saves with
    ``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(NUM_DIGIT_TOKENS)}
    vocab[BOS_TOKEN] = BOS_TOKEN_ID
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=BOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split("", behavior="isolated")])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=BOS_TOKEN, pad_token=BOS_TOKEN,
        unk_token=BOS_TOKEN, model_max_length=model_max_length)


def build_dataset(fsm: TokFSM, n: int, seed: int = 0, labels: bool = True):
    """A ``datasets.Dataset`` of ``n`` TokFSM sequences for the HF Trainer.

    Columns: ``input_ids`` (lists of ``seq_len`` ints, BOS first) and, if ``labels``, a copy
    in ``labels`` (causal LMs shift labels themselves). All rows have the same length, so the
    default data collator needs no padding. Deterministic given ``(fsm, n, seed)``.
    """
    from datasets import Dataset

    if n < 1:
        raise CodebookError(f"build_dataset(n={n}): need at least one sequence")
    ids = fsm.sample(n, seed=seed).input_ids.tolist()
    cols: dict[str, list] = {"input_ids": ids}
    if labels:
        cols["labels"] = [list(r) for r in ids]
    return Dataset.from_dict(cols)


def build_splits(fsm: TokFSM, n_train: int, n_eval: int, seed: int = 0, labels: bool = True):
    """A ``datasets.DatasetDict`` with ``train`` and ``eval`` splits drawn from independent
    streams (seeds derived from ``seed``); deterministic given the arguments."""
    from datasets import DatasetDict

    return DatasetDict({
        "train": build_dataset(fsm, n_train, seed=derive_seed(seed, "train"), labels=labels),
        "eval": build_dataset(fsm, n_eval, seed=derive_seed(seed, "eval"), labels=labels),
    })
