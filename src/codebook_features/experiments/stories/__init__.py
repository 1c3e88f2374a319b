"""The story workload: generated children's stories with topics (the TinyStories stand-in).

:mod:`.topics` (topics and templates), :mod:`.corpus` (generation, corpus files),
:mod:`.tokenizer` (tokenizer, LM rows, a tiny model) and :mod:`.job` (the ``stories``
command: train, add codebooks, evaluate, index, find topic codes, steer).
"""

from .corpus import (
    StoryConfig,
    generate_stories,
    generate_story,
    read_corpus,
    split_sentences,
    story_topics,
    write_corpus,
)
from .tokenizer import (
    build_story_dataset,
    pack_stories,
    story_rows,
    tiny_story_model_config,
    train_story_tokenizer,
)
from .topics import (
    BOY_NAMES,
    EOS_TOKEN,
    GENERIC_ENDINGS,
    GENERIC_MIDDLES,
    GENERIC_OPENINGS,
    GENERIC_SLOTS,
    GIRL_NAMES,
    TOPIC_NAMES,
    TOPICS,
    Topic,
    mentions_topic,
    topic_mentions,
    topic_regex,
    topic_words,
)

__all__ = ["BOY_NAMES", "EOS_TOKEN", "GENERIC_ENDINGS", "GENERIC_MIDDLES", "GENERIC_OPENINGS",
           "GENERIC_SLOTS", "GIRL_NAMES", "TOPICS", "TOPIC_NAMES", "StoryConfig", "Topic",
           "build_story_dataset", "generate_stories", "generate_story", "mentions_topic",
           "pack_stories", "read_corpus", "split_sentences", "story_rows", "story_topics",
           "tiny_story_model_config", "topic_mentions", "topic_regex", "topic_words",
           "train_story_tokenizer", "write_corpus"]
