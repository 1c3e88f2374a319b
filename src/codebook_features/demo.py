"""Deprecated: moved to :mod:`codebook_features.experiments.tokfsm.job`."""

from ._deprecated import forward

__getattr__ = forward(__name__, "codebook_features.experiments.tokfsm.job")
