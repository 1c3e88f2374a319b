"""The model card (``README.md`` with hub metadata) of a saved codebook folder.

``save_codebooks`` writes it, ``codebook-features eval`` refreshes it with its figures and
``push`` with the repo id, so a codebook shared on the hub explains itself: the metadata
(``library_name: codebook-features``, ``base_model``, tags), the codebook settings, each
site, how to load it and, when the folder holds evaluation figures newer than its weights,
the evaluation table. A ``README.md`` not written by this module is never overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .io import read_json, write_text

CARD_NAME = "README.md"
MARK = "<!-- written by codebook-features: edit freely, and remove this line to keep -->"
"""First line of the card's body; a README.md without it is the user's and is kept."""
METRICS_FILES = ("eval_metrics.json", "metrics.json")
"""Evaluation figures (``codebook-features eval``, then ``train``) the card shows."""
PAPER = "https://arxiv.org/abs/2310.17230"
SETTINGS = ("placements", "layers", "num_codes", "k", "groups", "similarity", "combine",
            "layernorm", "mse_coeff")


def hub_model_id(name: str | None) -> str | None:
    """``name`` when it reads as a hub model id (not a local path), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.startswith((".", "/", "~")) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _metrics(folder: Path) -> dict[str, Any] | None:
    """The newest evaluation figures in ``folder`` that are newer than its weights."""
    from .model_config import WEIGHTS_NAME

    weights = folder / WEIGHTS_NAME
    since = weights.stat().st_mtime_ns if weights.is_file() else 0
    for name in METRICS_FILES:
        p = folder / name
        if p.is_file() and p.stat().st_mtime_ns >= since:
            m = read_json(p)
            if isinstance(m, dict) and "with_codebooks" in m and "without_codebooks" in m:
                return m
    return None


def _cell(key: str, v: Any) -> str:
    if v is None:
        return "one per head (attn_heads), else 1" if key == "groups" else "all"
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def card_text(meta: dict[str, Any], folder: str | os.PathLike | None = None,
              repo_id: str | None = None) -> str:
    """The card of a folder whose ``codebook_model.json`` holds ``meta``."""
    from huggingface_hub import ModelCard, ModelCardData

    from .evaluation.metrics import format_table

    folder = Path(folder) if folder is not None else None
    cfg, base = meta["config"], meta["base_model"]
    base_name = base.get("name_or_path") or ""
    base_id = hub_model_id(base_name)
    own_weights = folder is not None and (folder / "config.json").is_file()
    tags = ["codebook-features", "codebooks", "interpretability",
            *[p.replace("_", "-") for p in cfg["placements"]]]
    if base.get("model_type"):
        tags.append(str(base["model_type"]))
    data = ModelCardData(library_name="codebook-features", base_model=base_id, tags=tags)
    where = repo_id or "PATH_OR_REPO_ID"
    if own_weights:
        about = ("the base model, finetuned with its codebooks, is saved in this folder "
                 "(`config.json` and weights), and loads with it")
    elif base_id:
        about = f"they load onto the base model [{base_id}](https://huggingface.co/{base_id})"
    else:
        about = (f"they load onto the base model recorded at save time (`{base_name}`) or any "
                 "base model of the same shape (`base_model=`)")
    sites = meta.get("sites", {})
    label = (base_name if base_name not in ("", ".") and not own_weights else
             f"a {'finetuned ' if own_weights else ''}{base.get('model_type', '?')} model")
    lines = [
        MARK, "",
        f"# Codebook features for {base_id or label}",
        "",
        f"Sparse, discrete codebook bottlenecks ([Codebook Features]({PAPER}), Tamkin, "
        f"Taufeeque & Goodman, ICML 2024) at {len(sites)} site(s) of a "
        f"{base.get('model_type', '?')} model ({base.get('num_layers', '?')} layers, hidden "
        f"size {base.get('hidden_size', '?')}), made with codebook-features; {about}.", "",
        "## Use", "", "```python", "from codebook_features.model import CodebookModel", "",
        f'model = CodebookModel.from_pretrained("{where}")',
        "logits = model(input_ids).logits  # the codebooks act inside the forward",
        "codes = model.codes()  # site -> (batch, seq, groups, k) ids of the chosen codes",
        "```", "",
        f"or from the shell: `codebook-features steer {where} --prompt ... --code "
        "SITE:GROUP:CODE`.", "",
        "## Settings", "", "| Setting | Value |", "|---|---|",
        *[f"| {k} | {_cell(k, cfg.get(k))} |" for k in SETTINGS if k in cfg],
    ]
    if cfg.get("overrides"):
        lines.append(f"| overrides | `{cfg['overrides']}` |")
    lines += ["", "| Site | Module | Width | Groups | Codes per group | k |",
              "|---|---|---|---|---|---|"]
    for name, s in sites.items():
        cb = s.get("codebook", {})
        lines.append(f"| {name} | `{s.get('module')}` | {s.get('dim')} | {cb.get('groups')} | "
                     f"{cb.get('num_codes')} | {cb.get('k')} |")
    metrics = _metrics(folder) if folder is not None else None
    if metrics is not None:
        lines += ["", "## Evaluation", "",
                  f"On {metrics.get('tokens', '?')} tokens of evaluation data, as "
                  "`codebook-features eval` printed it. Site rows: that codebook spliced in "
                  "alone; `all`: every codebook in. CE rec.: share of the loss gap to "
                  "ablating the site (zeros or its mean) that the codebook recovers; KL: "
                  "KL(base || codebooks) per token; Expl. var.: of the codebook's normalised "
                  "input; L0: codes per token; "
                  "Alive: codes that fired.", "", format_table(metrics)]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def is_own_card(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` has no README.md or one this module wrote."""
    p = Path(folder) / CARD_NAME
    return not p.is_file() or MARK in p.read_text(errors="replace")


def write_model_card(folder: str | os.PathLike, meta: dict[str, Any] | None = None,
                     repo_id: str | None = None) -> bool:
    """Write ``folder/README.md`` (atomically) unless the user wrote one; returns whether it
    was written. ``meta``: the folder's ``codebook_model.json`` (read when None)."""
    from .model_config import CONFIG_NAME

    folder = Path(folder)
    if not is_own_card(folder):
        return False
    if meta is None:
        meta = read_json(folder / CONFIG_NAME)
    write_text(folder / CARD_NAME, card_text(meta, folder, repo_id))
    return True


def refresh_model_card(folder: str | os.PathLike, repo_id: str | None = None) -> bool:
    """Rewrite the card of a saved codebook folder (nothing for other folders)."""
    from .model_config import CONFIG_NAME

    if not (Path(folder) / CONFIG_NAME).is_file():
        return False
    return write_model_card(folder, repo_id=repo_id)
