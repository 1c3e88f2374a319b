"""Evaluation of codebook models: the paper's Table 2 and the standard SAE evaluation.

:mod:`.metrics` (``evaluate_codebooks``, log keys, the table), :mod:`.standard` (CE loss
recovered, KL, explained variance, L0, alive codes, per site) and :mod:`.job` (the ``eval``
command).
"""

from .metrics import (
    DENSITY_PLOT,
    STANDARD_COLUMNS,
    evaluate_codebooks,
    flat_metrics,
    format_table,
)
from .standard import KEYS, standard_evaluation

__all__ = ["DENSITY_PLOT", "KEYS", "STANDARD_COLUMNS", "evaluate_codebooks", "flat_metrics",
           "format_table", "standard_evaluation"]
