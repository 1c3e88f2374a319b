"""Atomic writes of JSON and safetensors files: a crash never leaves a half-written file.

Files are created with the permissions the umask gives (as ``open`` would), not
``mkstemp``'s 0600. :func:`fault_point` is the test hook that kills the process at a chosen
point (the N-th atomic write, checkpoint, index shard, ...) to check that interrupted work
resumes to the same end.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CodebookError

FAULT_ENV = "CODEBOOK_FEATURES_FAULT"
"""``KIND:N`` or ``KIND@NAME:N`` (comma-separated for several): :func:`fault_point` kills the
process with SIGKILL the N-th time it reaches a point of that kind (of that file name). For
fault-injection tests only."""
_FAULT_COUNTS: dict[str, int] = {}


def fault_point(kind: str, name: str | None = None) -> None:
    """Count a point of kind ``kind`` (``write``: an atomic write about to be renamed into
    place, ``written``: one just renamed, ``checkpoint``, ``shard``, ...) and, with ``name``
    (the file's), of ``kind@name``; SIGKILL this process when ``$CODEBOOK_FEATURES_FAULT``
    names one of them and its count. Does nothing otherwise."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    reached = {}
    for key in (kind, f"{kind}@{name}") if name else (kind,):
        _FAULT_COUNTS[key] = reached[key] = _FAULT_COUNTS.get(key, 0) + 1
    for item in spec.split(","):
        key, _, count = item.strip().rpartition(":")
        if key in reached and count.strip().isdigit() and int(count) == reached[key]:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def umask() -> int:
    """The process's umask (read without changing it where Linux shows it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def writable_dir(path: str | os.PathLike, create: bool = True) -> Path:
    """Create the folder ``path`` (and its parents) if needed and check that files can be
    created in it, before any work that would write there: an OSError naming ``path``
    otherwise (a file in the way, a read-only folder or file system), which the CLI prints
    as one line. ``create=False``: check without creating anything (the nearest existing
    folder must be writable)."""
    import errno

    p = Path(path)
    at = p.absolute()  # the nearest existing folder; a file there is named as the blocker
    while not at.exists() and at != at.parent:
        at = at.parent
    if not at.is_dir():
        code = errno.ENOTDIR if at != p.absolute() else errno.EEXIST
        raise OSError(code, os.strerror(code), str(at))
    if os.statvfs(at).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(at))
    if not os.access(at, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(at))
    if not create:
        return p
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(p)) from None
    return p


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)  # (some writers, safetensors', make the file anew)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 -> what open() would give
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        fault_point("write", path.name)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # killed writes'
        with contextlib.suppress(OSError):
            stale.unlink()
    fault_point("written", path.name)


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


def load_tokenizer(name: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(name, **kwargs)`` with every failure (no such folder or
    hub name, an empty or broken folder, a tokenizer that needs a missing library) turned
    into a one-line CodebookError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name), **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise CodebookError(f"cannot load a tokenizer from {str(name)!r} ({why}); pass a "
                            "folder or hub name that holds one") from None


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


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled`` False, no progress bar at all for the duration: the Trainer's (its
    ``disable_tqdm``), and those of ``datasets`` (loading, packing), ``transformers`` (loading
    and writing weights) and ``huggingface_hub``; each is restored afterwards."""
    if enabled:
        yield
        return
    import datasets
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    switches = [(datasets.is_progress_bar_enabled(), datasets.disable_progress_bars,
                 datasets.enable_progress_bars),
                (hf_logging.is_progress_bar_enabled(), hf_logging.disable_progress_bar,
                 hf_logging.enable_progress_bar),
                (not hub_utils.are_progress_bars_disabled(), hub_utils.disable_progress_bars,
                 hub_utils.enable_progress_bars)]
    for _, off, _ in switches:
        off()
    try:
        yield
    finally:
        for was_on, _, on in switches:
            if was_on:
                on()


@contextlib.contextmanager
def quiet_transformers(bars: bool = False) -> Iterator[None]:
    """Only transformers' errors logged and, unless ``bars``, no progress bars (as
    :func:`progress_bars`) for the duration, for commands whose output is a report, a table
    or JSON; both restored afterwards."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with progress_bars(bars):
            yield
    finally:
        hf_logging.set_verbosity(level)
