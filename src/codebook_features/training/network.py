"""The network around a training run: is the hub reachable, is a model cached, is wandb logged in.

A run without network fails fast with one line when it needs the hub, or goes offline when
everything it needs is cached; wandb logs offline when there are no credentials.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..errors import CodebookError


def wandb_offline_unless_logged_in(args: Any) -> str | None:
    """With ``report_to`` wandb and no credentials (no ``WANDB_API_KEY``, no netrc entry for
    the wandb host) nor ``WANDB_MODE``, set ``WANDB_MODE=offline`` so that a run without
    network neither hangs nor fails; runs go to ``WANDB_DIR`` (default: the output dir).
    Returns the mode set, or None when nothing was changed."""
    import netrc
    from urllib.parse import urlparse

    if "wandb" not in args.report_to:
        return None
    os.environ.setdefault("WANDB_DIR", str(Path(args.output_dir).resolve()))
    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc().authenticators(host or "api.wandb.ai"):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    os.environ["WANDB_MODE"] = "offline"
    print(f"wandb: not logged in, logging offline to {os.environ['WANDB_DIR']}/wandb "
          "(wandb sync uploads it later)", file=sys.stderr)
    return "offline"


HUB_PROBE_TIMEOUT = 3.0
"""Seconds the one request that checks the hub is reachable may take."""


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, through any configured proxy) answers one
    request within ``timeout`` seconds: any HTTP status counts; no retries."""
    import threading

    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return False
    answered: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout, follow_redirects=False)
            answered.append(True)
        except Exception:  # noqa: BLE001 (any failure means unreachable)
            answered.append(False)

    # A thread bounds the name lookup too, which the request's timeout does not cover.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(answered and answered[0])


def check_model_source(name: str, what: str = "model") -> None:
    """Fail fast, with one line, when ``name`` can be loaded neither from a local folder, nor
    from the Hugging Face cache, nor from a reachable hub; with a cached model and no hub,
    switch the process to offline mode so that no later load retries the network."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(name).expanduser()
    if path.exists() or constants.is_offline_mode():
        return  # a folder, or cache-only loads that fail at once
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if looks_local:
        raise CodebookError(f"cannot load {what} {name!r}: no such folder")
    cached = False
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 (a name the hub would reject: let the load say why)
        return
    if hub_reachable():
        return
    if not cached:
        raise CodebookError(f"cannot load {what} {name!r}: not a local folder, not in the "
                            f"Hugging Face cache ({constants.HF_HUB_CACHE}), and the hub "
                            f"({constants.ENDPOINT}) is unreachable (no network?); download it "
                            "where there is network, or give a local folder")
    _go_offline()


def _go_offline() -> None:
    """Hub and datasets loads from the cache only, for the rest of this process."""
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    print("hub unreachable: loading models and datasets from the Hugging Face cache only",
          file=sys.stderr)
