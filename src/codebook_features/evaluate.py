"""Deprecated: moved to :mod:`codebook_features.evaluation` (the command: ``evaluation.job``)."""

from ._deprecated import forward

__getattr__ = forward(__name__, "codebook_features.evaluation", "codebook_features.evaluation.job")
