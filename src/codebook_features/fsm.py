"""Deprecated: moved to :mod:`codebook_features.experiments.tokfsm.metrics` (the general LM
utilities, ``lm_metrics`` and sampling, to :mod:`codebook_features.lm`)."""

from ._deprecated import forward

__getattr__ = forward(__name__, "codebook_features.experiments.tokfsm.metrics",
                      "codebook_features.lm")
