"""Codebook Features: sparse, discrete codebook bottlenecks for transformer language models.

The public names below load on first use (PEP 562), so that ``codebook-features --help`` and
the light modules (errors, configs) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import CodebookError

if TYPE_CHECKING:
    from .codebook import CodebookConfig, CodebookLayer, CodebookStats, Intervention
    from .model import CodebookModel, CodebookModelConfig

__all__ = ["CodebookConfig", "CodebookError", "CodebookLayer", "CodebookModel",
           "CodebookModelConfig", "CodebookStats", "Intervention"]
__version__ = "0.1.0"

_HOMES = {"CodebookConfig": "codebook", "CodebookLayer": "codebook", "CodebookStats": "codebook",
          "Intervention": "codebook", "CodebookModel": "model", "CodebookModelConfig": "model"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
