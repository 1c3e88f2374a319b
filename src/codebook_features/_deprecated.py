"""Old module paths kept for one release: each warns and forwards to the module's new home."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def forward(old: str, *new: str, warn: bool = True) -> Callable[[str], Any]:
    """Warn that module ``old`` moved to ``new[0]``; return the ``__getattr__`` for ``old``
    that finds each name in the ``new`` modules, in order."""
    if warn:
        warnings.warn(f"{old} is deprecated: import from {new[0]} instead (the old path goes "
                      "in the next release)", DeprecationWarning, stacklevel=3)
    modules = [importlib.import_module(n) for n in new]

    def __getattr__(name: str) -> Any:
        for m in modules:
            if hasattr(m, name):
                return getattr(m, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
