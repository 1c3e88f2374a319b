"""Generated children's stories with topics: the project's stand-in for TinyStories (DESIGN §2).

Each story is 3–8 sentences of simple English ("Once upon a time, there was a little girl
named Lily. ...") about one main **topic** (dragon, flower, fire, baby, princess, ocean, dog,
rain, music, space). A story is assembled from templates with slots (names, places, colours,
feelings, weather, topic objects): an opening, a topic introduction that always names the
topic, middle sentences that are topic sentences or shared generic sentences, and an ending.
Generation is deterministic given the seed, and story ``i`` depends only on ``(seed, i)``.

:func:`topic_regex` is what "mentions the topic" means in the steering evaluation: the
topic's core words (e.g. ``dragon``/``dragons``; ``flower``, ``petals``, ``bloom``...).
Generic sentences mention no topic; topic sentences mention no other topic, except that
dragons sometimes breathe fire.

The topics and templates are in :mod:`.topics`; this module generates the stories and
writes and reads them as a JSON-lines corpus; :mod:`.tokenizer` turns them into LM data.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import CodebookError
from ..seeds import derive_seed
from .topics import (
    GENERIC_ENDINGS,
    GENERIC_MIDDLES,
    GENERIC_OPENINGS,
    TOPIC_NAMES,
    _check_topic,
    _fill,
    _story_slots,
)


# --------------------------------------------------------------------------- generation
@dataclass
class StoryConfig:
    """What :func:`generate_stories` writes."""

    num_stories: int = 10000
    topics: tuple[str, ...] = field(default_factory=lambda: TOPIC_NAMES)
    """Main topics, assigned in balanced shuffled rounds (each round has every topic once)."""
    seed: int = 0
    min_sentences: int = 3
    max_sentences: int = 8
    topic_prob: float = 0.65
    """Chance that a middle sentence is a topic sentence rather than a generic one."""

    def __post_init__(self) -> None:
        self.topics = tuple(self.topics)
        self.validate()

    def validate(self) -> None:
        """Raise CodebookError for an impossible configuration."""
        for name in ("num_stories", "seed", "min_sentences", "max_sentences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise CodebookError(f"StoryConfig.{name}={v!r}: must be an integer")
        if self.num_stories < 1:
            raise CodebookError(f"StoryConfig.num_stories={self.num_stories}: must be >= 1")
        if not self.topics:
            raise CodebookError("StoryConfig.topics is empty; name at least one topic")
        for t in self.topics:
            _check_topic(t)
        if len(set(self.topics)) != len(self.topics):
            raise CodebookError(f"StoryConfig.topics={self.topics}: a topic is repeated")
        if not 2 <= self.min_sentences <= self.max_sentences:
            raise CodebookError(
                f"StoryConfig sentences {self.min_sentences}..{self.max_sentences}: need "
                "2 <= min_sentences <= max_sentences")
        if not 0.0 <= float(self.topic_prob) <= 1.0:
            raise CodebookError(f"StoryConfig.topic_prob={self.topic_prob}: must be in [0, 1]")


def generate_story(topic: str, rng: random.Random, min_sentences: int = 3,
                   max_sentences: int = 8, topic_prob: float = 0.65) -> str:
    """One story about ``topic`` drawn with ``rng``.

    Plan: opening (topic-flavoured half the time), topic introduction, middle sentences
    (topic sentences with chance ``topic_prob``, else generic; no template twice), ending
    (a topic ending 70% of the time). At least two sentences are topic sentences.
    """
    t = _check_topic(topic)
    slots = _story_slots(rng)
    n = rng.randint(min_sentences, max_sentences)
    opening = rng.choice(t.openings if rng.random() < 0.5 else GENERIC_OPENINGS)
    plan = [opening, rng.choice(t.intros)]
    if n >= 3:
        middles_t = list(t.middles)
        middles_g = list(GENERIC_MIDDLES)
        rng.shuffle(middles_t)
        rng.shuffle(middles_g)
        for _ in range(n - 3):
            pool = middles_t if (rng.random() < topic_prob and middles_t) or not middles_g \
                else middles_g
            plan.append(pool.pop())
        topic_count = sum(s in t.middles or s in t.openings for s in plan) + 1
        use_topic_end = rng.random() < 0.7 or topic_count < 2
        plan.append(rng.choice(t.endings if use_topic_end else GENERIC_ENDINGS))
    return " ".join(_fill(s, rng, slots, t) for s in plan[:n])


def story_topics(config: StoryConfig) -> list[str]:
    """The main topic of every story of ``config``: balanced shuffled rounds."""
    out: list[str] = []
    rounds = -(-config.num_stories // len(config.topics))
    for r in range(rounds):
        order = list(config.topics)
        random.Random(derive_seed(config.seed, f"stories-round{r}")).shuffle(order)
        out.extend(order)
    return out[: config.num_stories]


def generate_stories(config: StoryConfig | None = None, **overrides: Any) -> list[dict[str, Any]]:
    """``config.num_stories`` stories as ``{"text", "topic"}`` dicts, deterministic given the
    config; story ``i`` depends only on ``(seed, i)`` and its topic. Keyword arguments
    override config fields (``generate_stories(num_stories=100, seed=1)``)."""
    config = config or StoryConfig()
    if overrides:
        try:
            config = StoryConfig(**{**config.__dict__, **overrides})
        except TypeError as e:
            raise CodebookError(f"generate_stories: {e}; pass StoryConfig fields") from None
    config.validate()
    out = []
    for i, topic in enumerate(story_topics(config)):
        rng = random.Random(derive_seed(config.seed, f"story{i}"))
        text = generate_story(topic, rng, config.min_sentences, config.max_sentences,
                              config.topic_prob)
        out.append({"text": text, "topic": topic})
    return out


_SENTENCE_END = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]"))\s+(?=[A-Z"])')


def split_sentences(text: str) -> list[str]:
    """Split a story into sentences (after ``.``, ``!`` or ``?``, closing quotes kept)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


# --------------------------------------------------------------------------- files
def _texts(stories: Iterable[Mapping[str, Any] | str]) -> list[str]:
    return [s if isinstance(s, str) else str(s["text"]) for s in stories]


def write_corpus(path: str | os.PathLike, stories: Sequence[Mapping[str, Any]] | None = None,
                 config: StoryConfig | None = None) -> Path:
    """Write stories (or ``generate_stories(config)``) to ``path``: ``.txt`` holds one story
    per line, ``.jsonl`` one ``{"text", "topic"}`` object per line. Returns the path."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise CodebookError(f"write_corpus({path}): unknown format; name a .txt or .jsonl file")
    if stories is None:
        stories = generate_stories(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for s in stories:
            if path.suffix == ".txt":
                f.write(_texts([s])[0].replace("\n", " ") + "\n")
            else:
                f.write(json.dumps(dict(s), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_corpus(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a corpus written by :func:`write_corpus` (``.txt`` rows have only ``text``)."""
    path = Path(path)
    if not path.is_file():
        raise CodebookError(f"{path}: file not found; check the path or call write_corpus")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return [{"text": ln} for ln in lines]
    try:
        return [json.loads(ln) for ln in lines]
    except json.JSONDecodeError as e:
        raise CodebookError(f"{path}: line is not JSON ({e.msg}); write the corpus again") \
            from None
