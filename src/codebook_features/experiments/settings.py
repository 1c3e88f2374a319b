"""What the experiment jobs share: their Trainer arguments and ``--set KEY=VALUE`` overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import CodebookError
from ..io import writable_dir

__all__ = ["apply_overrides", "prepare_run", "train_args"]

def train_args(cls, out: Path, batch: int, seed: int, steps: int, lr: float, **kw: Any):
    """Trainer arguments of the demo jobs (``cls``: TrainingArguments or a subclass): no
    checkpoints, no reporting, CPU unless CUDA; ``kw`` adds or overrides settings."""
    settings: dict[str, Any] = dict(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(50, steps // 10), weight_decay=0.0, logging_steps=max(1, steps // 5),
        save_strategy="no", report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=False, log_level="warning")
    return cls(**{**settings, **kw})


def apply_overrides(cfg: Any, items: list[str], frozen: tuple[str, ...] = ()) -> Any:
    """``cfg`` (a dataclass) with ``KEY=VALUE`` settings applied; a tuple field takes
    comma-separated values of its elements' type."""
    fields = {f.name for f in dataclasses.fields(cfg)} - set(frozen)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise CodebookError(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                                f"{sorted(fields)}")
        current = getattr(cfg, key)
        try:
            if isinstance(current, tuple):
                kind = type(current[0]) if current else str
                parsed: Any = tuple(kind(v) for v in value.split(",") if v)
            elif isinstance(current, bool):
                parsed = value.lower() in ("1", "true", "yes")
            else:
                parsed = type(current)(value)
        except ValueError:
            raise CodebookError(f"--set {item!r}: {key} needs a {type(current).__name__}"
                                ) from None
        cfg = dataclasses.replace(cfg, **{key: parsed})
    return cfg


def prepare_run(out: str | Path, threads: int = 0) -> Path:
    """A job's start: torch's thread count (0: left as is) and its output folder, checked to be
    writable before any work (one line if not)."""
    if threads:
        torch.set_num_threads(threads)
    return writable_dir(out)
