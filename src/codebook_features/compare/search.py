"""Interpretability the paper's way: regex code search over the held-out documents, the
best code, SAE latent and neuron per topic."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CodebookError
from ..topics import topic_pattern
from .site import _SiteView


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
    """Each topic's regex: ``patterns[topic]``, the topic's words
    (:data:`codebook_features.topics.TOPIC_WORDS`), or the topic as a whole word
    (case-insensitive)."""
    return {t: topic_pattern(t, patterns) for t in topics}


def interpretability(table: TokenTable, texts: Sequence[str], rxs: dict[str, re.Pattern[str]],
                     num_codes: int, num_latents: int, groups_codes: int) -> dict[str, Any]:
    """Per topic: the best code, the best SAE latent and the best neuron at each one's recall
    (see the module docstring); ``mean``: their precisions and recalls averaged over the
    topics where both a code and a latent qualify."""
    from ..analysis.search import best_neuron_precision

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
