"""Codebook Features: sparse, discrete codebook bottlenecks for transformer language models."""

from .codebook import CodebookConfig, CodebookLayer, CodebookStats, Intervention
from .errors import CodebookError

__all__ = ["CodebookConfig", "CodebookError", "CodebookLayer", "CodebookStats", "Intervention"]
__version__ = "0.1.0"
