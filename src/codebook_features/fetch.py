"""A saved folder from a local path or a Hugging Face hub id (downloaded with
``huggingface_hub``, its cache honoured, offline when the files are cached)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CodebookError

PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "README.md")
"""Files fetched from a hub repo: configs, weights, tokenizer files and the model card."""


def looks_like_hub_id(name: str) -> bool:
    """``user/repo`` (or ``repo``) with no path syntax: what the hub accepts as a repo id."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return False
    return all(part and part.replace("-", "").replace("_", "").replace(".", "").isalnum()
               for part in name.split("/"))


def local_folder(name_or_path: str | os.PathLike, what: str = "codebooks") -> Path:
    """The local folder for ``name_or_path``: the folder itself, or a hub repo's snapshot.

    A hub id is fetched with ``huggingface_hub.snapshot_download`` into its cache; with
    ``HF_HUB_OFFLINE=1``, or when the hub cannot be reached, a cached snapshot is used.
    """
    name = os.path.expanduser(str(name_or_path))
    if os.path.isdir(name):
        return Path(name)
    if not looks_like_hub_id(name):
        raise CodebookError(f"{what} folder {name!r} not found; check the path")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise CodebookError(f"{what} {name!r}: not a folder, and huggingface_hub is not "
                            "installed to fetch it from the hub") from None
    try:
        return Path(snapshot_download(name, allow_patterns=list(PATTERNS)))
    except RepositoryNotFoundError:
        raise CodebookError(f"{what} {name!r}: no such folder, and no such repo on the hub "
                            "(or it is private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise CodebookError(f"{what} {name!r}: not a local folder, and not in the hub cache "
                            "while offline; connect once (HF_HUB_OFFLINE=0) or give a "
                            "folder") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CodebookError(f"{what} {name!r}: cannot fetch it from the hub ({first})") from None
