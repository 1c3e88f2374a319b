"""Seeds derived per purpose, so that each part of an experiment's data is stable on its own."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, tag: str) -> int:
    """A seed for one purpose (``tag``) derived from a base seed, stable across runs."""
    digest = hashlib.sha256(f"{int(seed)}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)
