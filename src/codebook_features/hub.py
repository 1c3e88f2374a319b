"""Sharing codebooks on the Hugging Face Hub: :func:`push_to_hub` and ``codebook-features push``.

A pushed folder is what :meth:`CodebookModel.save_codebooks` wrote (the codebooks, their
config and the model card ``README.md``; with a finetuned base model, its weights too).
Fetching is ``CodebookModel.from_pretrained("user/repo")``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import CodebookError

IGNORE = [".*", "**/.*", "checkpoint-*/**", "runs/**"]
"""Never uploaded: hidden files (atomic writes' temporaries), training checkpoints, logs."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a hub call raises: OSError (HTTP errors, offline mode), ValueError (arguments
    the client refuses) and the errors of the HTTP clients huggingface_hub may use."""
    import importlib

    errors: list[type[BaseException]] = [OSError, ValueError]
    for mod, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"),
                      ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_error(e: BaseException, repo_id: str, endpoint: str) -> CodebookError:
    """One line for a failed hub call, naming the fix."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return CodebookError("HF_HUB_OFFLINE is set: pushing needs the network; unset it")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        fix = {401: "the token is invalid or expired; log in again (hf auth login) or pass "
                    "--token",
               403: f"the token may not write to {repo_id}; use a write token or a repo you "
                    "own",
               404: f"no repo {repo_id} and it could not be created; check the owner name"
               }.get(status, "check the repo id and the token")
        return CodebookError(f"the hub refused {repo_id} (HTTP {status}: {_first_line(e)}); "
                             f"{fix}")
    if isinstance(e, ValueError):
        return CodebookError(f"cannot push to {repo_id}: {_first_line(e)}")
    return CodebookError(f"cannot reach the hub at {endpoint} ({_first_line(e)}); check the "
                         "network or HF_ENDPOINT")


def check_folder(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path if it holds saved codebooks, else one clear error."""
    from .model import CONFIG_NAME, WEIGHTS_NAME

    d = Path(folder)
    if not d.is_dir():
        raise CodebookError(f"{d}: folder not found; pass a folder written by save_codebooks "
                            "(e.g. OUTPUT/final)")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (d / n).is_file()]
    if missing:
        raise CodebookError(f"{d}: holds no codebooks (no {' or '.join(missing)}); pass a "
                            "folder written by save_codebooks (e.g. OUTPUT/final)")
    return d


def push_to_hub(source: Any, repo_id: str, *, token: str | None = None,
                private: bool | None = None, revision: str | None = None,
                commit_message: str | None = None, endpoint: str | None = None) -> str:
    """Upload saved codebooks to the hub repo ``repo_id`` (created if missing); returns the
    commit's URL.

    ``source``: a folder written by ``save_codebooks`` or a ``CodebookModel`` (its codebooks
    are saved to a temporary folder first; save a finetuned base model's weights into a
    folder and push that instead). The folder's model card is refreshed with ``repo_id``
    first (unless the user wrote it). ``token``: default the logged-in one (``HF_TOKEN`` or
    ``hf auth login``); ``endpoint``: default ``HF_ENDPOINT``.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise CodebookError(f"{repo_id!r} is not a hub repo id ({_first_line(e)}); use "
                            "OWNER/NAME") from None
    if isinstance(source, (str, os.PathLike)):
        return _push_folder(check_folder(source), repo_id, token, private, revision,
                            commit_message, endpoint)
    if not hasattr(source, "save_codebooks"):
        raise CodebookError(f"cannot push a {type(source).__name__}: pass a CodebookModel or "
                            "a folder written by save_codebooks")
    with tempfile.TemporaryDirectory(prefix="codebooks-") as tmp:
        source.save_codebooks(tmp)
        return _push_folder(Path(tmp), repo_id, token, private, revision, commit_message,
                            endpoint)


def _push_folder(folder: Path, repo_id: str, token: str | None, private: bool | None,
                 revision: str | None, commit_message: str | None, endpoint: str | None
                 ) -> str:
    from huggingface_hub import HfApi, get_token

    from .modelcard import refresh_model_card

    token = token or get_token()
    if not token:
        raise CodebookError("no Hugging Face token: log in (hf auth login), set HF_TOKEN, or "
                            "pass --token")
    refresh_model_card(folder, repo_id)
    from . import __version__

    api = HfApi(endpoint=endpoint, token=token, library_name="codebook-features",
                library_version=__version__)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=commit_message or "Upload codebooks",
                                 ignore_patterns=IGNORE)
    except _network_errors() as e:
        raise _hub_error(e, repo_id, api.endpoint) from None
    return str(getattr(info, "commit_url", None) or f"{api.endpoint}/{repo_id}")


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a folder written by save_codebooks (e.g. OUTPUT/final)")
    p.add_argument("repo", help="hub repo id, OWNER/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", help="hub token (default: HF_TOKEN or the logged-in one)")
    p.add_argument("--revision", help="branch to push to (default: main)")
    p.add_argument("--message", help="commit message")


def run(args: argparse.Namespace) -> int:
    url = push_to_hub(args.folder, args.repo, token=args.token,
                      private=True if args.private else None, revision=args.revision,
                      commit_message=args.message)
    print(url)
    return 0
