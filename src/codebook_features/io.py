"""Atomic writes of JSON and safetensors files: a crash never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CodebookError


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_replace(Path(path), write)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning a missing or corrupt file into a CodebookError."""
    path = Path(path)
    if not path.is_file():
        raise CodebookError(f"{path}: file not found; check the path")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CodebookError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); "
                            "the file is corrupt, save it again") from None


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors to a safetensors file atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_replace(Path(path), lambda tmp: save_file(tensors, tmp, metadata=dict(metadata or {})))


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing or corrupt file into a CodebookError."""
    path = Path(path)
    if not path.is_file():
        raise CodebookError(f"{path}: file not found; check the path")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CodebookError(f"{path}: cannot read safetensors ({e}); the file is corrupt or "
                            "truncated, save it again") from None
