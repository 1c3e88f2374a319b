"""Deprecated: moved to :mod:`codebook_features.training.job` (its config: ``training.config``)."""

from ._deprecated import forward

__getattr__ = forward(__name__, "codebook_features.training.job",
                      "codebook_features.training.config", "codebook_features.training.network")
