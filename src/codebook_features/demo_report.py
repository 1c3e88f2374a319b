"""Deprecated: moved to :mod:`codebook_features.experiments.tokfsm.report`."""

from ._deprecated import forward

__getattr__ = forward(__name__, "codebook_features.experiments.tokfsm.report")
