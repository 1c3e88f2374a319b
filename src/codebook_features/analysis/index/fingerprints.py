"""Which model an index was built with: its sites and the codebooks' weight fingerprints,
checked when an index is opened or extended."""

from __future__ import annotations

import hashlib
import os
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ...errors import CodebookError


def site_infos(model: Any) -> list[dict[str, Any]]:
    """Name, groups, k and num_codes of every site of a CodebookModel, in site order."""
    return [{"name": name, "groups": layer.config.groups, "k": layer.config.k,
             "num_codes": layer.config.num_codes} for name, layer in model.sites.items()]


_LAYER_HASHES: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], str]] = \
    weakref.WeakKeyDictionary()


def layer_fingerprint(layer: Any) -> str:
    """``"sha256:<hex>"`` over a codebook layer's parameters (the code vectors and the
    LayerNorm's affine, sorted by name), each as its name, shape and float32 little-endian
    bytes: equal for layers with the same weights, whatever their device or a save and
    reload. Cached per layer until a parameter changes (in place or replaced)."""
    params = sorted(layer.named_parameters(), key=lambda np_: np_[0])
    hit = _LAYER_HASHES.get(layer)
    if hit is not None and len(hit[0]) == len(params) and all(
            n == n0 and ref() is p and p._version == v0
            for (n, p), (n0, ref, v0) in zip(params, hit[0], strict=True)):
        return hit[1]
    h = hashlib.sha256()
    for name, p in params:
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name} {tuple(t.shape)}\n".encode())
        h.update(t.numpy().astype("<f4", copy=False).tobytes())
    out = "sha256:" + h.hexdigest()
    _LAYER_HASHES[layer] = (tuple((n, weakref.ref(p), p._version) for n, p in params), out)
    return out


def site_fingerprints(model: Any, sites: Sequence[str] | None = None) -> dict[str, str]:
    """:func:`layer_fingerprint` of each of ``sites`` (default: every site of the model)."""
    return {name: layer_fingerprint(model.site(name))
            for name in (model.site_names if sites is None else sites)}


def codebook_fingerprint(per_site: dict[str, str]) -> str:
    """One ``"sha256:<hex>"`` for a model's codebooks: over the sites' names and
    :func:`site_fingerprints`, sorted by name."""
    h = hashlib.sha256()
    for name, fp in sorted(per_site.items()):
        h.update(f"{name} {fp}\n".encode())
    return "sha256:" + h.hexdigest()


def check_layer(meta: dict[str, Any], site: str, layer: Any, where: str | os.PathLike) -> None:
    """Raise a CodebookError if ``layer`` does not hold the weights of ``site``'s codebook in
    the index at ``where`` (when the index records per-site fingerprints)."""
    want = (meta.get("site_fingerprints") or {}).get(site)
    if want is None:
        return
    got = layer_fingerprint(layer)
    if got != want:
        raise CodebookError(_other_weights(meta, where, site, want, got))


def _other_weights(meta: dict[str, Any], where: str | os.PathLike, site: str, want: str,
                   got: str) -> str:
    built = f" (codebooks {meta['codebooks']})" if meta.get("codebooks") else ""
    return (f"{where}: the index was built with other codebook weights of the same shapes: "
            f"site {site} has fingerprint {want} in the index{built} but {got} in this "
            "model; pass the model the index was built with, or rebuild the index with this "
            "model into a new folder")


def check_model(meta: dict[str, Any], model: Any, where: str | os.PathLike) -> None:
    """Raise a CodebookError if ``model`` is not the model the index at ``where`` was built
    with: base model type, layer count, width, sites with their groups, k, num_codes, and the
    codebooks' weights (:func:`site_fingerprints`, recorded in ``meta.json``). An index
    without a recorded fingerprint (built by an older version) gets a warning instead."""
    info = model.base_info()
    saved = meta["base_model"]
    for key in ("model_type", "num_layers", "hidden_size"):
        if saved.get(key) is not None and info.get(key) != saved[key]:
            raise CodebookError(f"{where}: the index was built with a model of {key} "
                                f"{saved[key]}, this model has {info.get(key)}; pass the "
                                "model the index was built with")
    mine = {s["name"]: s for s in site_infos(model)}
    for s in meta["sites"]:
        m = mine.get(s["name"])
        if m is None:
            raise CodebookError(f"{where}: the index has site {s['name']!r}, which this model "
                                f"lacks (sites: {', '.join(mine) or 'none'}); pass the model "
                                "the index was built with")
        if m != s:
            raise CodebookError(f"{where}: site {s['name']} has groups/k/num_codes "
                                f"{m['groups']}/{m['k']}/{m['num_codes']} in this model but "
                                f"{s['groups']}/{s['k']}/{s['num_codes']} in the index; pass "
                                "the model the index was built with")
    want = meta.get("site_fingerprints")
    if want is None:
        warnings.warn(f"{where}: the index records no codebook fingerprint (built by an older "
                      "codebook-features), so whether this model's codebook weights are the "
                      "ones it was built with cannot be checked; rebuild the index to record "
                      "it", UserWarning, stacklevel=3)
        return
    for site in want:
        check_layer(meta, site, model.site(site), where)
