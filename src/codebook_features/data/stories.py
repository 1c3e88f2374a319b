"""Deprecated: moved to :mod:`codebook_features.experiments.stories`."""

from .._deprecated import forward

__getattr__ = forward(__name__, "codebook_features.experiments.stories",
                      "codebook_features.experiments.stories.topics",
                      "codebook_features.experiments.stories.corpus",
                      "codebook_features.experiments.stories.tokenizer")
