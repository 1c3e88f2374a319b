"""Topic vocabularies (codebook_features.topics): one regex per topic for steering and search."""

from __future__ import annotations

import pytest

from codebook_features.compare import topic_patterns
from codebook_features.errors import CodebookError
from codebook_features.experiments.stories import TOPIC_NAMES, topic_regex
from codebook_features.steering import _topic_matcher
from codebook_features.topics import TOPIC_WORDS, topic_pattern


def test_known_topics_use_their_words_everywhere():
    assert set(TOPIC_WORDS) == set(TOPIC_NAMES)  # the stories are built from the same lists
    text = "They found three puppies by the sea."
    for topic, hit in (("dog", True), ("ocean", True), ("dragon", False)):
        assert bool(topic_pattern(topic).search(text)) is hit
        assert topic_regex(topic).pattern == topic_pattern(topic).pattern
        assert topic_patterns([topic])[topic].pattern == topic_pattern(topic).pattern
        assert _topic_matcher(topic, None)(text) is hit


def test_other_topics_match_their_name_or_the_callers_regex():
    assert topic_pattern("robot").search("A ROBOT walked.")
    assert not topic_pattern("robot").search("robots walked.")  # a whole word
    assert topic_pattern("robot", prefix=True).search("robots walked.")  # steering's rule
    assert _topic_matcher("robot", None)("robots walked.")
    assert topic_patterns(["dog"], {"dog": r"\bhound\b"})["dog"].search("a Hound")
    assert not topic_pattern("dog", {"dog": r"\bhound\b"}).search("a dog")
    with pytest.raises(CodebookError, match=r"topic 'dog': regex '\(hound' does not compile"):
        topic_pattern("dog", {"dog": "(hound"})
