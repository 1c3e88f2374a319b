"""Codebook Features: sparse, discrete codebook bottlenecks for transformer language models."""

from .codebook import CodebookConfig, CodebookLayer, CodebookStats, Intervention
from .errors import CodebookError
from .model import CodebookModel, CodebookModelConfig

__all__ = ["CodebookConfig", "CodebookError", "CodebookLayer", "CodebookModel",
           "CodebookModelConfig", "CodebookStats", "Intervention"]
__version__ = "0.1.0"
