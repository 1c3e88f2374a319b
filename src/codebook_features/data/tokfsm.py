"""Deprecated: moved to :mod:`codebook_features.experiments.tokfsm.data`."""

from .._deprecated import forward

# Quiet until the TokFSM demo imports the new path (it is being tuned now).
__getattr__ = forward(__name__, "codebook_features.experiments.tokfsm.data", warn=False)
