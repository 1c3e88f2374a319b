"""The comparison of one site: :class:`CompareConfig` and :func:`compare_site`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CodebookError
from ..io import read_json, writable_dir, write_json
from .report import write_report
from .search import interpretability, token_table, topic_labels, topic_patterns
from .site import _SiteView, check_sae, matched_sizes

DEFAULT_TOPICS = ("dragon", "flower", "fire", "baby", "princess")
"""The story topics the stories job steers (their words are the regexes)."""


@dataclass
class CompareConfig:
    """Settings of :func:`compare_site`."""

    site: str
    steps: int = 1000
    """Training steps of the SAE (and of the fresh codebook), same batches."""
    batch_tokens: int = 4096
    max_train_tokens: int = 1_000_000
    sae_lr: float | None = None
    """None: sparsify's default for Adam."""
    auxk_alpha: float = 1 / 32
    codebook_lr: float = 1e-3
    eval_batch: int = 16
    topics: tuple[str, ...] = DEFAULT_TOPICS
    patterns: dict[str, str] = field(default_factory=dict)
    """topic -> regex (default: the story topic's words, or the topic as a whole word)."""
    max_length: int = 128
    """Tokens of each held-out document read for search and steering."""
    codes_per_topic: int = 4
    steer_mode: str = "replace"
    prompts: tuple[str, ...] = ("", "Once upon a time,", "One day,", "There was a")
    samples_per_prompt: int = 8
    gen_tokens: int = 48
    seed: int = 0


def _log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cached(folder: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a previous run's training in ``folder`` if made with ``settings``."""
    f = folder / "train.json"
    if not f.is_file():
        return None
    rec = read_json(f)
    return rec if rec.get("settings") == settings else None


def compare_site(model: Any, tokenizer: Any, train_rows: Any, eval_rows: Any,
                 texts: Sequence[str], cfg: CompareConfig, out: str | Path | None = None,
                 sae: Any = None, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """The comparison of the module docstring for ``model`` (a ``CodebookModel``) at
    ``cfg.site``. ``train_rows`` / ``eval_rows``: token rows (``input_ids``,
    ``attention_mask`` optional), the SAE's training activations and the standard
    evaluation's data; ``texts``: held-out documents (search and steering). ``sae``: a
    sparsify ``SparseCoder`` to compare instead of training one. Returns the report (and
    writes it, the SAE and the fresh codebook into ``out`` if given)."""
    from ..evaluation import standard_evaluation
    from ..sae import (
        SaeSite,
        SaeTraining,
        latent_means,
        measured,
        record_site,
        require_sparsify,
        train_codebook_on,
        train_topk_sae,
    )
    from ..steering import SteerCode, rank_topic_codes, topic_steering_eval

    sparsify = require_sparsify()
    layer = model.site(cfg.site)  # unknown site: one line naming the sites
    if cfg.steer_mode not in ("replace", "append"):
        raise CodebookError(f"steer_mode {cfg.steer_mode!r}: choose replace or append")
    num_latents, k = matched_sizes(layer)
    if sae is not None:
        check_sae(sae, layer, cfg.site)
    if cfg.codes_per_topic > (layer.config.k if cfg.steer_mode == "replace" else 10**9):
        raise CodebookError(f"codes_per_topic={cfg.codes_per_topic} codes cannot be written "
                            f"over k={layer.config.k} slots; lower it or steer with append")
    rxs = topic_patterns(cfg.topics, cfg.patterns)
    out = writable_dir(out) if out is not None else None
    device = next(model.parameters()).device
    train = SaeTraining(steps=cfg.steps, batch_tokens=cfg.batch_tokens, lr=cfg.sae_lr,
                        auxk_alpha=cfg.auxk_alpha, seed=cfg.seed)

    def loader(rows: Any) -> Iterator[dict[str, Tensor]]:
        cols = [c for c in ("input_ids", "attention_mask") if c in rows.column_names] \
            if hasattr(rows, "column_names") else ["input_ids"]
        for i in range(0, len(rows), cfg.eval_batch):
            part = rows[i:i + cfg.eval_batch]
            yield {c: torch.as_tensor(part[c]) for c in cols}

    t0 = time.time()
    acts = record_site(model, cfg.site, loader(train_rows), cfg.max_train_tokens)
    log(f"{acts.shape[0]} training activations of width {acts.shape[1]} at {cfg.site} "
        f"({time.time() - t0:.1f} s)")
    settings = {"site": cfg.site, "tokens": int(acts.shape[0]),
                **dataclasses.asdict(train), "num_latents": num_latents, "k": k,
                "codebook_lr": cfg.codebook_lr}
    costs: dict[str, Any] = {}
    sae_info: dict[str, Any] = {}
    if sae is None:
        rec = _cached(out / "sae", settings) if out is not None else None
        if rec is not None:
            sae = sparsify.SparseCoder.load_from_disk(out / "sae", device=device)
            costs["sae"], sae_info = rec["cost"], rec["info"]
            log(f"reusing the SAE trained before in {out / 'sae'}")
        else:
            log(f"training a TopK SAE with sparsify: {num_latents} latents, k={k}, "
                f"{cfg.steps} steps of {min(cfg.batch_tokens, len(acts))} tokens")
            with measured(device) as m:
                sae, sae_info = train_topk_sae(acts, num_latents, k, train, device, log)
            costs["sae"] = dataclasses.asdict(m["cost"])
            if out is not None:
                sae.save_to_disk(out / "sae")
                write_json(out / "sae" / "train.json", {"settings": settings,
                                                        "cost": costs["sae"], "info": sae_info})
    else:
        costs["sae"] = None
    rec = _cached(out / "codebook", settings) if out is not None else None
    if rec is not None:
        from ..codebook import CodebookLayer

        fresh = CodebookLayer.load(out / "codebook", map_location=device).eval()
        costs["codebook"] = rec["cost"]
        log(f"reusing the codebook trained before in {out / 'codebook'}")
    else:
        log(f"training a fresh codebook of the site's settings on the same batches "
            f"({cfg.steps} steps)")
        with measured(device) as m:
            fresh = train_codebook_on(acts, layer.config, train, cfg.codebook_lr, device, log)
        costs["codebook"] = dataclasses.asdict(m["cost"])
        if out is not None:
            fresh.save(out / "codebook")
            write_json(out / "codebook" / "train.json", {"settings": settings,
                                                         "cost": costs["codebook"]})
    sae_site = SaeSite(sae, cfg.site)

    # Standard evaluation, each spliced into the site alone.
    t0 = time.time()
    standard = {}
    for name, module in (("codebook", layer), ("codebook_fresh", fresh), ("sae", sae_site)):
        with _SiteView(model, cfg.site, module).active() as view:
            standard[name] = standard_evaluation(view, eval_rows, cfg.eval_batch)["rows"][
                cfg.site]
    log(f"standard evaluation ({time.time() - t0:.1f} s)")

    # Interpretability: regex search over the held-out documents.
    t0 = time.time()
    table = token_table(model, tokenizer, texts, cfg.site, sae_site, cfg.max_length,
                        cfg.eval_batch)
    c = layer.config
    interp = interpretability(table, texts, rxs, c.num_codes, num_latents,
                              c.groups * c.num_codes)
    zero_slots = float(1 - table.latent_on.mean()) if table.latent_on.size else 0.0
    log(f"regex search over {len(texts)} documents ({time.time() - t0:.1f} s)")

    # Steering: each topic's best codes and latents forced on.
    t0 = time.time()
    labels = topic_labels(texts, rxs)
    missing = [t for t in cfg.topics if t not in labels]
    if missing:
        raise CodebookError(f"no held-out document mentions only {missing}; use more "
                            "documents (--max-docs) or other topics (--topics)")
    sae_site.steer_values = latent_means(sae_site, table.neurons)
    steering: dict[str, Any] = {}
    for name, module in (("codebook", layer), ("sae", sae_site)):
        with _SiteView(model, cfg.site, module).active() as view:
            ranked = rank_topic_codes(view, tokenizer, texts, labels, sites=[cfg.site],
                                      top=cfg.codes_per_topic, max_length=cfg.max_length)
            steer = {t: [SteerCode(cfg.site, x.code, x.group) for x in ranked[t]]
                     for t in cfg.topics}
            rows, _ = topic_steering_eval(
                view, tokenizer, steer, prompts=cfg.prompts,
                samples_per_prompt=cfg.samples_per_prompt, max_new_tokens=cfg.gen_tokens,
                mode=cfg.steer_mode, seed=cfg.seed)
        steering[name] = {"units": {t: [dataclasses.asdict(x) for x in ranked[t]]
                                    for t in cfg.topics},
                          "rows": [r.to_dict() for r in rows]}
    log(f"steering ({time.time() - t0:.1f} s)")

    report = {
        "site": cfg.site,
        "config": dataclasses.asdict(cfg),
        "sizes": {"codes": c.groups * c.num_codes, "groups": c.groups, "k_per_group": c.k,
                  "l0": c.groups * c.k, "sae_latents": num_latents, "sae_k": k,
                  "dim": c.dim},
        "library": {"name": "eai-sparsify", "version": _version("eai-sparsify")},
        "train_tokens": int(acts.shape[0]),
        "standard": standard,
        "training_cost": costs,
        "sae_training": sae_info,
        "sae_zero_slots": zero_slots,
        "interpretability": interp,
        "steering": steering,
        "documents": len(texts),
    }
    if out is not None:
        write_report(report, out)
    return report


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
