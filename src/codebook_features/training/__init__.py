"""Training codebooks: the Trainer and its checkpoints, the train command's config and job.

:mod:`.trainer` (``CodebookTrainer``, ``CodebookTrainingArguments``, k-means initialisation,
dead-code replacement, crash-safe checkpoints), :mod:`.config` (the YAML config),
:mod:`.network` (hub and wandb without a network) and :mod:`.job` (the ``train`` command).
The trainer's names are importable from here; they load ``transformers.Trainer`` on first use,
so that reading a config stays light.
"""

from __future__ import annotations

from typing import Any

_TRAINER_NAMES = ("CodebookTrainer", "CodebookTrainingArguments", "DeadCodeCallback",
                  "RUNTIME_SETTINGS", "STAGING_PREFIX", "check_checkpoint_config",
                  "kmeans_init_codebooks", "last_complete_checkpoint", "replace_dead_codes")
__all__ = list(_TRAINER_NAMES)


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_TRAINER_NAMES])
