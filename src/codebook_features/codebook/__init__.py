"""``CodebookLayer``: a sparse, discrete bottleneck for one activation site.

``y = combine(top-k codes of LayerNorm(a))`` replaces the activation ``a``. Groups live in one
``(G, C, d/G)`` parameter. The layer keeps usage statistics, replaces dead codes, can be
initialised by k-means, and carries intervention state (read, replace, append, ablate, bypass).

One module a part: :mod:`.config` (the settings), :mod:`.layer` (:class:`CodebookLayer`),
:mod:`.usage` (usage statistics and dead codes) and :mod:`.interventions`; every name is
importable from here.
"""

from __future__ import annotations

from .config import LAYERNORM_SCOPES, MSE_REDUCTIONS, CodebookConfig, CodebookSettings
from .interventions import Intervention
from .layer import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CodebookLayer,
    GroupLayerNorm,
    _all_finite,  # noqa: F401
    _in_backward,  # noqa: F401
)
from .usage import RECENT_ROWS, CodebookStats

__all__ = ["CONFIG_NAME", "LAYERNORM_SCOPES", "MSE_REDUCTIONS", "RECENT_ROWS", "WEIGHTS_NAME",
           "CodebookConfig", "CodebookLayer", "CodebookSettings", "CodebookStats",
           "GroupLayerNorm", "Intervention"]
