"""What the searches return: a code's contexts, its statistics, its match against a set of
token positions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Context:
    """One occurrence of a code: the token and the text around it."""

    doc: int
    position: int
    before: str
    token: str
    after: str
    score: float


@dataclass(frozen=True)
class CodeStats:
    """How often a code fires and on which tokens."""

    count: int
    """Token positions where the code is among the chosen codes (of its group)."""
    frequency: float
    """``count`` over all indexed tokens."""
    tokens: list[tuple[str, int]]
    """Most common tokens it fires on: (token text, count), most common first."""
    next_tokens: list[tuple[str, int]]
    """Most common tokens that follow the ones it fires on in the corpus (the next token of
    the same document)."""
    predicted_next_tokens: list[tuple[str, int]] | None = None
    """Most common next tokens the model itself predicts where the code fires (its top-1
    prediction, recorded when the index was built); None for an index built before
    predictions were recorded."""


@dataclass(frozen=True)
class CodeMatch:
    """A code's precision and recall on the token positions a regex matches."""

    group: int
    code: int
    precision: float
    recall: float
    fired: int
    """Token positions where the code fires."""
    hits: int
    """Of those, positions that overlap a match."""
    neuron_precision: float | None = None
    """Best neuron's precision when thresholded to at least the same recall (if given)."""
