"""Text datasets for training and evaluation: :mod:`.text` (hub, folders, files; packing).

The TokFSM task and the generated stories moved to :mod:`codebook_features.experiments`; their
names are still found here, with a DeprecationWarning, for one release.
"""

from __future__ import annotations

from typing import Any

_MOVED = ("BOS_TOKEN", "BOS_TOKEN_ID", "VOCAB_SIZE", "TokFSM", "TokFSMConfig", "TokFSMSample",
          "build_dataset", "build_splits", "build_tokenizer")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib
        import warnings

        new = "codebook_features.experiments.tokfsm"
        warnings.warn(f"codebook_features.data.{name} is deprecated: import it from {new} "
                      "(the old path goes in the next release)", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(new), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
