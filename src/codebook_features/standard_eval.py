"""Deprecated: moved to :mod:`codebook_features.evaluation.standard`."""

from ._deprecated import forward

__getattr__ = forward(__name__, "codebook_features.evaluation.standard")
