"""The index folder's layout: its format, the shard files' names, the grid's and the counts'
columns, and the checks of a shard's files."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

META_NAME = "meta.json"


FORMAT = "codebook-features/code-index"


FORMAT_VERSION = 2


KINDS = ("tokens", "codes", "docs")


ARRAYS = ("grid", "counts")


VERIFY_BYTES = 256 << 20
"""Opening an index checks every shard file's checksum when they total at most this many
bytes (else sizes and structure only; ``verify_shards(..., checksums=True)`` checks all)."""


def file_check(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, as recorded for each shard file in ``meta.json``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def shard_damage(path: Path, shard: dict[str, Any], width: int, checksums: bool = True
                 ) -> str | None:
    """Why shard ``shard`` of the index at ``path`` is damaged (a file missing, of another
    size or checksum than recorded, or unreadable), or None when it is whole. ``width``: the
    grid's columns. Shards recorded without checks (older indexes) are checked for
    structure only."""
    import pyarrow.parquet as pq

    checks = shard.get("checks") or {}
    for kind, name in shard["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        want = checks.get(kind)
        if want is not None and f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {want['bytes']} were written"
        try:
            if name.endswith(".npy"):
                a = np.load(f, mmap_mode="r")
                shape = ((shard["tokens"], width) if kind == "grid" else a.shape)
                if a.shape != shape or a.dtype not in (np.int32, np.int64):
                    return f"{name} holds an array of shape {a.shape}, expected {shape}"
                del a
            else:
                rows = pq.read_metadata(f).num_rows
                if kind == "tokens" and rows != shard["tokens"]:
                    return f"{name} holds {rows} rows, expected {shard['tokens']}"
        except (OSError, ValueError) as e:
            return f"{name} is unreadable ({' '.join(str(e).split())[:120]})"
        if checksums and want is not None and file_check(f)["sha256"] != want["sha256"]:
            return f"{name} does not match its recorded checksum"
    return None


def shard_file(shard: int, kind: str) -> str:
    """File name of one table (``tokens``, ``codes`` or ``docs``) or array (``grid``,
    ``counts``) of shard ``shard``."""
    ext = "npy" if kind in ARRAYS else "parquet"
    return f"shard-{shard:05d}.{kind}.{ext}"


def grid_columns(sites: Sequence[dict[str, Any]]) -> list[int]:
    """First grid column of each site (sites in index order), plus the total width."""
    return np.cumsum([0] + [s["groups"] * s["k"] for s in sites]).tolist()


def count_offsets(sites: Sequence[dict[str, Any]]) -> list[int]:
    """First entry of each site in a counts array (sites in index order), plus its length."""
    return np.cumsum([0] + [s["groups"] * s["num_codes"] for s in sites]).tolist()
