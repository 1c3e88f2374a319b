"""``codebook-features compare``: a codebook site against a TopK sparse autoencoder, side by side.

For one site of a codebook model, a TopK SAE of matched size (latents = the site's codes over
all groups, ``k`` = the codes active per token over all groups) is trained with EleutherAI's
sparsify (:mod:`codebook_features.sae`) on the activations entering the site (every codebook
bypassed), and the two are compared, each spliced into the site alone (other sites bypassed):

* **standard evaluation** (:mod:`codebook_features.standard_eval`): CE loss recovered against
  zero and mean ablation, KL, explained variance (the codebook's against its LayerNorm'd
  input, the SAE's against the raw activation), L0, alive fraction;
* **training cost**: wall time and peak memory of training the SAE and, on the same batches,
  a fresh codebook of the site's settings (the site's own codebook may have been trained with
  the LM; the fresh one is the like-for-like cost, and its evaluation is reported too);
* **interpretability** as the paper measures it (regex code search): for each topic's regex
  (the story topics' words), the token positions overlapping a match are the positives; a
  unit (code, SAE latent) fires where it is among the chosen ones (a latent: with a positive
  activation); precision = hits / firings, recall = hits / positives; units with recall <= 1%
  are dropped (the authors' rule) and the best is the most precise (then the highest recall);
  the best neuron (a dimension of the site's input) is thresholded at the best code's and the
  best latent's recall (:func:`~codebook_features.analysis.search.best_neuron_precision`);
* **steering** (the paper's Table 3): the held-out documents mentioning one topic alone are
  that topic's; each topic's best codes and best latents (firing on the largest share of its
  documents' tokens and not others', :func:`~codebook_features.steering.rank_topic_codes`)
  are forced on while generating from short prompts (a latent at its mean firing
  activation, written over the weakest slots), and the generations mentioning the topic are
  counted against the same model unsteered (each with its own bottleneck in).

Writes ``report.json``, ``report.html`` and ``report.md`` (the tables as printed) into the
output folder, the SAE (sparsify's format, ``sae/``) and the fresh codebook (``codebook/``);
a rerun with the same settings reuses them (their training cost as first measured).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import html
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import CodebookError
from .io import read_json, writable_dir, write_json, write_text

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


# ------------------------------------------------------------------ one site
class _SiteView:
    """``model`` seen with one site, holding ``module`` (the codebook or an SAE); enter
    :meth:`active` to bypass the other sites meanwhile. Has what the standard evaluation,
    topic-code ranking and steering read of a ``CodebookModel``."""

    def __init__(self, model: Any, site: str, module: Any) -> None:
        self.model, self.name, self.module = model, site, module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def site_names(self) -> list[str]:
        return [self.name]

    @property
    def sites(self) -> dict[str, Any]:
        return {self.name: self.module}

    def site(self, name: str) -> Any:
        if name != self.name:
            raise CodebookError(f"no site {name!r} in this comparison (only {self.name})")
        return self.module

    def codes(self) -> dict[str, Tensor]:
        if self.module.last_codes is None:
            raise CodebookError("no codes yet: run a forward first")
        return {self.name: self.module.last_codes}

    @contextlib.contextmanager
    def active(self) -> Iterator[_SiteView]:
        from .model_config import _key

        m = self.model
        key = _key(self.name)
        old = m.codebooks[key]
        others = [ly for n, ly in m.sites.items() if n != self.name]
        was = [ly.bypass for ly in others]
        enabled = m.enabled
        m.codebooks[key] = self.module
        for ly in others:
            ly.bypass = True
        m.enable_codebooks()
        try:
            yield self
        finally:
            m.codebooks[key] = old
            for ly, b in zip(others, was, strict=True):
                ly.bypass = b
            if not enabled:
                m.disable_codebooks()


# ------------------------------------------------------------ interpretability
@dataclass
class TokenTable:
    """Per held-out token: codes, SAE latents, neurons; per document: token offsets."""

    codes: np.ndarray  # (T, G*K) code ids over all groups (group * C + code)
    latents: np.ndarray  # (T, k) SAE latent ids
    latent_on: np.ndarray  # (T, k) bool: positive activation
    neurons: Tensor  # (T, dim) the site's input
    offsets: list[np.ndarray] = field(default_factory=list)  # per doc (t, 2)


@torch.no_grad()
def token_table(model: Any, tokenizer: Any, texts: Sequence[str], site: str, sae_site: Any,
                max_length: int, batch: int = 16) -> TokenTable:
    """Run the held-out ``texts`` (each cut to ``max_length`` tokens) through the model with
    the site's codebook alone and read codes, neurons and the SAE's latents of every token."""
    if not getattr(tokenizer, "is_fast", False):
        raise CodebookError("the comparison's regex search needs a fast tokenizer (character "
                            "offsets); load it with use_fast=True")
    layer = model.site(site)
    view = _SiteView(model, site, layer)
    c = layer.config
    device = next(model.parameters()).device
    codes, neurons, offsets = [], [], []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was = model.training
    model.eval()
    layer.recorded = []
    try:
        with view.active():
            for i in range(0, len(texts), batch):
                enc = tokenizer(list(texts[i:i + batch]), truncation=True,
                                max_length=max_length, return_offsets_mapping=True)
                ids = enc["input_ids"]
                width = max(max(len(r) for r in ids), 1)
                x = torch.full((len(ids), width), pad)
                mask = torch.zeros_like(x)
                for j, r in enumerate(ids):
                    x[j, :len(r)] = torch.tensor(r, dtype=torch.long)
                    mask[j, :len(r)] = 1
                layer.recorded.clear()
                model(input_ids=x.to(device), attention_mask=mask.to(device))
                a = layer.recorded[-1].reshape(len(ids), width, c.dim)
                got = layer.last_codes.reshape(len(ids), width, c.groups, -1)
                got = got + torch.arange(c.groups, device=got.device).view(1, 1, -1, 1) \
                    * c.num_codes
                for j, r in enumerate(ids):
                    n = len(r)
                    neurons.append(a[j, :n].float().cpu())
                    codes.append(got[j, :n].reshape(n, -1).cpu())
                    offsets.append(np.asarray(enc["offset_mapping"][j], np.int64).reshape(-1, 2))
    finally:
        layer.recorded = None
        model.train(was)
    acts = torch.cat(neurons) if neurons else torch.zeros(0, c.dim)
    lat_a, lat_i = [], []
    for i in range(0, len(acts), 8192):
        la, li = sae_site.encode(acts[i:i + 8192].to(sae_site.codebook.device))
        lat_a.append(la.cpu())
        lat_i.append(li.cpu())
    la = torch.cat(lat_a) if lat_a else torch.zeros(0, sae_site.config.k)
    li = torch.cat(lat_i) if lat_i else torch.zeros(0, sae_site.config.k, dtype=torch.long)
    return TokenTable(torch.cat(codes).numpy() if codes else np.zeros((0, 1), np.int64),
                      li.numpy(), (la > 0).numpy(), acts, offsets)


def regex_positives(texts: Sequence[str], offsets: Sequence[np.ndarray], rx: re.Pattern[str]
                    ) -> np.ndarray:
    """Bool per token (documents concatenated): the token's characters ``[s, e)`` overlap a
    match ``[ms, me)`` (``s < me`` and ``ms < e``; empty tokens and matches never do)."""
    out = []
    for text, off in zip(texts, offsets, strict=True):
        hit = np.zeros(len(off), dtype=bool)
        nonempty = off[:, 0] < off[:, 1]
        for m in rx.finditer(text):
            if m.end() > m.start():
                hit |= nonempty & (off[:, 0] < m.end()) & (m.start() < off[:, 1])
        out.append(hit)
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def best_unit(ids: np.ndarray, on: np.ndarray | None, positive: np.ndarray, units: int,
              min_recall: float = 0.01) -> dict[str, float] | None:
    """The most precise unit (then highest recall, then lowest id) among those with recall
    above ``min_recall``: ``unit``, ``precision``, ``recall``, ``fired``, ``hits``; None when
    no unit qualifies. ``ids`` (T, K): the units chosen at each token (distinct per token);
    ``on``: which of them count (all if None)."""
    total = int(positive.sum())
    if total == 0:
        return None
    on = np.ones(ids.shape, dtype=bool) if on is None else on
    fired = np.bincount(ids[on], minlength=units)
    hits = np.bincount(ids[on & positive[:, None]], minlength=units)
    recall = hits / total
    precision = hits / np.maximum(fired, 1)
    ok = np.flatnonzero(recall > min_recall)
    if not len(ok):
        return None
    best = ok[np.lexsort((ok, -recall[ok], -precision[ok]))[0]]
    return {"unit": int(best), "precision": float(precision[best]),
            "recall": float(recall[best]), "fired": int(fired[best]), "hits": int(hits[best])}


def topic_patterns(topics: Sequence[str], patterns: dict[str, str] | None = None
                   ) -> dict[str, re.Pattern[str]]:
    """Each topic's regex: ``patterns[topic]``, the story topic's words, or the topic as a
    whole word (case-insensitive)."""
    from .experiments.stories.topics import TOPICS, topic_regex

    out = {}
    for t in topics:
        if patterns and t in patterns:
            try:
                out[t] = re.compile(patterns[t], re.IGNORECASE)
            except re.error as e:
                raise CodebookError(f"topic {t!r}: regex {patterns[t]!r} does not compile "
                                    f"({e}); fix the pattern") from None
        elif t in TOPICS:
            out[t] = topic_regex(t)
        else:
            out[t] = re.compile(r"\b" + re.escape(t) + r"\b", re.IGNORECASE)
    return out


def interpretability(table: TokenTable, texts: Sequence[str], rxs: dict[str, re.Pattern[str]],
                     num_codes: int, num_latents: int, groups_codes: int) -> dict[str, Any]:
    """Per topic: the best code, the best SAE latent and the best neuron at each one's recall
    (see the module docstring); ``mean``: their precisions and recalls averaged over the
    topics where both a code and a latent qualify."""
    from .analysis.search import best_neuron_precision

    rows: dict[str, Any] = {}
    for topic, rx in rxs.items():
        pos = regex_positives(texts, table.offsets, rx)
        code = best_unit(table.codes, None, pos, groups_codes)
        lat = best_unit(table.latents, table.latent_on, pos, num_latents)
        if code is not None:
            code["group"], code["code"] = divmod(code.pop("unit"), num_codes)
        if lat is not None:
            lat["latent"] = lat.pop("unit")
        recalls = [u["recall"] for u in (code, lat) if u is not None]
        neuron = best_neuron_precision(table.neurons, pos, recalls) if recalls else []
        it = iter(neuron)
        rows[topic] = {"regex": rx.pattern, "positives": int(pos.sum()), "code": code,
                       "latent": lat,
                       "neuron_at_code_recall": next(it) if code is not None else None,
                       "neuron_at_latent_recall": next(it) if lat is not None else None}
    both = [r for r in rows.values() if r["code"] and r["latent"]]
    mean = None
    if both:
        mean = {k: float(np.mean([f(r) for r in both])) for k, f in (
            ("code_precision", lambda r: r["code"]["precision"]),
            ("code_recall", lambda r: r["code"]["recall"]),
            ("latent_precision", lambda r: r["latent"]["precision"]),
            ("latent_recall", lambda r: r["latent"]["recall"]),
            ("neuron_at_code_recall", lambda r: r["neuron_at_code_recall"]),
            ("neuron_at_latent_recall", lambda r: r["neuron_at_latent_recall"]))}
        mean["topics"] = len(both)
    return {"topics": rows, "mean": mean}


def topic_labels(texts: Sequence[str], rxs: dict[str, re.Pattern[str]]) -> list[str]:
    """Each document's topic: the one topic whose regex it matches, else ``""`` (none or
    several)."""
    out = []
    for text in texts:
        hit = [t for t, rx in rxs.items() if rx.search(text)]
        out.append(hit[0] if len(hit) == 1 else "")
    return out


# ----------------------------------------------------------------- the run
def matched_sizes(layer: Any) -> tuple[int, int]:
    """The SAE size matching a codebook layer: (latents, k) = (G * C, G * k)."""
    c = layer.config
    return c.groups * c.num_codes, c.groups * c.k


def check_sae(sae: Any, layer: Any, site: str) -> None:
    """Refuse an SAE whose width, latents or k differ from the site's codebook."""
    n, k = matched_sizes(layer)
    got = (int(sae.d_in), int(sae.num_latents), int(sae.cfg.k))
    want = (int(layer.config.dim), n, k)
    if got != want:
        raise CodebookError(
            f"SAE sizes do not match the codebook at {site}: the SAE has width {got[0]}, "
            f"{got[1]} latents, k={got[2]}; the codebook needs width {want[0]}, {n} latents "
            f"(codes over all groups), k={k} (codes per token over all groups); train a "
            "matched one (leave out --sae)")


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
    from .evaluation import standard_evaluation
    from .sae import (
        SaeSite,
        SaeTraining,
        latent_means,
        measured,
        record_site,
        require_sparsify,
        train_codebook_on,
        train_topk_sae,
    )
    from .steering import SteerCode, rank_topic_codes, topic_steering_eval

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
        from .codebook import CodebookLayer

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


# -------------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def report_tables(r: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables: (title, header, rows of cells)."""
    from .evaluation import STANDARD_COLUMNS

    names = {"codebook": "codebook (the model's)", "codebook_fresh": "codebook (fresh, "
             "trained here)", "sae": "TopK SAE (sparsify)"}
    std = [[names[n]] + [fmt.format(row[key]) if row[key] == row[key] else "n/a"
                         for key, _, fmt in STANDARD_COLUMNS]
           for n, row in r["standard"].items()]
    cost = []
    for n in ("codebook", "sae"):
        cst = r["training_cost"].get(n)
        label = names["codebook_fresh" if n == "codebook" else n]
        seen = r["config"]["steps"] * min(r["config"]["batch_tokens"], r["train_tokens"])
        cost.append([label, str(r["config"]["steps"]), str(seen)] + (
            [f"{cst['seconds']:.1f}", f"{cst['peak_memory_mib']:.0f} ({cst['memory']})"]
            if cst else ["given (--sae)", "given (--sae)"]))
    interp = []

    def unit(u: dict[str, Any] | None, key: str) -> list[str]:
        if u is None:
            return ["none", "n/a", "n/a"]
        ident = f"{u['group']}/{u['code']}" if key == "code" else str(u["latent"])
        return [ident, _pct(u["precision"]), _pct(u["recall"])]

    for t, row in r["interpretability"]["topics"].items():
        interp.append([t, str(row["positives"])] + unit(row["code"], "code")
                      + unit(row["latent"], "latent")
                      + [_pct(row["neuron_at_code_recall"]),
                         _pct(row["neuron_at_latent_recall"])])
    m = r["interpretability"]["mean"]
    if m:
        interp.append([f"mean ({m['topics']} topics)", "", "", _pct(m["code_precision"]),
                       _pct(m["code_recall"]), "", _pct(m["latent_precision"]),
                       _pct(m["latent_recall"]), _pct(m["neuron_at_code_recall"]),
                       _pct(m["neuron_at_latent_recall"])])
    steer = []
    by = {n: {row["topic"]: row for row in r["steering"][n]["rows"]} for n in r["steering"]}
    for t in r["config"]["topics"]:
        cb, sa = by["codebook"][t], by["sae"][t]
        steer.append([t, str(cb["codes"]), str(cb["samples"]), _pct(cb["baseline"]),
                      _pct(cb["steered"]), _pct(sa["baseline"]), _pct(sa["steered"])])
    return [
        ("Standard evaluation (each spliced into the site alone)",
         ["Dictionary"] + [h for _, h, _ in STANDARD_COLUMNS], std),
        ("Training cost (same activations, same batches)",
         ["Dictionary", "Steps", "Tokens seen", "Seconds", "Peak memory (MiB)"], cost),
        ("Regex search: best code, best SAE latent, best neuron at their recall",
         ["Topic", "Positives", "Code (group/code)", "Precision", "Recall", "SAE latent",
          "Precision", "Recall", "Neuron P @ code R", "Neuron P @ latent R"], interp),
        ("Topic steering (Table 3): mention rate, unsteered vs steered",
         ["Topic", "Units", "Samples", "Codebook baseline", "Codes on", "SAE baseline",
          "Latents on"], steer),
    ]


def format_report(r: dict[str, Any]) -> str:
    """The report as markdown tables (what the command prints)."""
    s = r["sizes"]
    parts = [f"Site {r['site']}: codebook {s['groups']} x {s['codes'] // s['groups']} codes, "
             f"L0 {s['l0']}; TopK SAE {s['sae_latents']} latents, k={s['sae_k']} "
             f"({r['library']['name']} {r['library']['version']}); {r['train_tokens']} "
             f"training tokens, {r['documents']} held-out documents"]
    for title, head, rows in report_tables(r):
        parts.append(f"{title}\n\n| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|\n"
                     + "\n".join("| " + " | ".join(row) + " |" for row in rows))
    return "\n\n".join(parts)


def format_html(r: dict[str, Any]) -> str:
    """The report as one HTML page (the same tables)."""
    e = html.escape
    body = [f"<h1>Codebook vs TopK SAE at {e(r['site'])}</h1>",
            f"<p>{e(format_report(r).split(chr(10))[0])}</p>"]
    for title, head, rows in report_tables(r):
        body.append(f"<h2>{e(title)}</h2><table><tr>"
                    + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                              for row in rows) + "</table>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>compare "
            f"{e(r['site'])}</title><style>{style}</style></head><body>{''.join(body)}"
            "</body></html>\n")


def write_report(r: dict[str, Any], out: Path) -> None:
    write_json(out / "report.json", r)
    write_text(out / "report.md", format_report(r) + "\n")
    write_text(out / "report.html", format_html(r))


# ------------------------------------------------------------------- command
def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("codebooks", help="folder written by save_codebooks (e.g. runs/stories/model)")
    p.add_argument("config", help="a training config (its model and data sections are used)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--site", required=True, help="the codebook site, e.g. layers.0.attn_heads")
    p.add_argument("--out", required=True, help="folder for report.json/html/md, sae/, codebook/")
    p.add_argument("--steps", type=int, default=1000, help="SAE training steps (%(default)s)")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="activations per training step (%(default)s)")
    p.add_argument("--max-train-tokens", type=int, default=1_000_000,
                   help="training activations recorded (%(default)s)")
    p.add_argument("--max-docs", type=int, default=500,
                   help="held-out documents for evaluation, search and steering "
                        "(%(default)s; the eval split's first, else the split's first, held "
                        "out of training)")
    p.add_argument("--topics", default=",".join(DEFAULT_TOPICS),
                   help="comma-separated topics (%(default)s); their regex: the story "
                        "topic's words, or the topic as a word")
    p.add_argument("--codes-per-topic", type=int, default=4)
    p.add_argument("--samples-per-prompt", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--sae", help="a sparsify SAE folder (cfg.json, sae.safetensors) to compare "
                                 "instead of training one; its sizes must match")
    p.add_argument("--device", help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0)


def load_data(d: Any, tokenizer: Any, max_docs: int) -> tuple[Any, Any, list[str]]:
    """(training rows, evaluation rows, held-out documents) from a config's data section."""
    from .data.text import load_text, pack, take_rows

    col = d.text_column
    text = load_text(d.dataset, d.files, d.config, d.split, col, d.streaming)
    if d.eval_split:
        held = take_rows(load_text(d.dataset, d.files, d.config, d.eval_split, col,
                                   d.streaming), max_docs)
        train_text = text
    elif d.streaming:
        held, train_text = take_rows(text, max_docs), text.skip(max_docs)
    else:
        if len(text) < 2:
            raise CodebookError(f"{len(text)} document(s): too few to train and hold out")
        n = min(max_docs, len(text) // 5 or 1)
        held, train_text = text.select(range(n)), text.select(range(n, len(text)))
    texts = [t for t in held[col] if t and t.strip()]
    eval_rows = take_rows(pack(held, tokenizer, d.seq_len, col), d.max_eval_rows)
    train_rows = pack(train_text, tokenizer, d.seq_len, col)
    if d.streaming:
        train_rows = take_rows(train_rows, d.max_train_rows or 10_000)
    if len(eval_rows) == 0 or len(train_rows) == 0 or not texts:
        raise CodebookError(f"no {'evaluation' if len(eval_rows) == 0 else 'training'} rows "
                            f"of {d.seq_len} tokens; lower data.seq_len or add text")
    return train_rows, eval_rows, texts


def run(args: argparse.Namespace) -> int:
    from .evaluation.job import model_and_tokenizer
    from .sae import require_sparsify
    from .training.config import load_config

    sparsify = require_sparsify()  # missing extra: one line before any work
    cfg = load_config(args.config, args.overrides)
    if not Path(args.codebooks).is_dir():
        raise CodebookError(f"codebook folder {args.codebooks} not found")
    out = writable_dir(args.out)
    model, tokenizer = model_and_tokenizer(args.codebooks, cfg)
    layer = model.site(args.site)  # unknown site: one line naming the sites
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise CodebookError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    sae = None
    if args.sae:
        if not (Path(args.sae) / "cfg.json").is_file():
            raise CodebookError(f"--sae {args.sae}: no sparsify SAE there (cfg.json, "
                                "sae.safetensors)")
        sae = sparsify.SparseCoder.load_from_disk(args.sae,
                                                  device=next(model.parameters()).device)
        check_sae(sae, layer, args.site)
    topics = tuple(t.strip() for t in args.topics.split(",") if t.strip())
    if not topics:
        raise CodebookError("--topics: give at least one topic")
    train_rows, eval_rows, texts = load_data(cfg.data, tokenizer, args.max_docs)
    ccfg = CompareConfig(site=args.site, steps=args.steps, batch_tokens=args.batch_tokens,
                         max_train_tokens=args.max_train_tokens, eval_batch=args.batch_size,
                         topics=topics, max_length=cfg.data.seq_len,
                         codes_per_topic=args.codes_per_topic,
                         samples_per_prompt=args.samples_per_prompt,
                         gen_tokens=args.gen_tokens, seed=args.seed)
    report = compare_site(model, tokenizer, train_rows, eval_rows, texts, ccfg, out, sae)
    print(format_report(report))
    print(json.dumps({"report": str(out / "report.json"), "html": str(out / "report.html")}))
    return 0
