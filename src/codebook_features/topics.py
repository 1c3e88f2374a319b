"""Topic vocabularies: what counts as a text mentioning a topic.

Steering (:func:`codebook_features.steering.topic_steering_eval`) and the codebook/SAE
comparison's code search count a topic when its regex matches. The word lists here are the
ones the paper's topic-steering evaluation needs for its TinyStories topics; the stories
experiment (:mod:`codebook_features.experiments.stories`) builds its stories from the same
lists, so that a story of a topic mentions it. Any other topic is given by a regex of the
caller's, or matched by its name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .errors import CodebookError

TOPIC_WORDS: dict[str, tuple[str, ...]] = {
    "dragon": ("dragons?",),
    "flower": ("flowers?", "petals?", "bloom\\w*", "tulips?", "daisy", "daisies",
               "sunflowers?", "lilies"),
    "fire": ("fires?", "campfires?", "fireplace", "firefighters?", "fire truck", "flames?",
             "smoke"),
    "baby": ("bab(?:y|ies)", "crib", "rattle", "cradle", "stroller"),
    "princess": ("princess(?:es)?", "prince", "castles?", "crowns?", "queen", "king", "kingdom",
                 "royal"),
    "ocean": ("oceans?", "seas?", "beach(?:es)?", "waves?", "seashells?", "shells?", "whales?",
              "sandcastles?"),
    "dog": ("dogs?", "pupp(?:y|ies)", "bark(?:s|ed|ing)?", "woof"),
    "rain": ("rain\\w*", "umbrellas?", "puddles?", "storms?", "thunder"),
    "music": ("music\\w*", "songs?", "sing(?:s|ing|er|ers)?", "sang", "pianos?", "drums?",
              "guitars?", "violins?", "flutes?", "trumpets?", "melody"),
    "space": ("space\\w*", "rockets?", "astronauts?", "planets?", "moon", "stars?", "aliens?"),
}
"""Regex alternatives (whole words, case-insensitive) that count as mentioning each topic."""


def words_regex(words: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled regex matching any of ``words`` as whole words, case-insensitive."""
    return re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE)


def topic_pattern(topic: str, patterns: Mapping[str, str] | None = None, *,
                  prefix: bool = False) -> re.Pattern[str]:
    """The regex that counts a mention of ``topic``: ``patterns[topic]`` when given, else the
    topic's words in :data:`TOPIC_WORDS`, else the topic's name as a whole word (with
    ``prefix``: as the start of a word, so "dragon" also matches "dragons")."""
    if patterns and topic in patterns:
        try:
            return re.compile(patterns[topic], re.IGNORECASE)
        except re.error as e:
            raise CodebookError(f"topic {topic!r}: regex {patterns[topic]!r} does not compile "
                                f"({e}); fix the pattern") from None
    if topic in TOPIC_WORDS:
        return words_regex(TOPIC_WORDS[topic])
    tail = r"\w*" if prefix else r"\b"
    return re.compile(r"\b" + re.escape(topic) + tail, re.IGNORECASE)
