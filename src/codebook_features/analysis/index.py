"""Build a code index: the codes a :class:`CodebookModel` chooses on every token of a corpus.

Layout of an index folder (one shard per ``shard_tokens`` tokens, whole documents only)::

    meta.json                        model base_info, sites, codebook fingerprint (sha256 of
                                     the codebook weights), tokenizer, settings, shards done
    shard-00000.tokens.parquet       doc, pos, token_id, token, start, end, pred_id (one row
                                     per token; pred_id: the model's top-1 prediction of the
                                     next token there, the argmax of its logits with the
                                     codebooks on; absent in indexes built before it was
                                     recorded, ``meta["predictions"]`` says which)
    shard-00000.codes.parquet        doc, pos, site, grp, slot, code, score (one row per code)
    shard-00000.docs.parquet         doc, text
    shard-00000.grid.npy             int32 (tokens, slots): every token's codes, row = token
                                     in (doc, pos) order, columns = (site, grp, slot)
    shard-00000.counts.npy           int64 (sum over sites of groups * num_codes): how many
                                     tokens each (site, grp, code) fires on

The grid and the counts are what the browser's interactive queries read: the codes at a token
are one row of a memory-mapped array, and a regex's hits are a ``bincount`` over the rows of
the matching tokens; nothing is loaded into memory whole.

The code table is "exploded" (one row per token, site, group and slot): every query is a
plain filter or GROUP BY on flat integer columns (no list unnesting), and each shard is sorted
by ``(site, grp, code, doc, pos)`` so Parquet row-group statistics let DuckDB skip everything
but the rows of the code asked for. ``site`` is the site's index in ``meta["sites"]``.

Documents longer than the model's context are indexed whole, in consecutive windows of
``max_length`` tokens, each run as its own sequence (positions count on through the
document).

Shard files are written under a temporary name and renamed; ``meta.json`` is rewritten
atomically after each shard and lists the shards completed with each file's size and SHA-256,
so only listed shards are read, and a rerun skips them (a shard without a meta entry is
written again). Opening an index checks every shard file's size and structure, and its
checksum when the index is small enough (:data:`VERIFY_BYTES`); a rerun of
:func:`build_index` checks every checksum and rebuilds the damaged shards.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CodebookError
from ..io import fault_point, read_json, write_json

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


def token_windows(ids: Sequence[int], max_length: int) -> list[tuple[int, list[int]]]:
    """A document's token ids cut into consecutive windows of at most ``max_length``:
    ``[(first position, ids)]``; none for an empty document (no forward runs on nothing)."""
    ids = list(ids)
    return [(s, ids[s:s + max_length]) for s in range(0, len(ids), max_length)]


def encode_long(tokenizer: Any, texts: list[str], **kw: Any) -> Any:
    """``tokenizer(texts, **kw)`` without truncation and without the warning that a text is
    longer than the model's limit (such texts are run in windows)."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    key = "sequence-length-is-longer-than-the-specified-maximum"
    had = None if flags is None else flags.get(key)
    if flags is not None:
        flags[key] = True
    try:
        return tokenizer(texts, truncation=False, **kw)
    finally:
        if flags is not None:
            if had is None:
                flags.pop(key, None)
            else:
                flags[key] = had


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


def _text_batches(texts: Any, text_column: str, size: int) -> Iterator[list[str]]:
    """``texts`` in lists of ``size`` strings, read lazily: a ``datasets.Dataset`` a slice at
    a time, a ``datasets.IterableDataset`` (streaming) or any other iterable one item at a
    time, so no more than a batch of them is held here."""
    try:
        from datasets import Dataset, IterableDataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        Dataset = IterableDataset = None  # noqa: N806
    if Dataset is not None and isinstance(texts, Dataset):
        if text_column not in texts.column_names:
            raise CodebookError(f"build_index: the dataset has no column {text_column!r} "
                                f"(columns: {texts.column_names}); pass text_column=")
        for i in range(0, len(texts), size):
            yield [str(t) for t in texts[i:i + size][text_column]]
        return
    if IterableDataset is not None and isinstance(texts, IterableDataset):
        columns = texts.column_names  # None until a row is read, for some streams
        if columns is not None and text_column not in columns:
            raise CodebookError(f"build_index: the dataset has no column {text_column!r} "
                                f"(columns: {columns}); pass text_column=")

        def column(rows: Iterator[dict[str, Any]]) -> Iterator[Any]:
            for row in rows:
                if text_column not in row:
                    raise CodebookError(f"build_index: the dataset has no column "
                                        f"{text_column!r} (columns: {list(row)}); pass "
                                        "text_column=")
                yield row[text_column]

        items: Iterator[Any] = column(iter(texts))
    elif isinstance(texts, str | bytes | dict) or not isinstance(texts, Iterable):
        raise CodebookError("build_index: texts must be a list of strings (or any iterable "
                            "of strings), or a datasets.Dataset or IterableDataset with a "
                            "text column")
    else:
        items = iter(texts)
    while True:
        chunk = list(islice(items, size))
        if not chunk:
            return
        for t in chunk:
            if not isinstance(t, str):
                raise CodebookError(f"build_index: texts must be strings, got "
                                    f"{type(t).__name__}; pass the text column")
        yield chunk


def _write_npy(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
    fault_point("shard-file")


def _write_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, row_group_size=131_072, compression="zstd")
    os.replace(tmp, path)
    fault_point("shard-file")


class _Shard:
    """Rows of the shard being filled."""

    def __init__(self) -> None:
        self.docs: list[int] = []
        self.texts: list[str] = []
        self.tok: dict[str, list[np.ndarray]] = {k: [] for k in
                                                  ("doc", "pos", "token_id", "start", "end",
                                                   "pred_id")}
        self.tok_text: list[str] = []
        self.codes: dict[str, list[np.ndarray]] = {k: [] for k in
                                                    ("doc", "pos", "site", "grp", "slot",
                                                     "code", "score")}
        self.tokens = 0


def build_index(model: Any, tokenizer: Any, texts: Any, path: str | os.PathLike,
                shard_tokens: int = 100_000, batch_size: int = 8, max_length: int | None = None,
                text_column: str = "text", sites: Sequence[str] | None = None,
                codebooks: str | os.PathLike | None = None) -> Path:
    """Run ``model`` (a CodebookModel) over ``texts`` and write a code index into ``path``.

    ``texts``: a list of strings, any iterable of strings (a generator is read as the index
    is built), a ``datasets.Dataset``, or a streaming ``datasets.IterableDataset``, the
    datasets with ``text_column``. Texts are read a batch at a time, so a stream of any length
    is indexed in bounded memory, into the same index as a list of the same texts. Every text
    is tokenized with ``tokenizer`` (a fast tokenizer; special tokens such as BOS are added as
    the tokenizer does by default) and indexed whole, run in windows of ``max_length`` tokens
    (default: the tokenizer's and the model's limit). Every token's row also records the
    model's own top-1 prediction of the next token (``pred_id``: argmax of the logits,
    codebooks on). Documents are run ``batch_size`` at a time (``batch_size`` windows per
    forward), right-padded. A shard is closed after the first batch that brings it to
    ``shard_tokens`` tokens, so memory stays bounded. Rerunning with the same arguments (and
    the same texts in the same order) resumes: shards listed in ``meta.json`` are skipped,
    but for damaged ones (a file missing, truncated or changed: see :func:`shard_damage`),
    which are rebuilt. ``codebooks``: the folder the model's codebooks were loaded from,
    recorded so that tools (the browser) can load the model again. Returns the path.
    """
    import pyarrow as pa

    if not getattr(tokenizer, "is_fast", False):
        raise CodebookError("build_index needs a fast tokenizer (character offsets via "
                            "return_offsets_mapping); load it with use_fast=True")
    if shard_tokens < 1 or batch_size < 1:
        raise CodebookError(f"build_index: shard_tokens={shard_tokens} and batch_size="
                            f"{batch_size} must be >= 1")
    all_sites = site_infos(model)
    if sites is not None:
        unknown = sorted(set(sites) - {s["name"] for s in all_sites})
        if unknown:
            raise CodebookError(f"build_index: unknown site(s) {unknown}; sites: "
                                f"{', '.join(s['name'] for s in all_sites)}")
        all_sites = [s for s in all_sites if s["name"] in set(sites)]
    if not all_sites:
        raise CodebookError("build_index: the model has no codebook sites to index")
    if max_length is None:
        limits = [int(tokenizer.model_max_length)]
        mpe = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(mpe, int):
            limits.append(mpe)
        max_length = min(limits)
    if not model.enabled:
        raise CodebookError("build_index: the model's codebooks are disabled; call "
                            "model.enable_codebooks() first")

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if max_length < 1:
        raise CodebookError(f"build_index: max_length={max_length} must be >= 1")
    settings = {"shard_tokens": int(shard_tokens), "batch_size": int(batch_size),
                "max_length": int(max_length), "text_column": text_column, "windows": True}
    meta: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "base_model": model.base_info(),
        "sites": all_sites, "tokenizer": str(getattr(tokenizer, "name_or_path", "") or ""),
        "settings": settings, "shards": [], "complete": False, "predictions": True,
    }
    meta["site_fingerprints"] = site_fingerprints(model, [s["name"] for s in all_sites])
    meta["codebook_fingerprint"] = codebook_fingerprint(meta["site_fingerprints"])
    if codebooks is not None:
        meta["codebooks"] = str(Path(codebooks).resolve())
    meta_path = path / META_NAME
    if meta_path.exists():
        old = read_json(meta_path)
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise CodebookError(f"{meta_path}: not a code index; pass an empty folder")
        same = all(old.get(k) == meta[k] for k in ("base_model", "sites", "tokenizer",
                                                    "settings"))
        if not same:
            raise CodebookError(f"{path}: an index built with another model, tokenizer or "
                                "settings is there; pass a new folder or delete it")
        if old.get("codebook_fingerprint", meta["codebook_fingerprint"]) != \
                meta["codebook_fingerprint"]:
            raise CodebookError(f"{path}: an index built with codebooks of fingerprint "
                                f"{old['codebook_fingerprint']} is there, this model's "
                                f"codebooks have {meta['codebook_fingerprint']} (same shapes, "
                                "other weights); pass the model it was built with to resume, "
                                "or a new folder")
        if "codebook_fingerprint" not in old:  # begun by an older version: stays unchecked
            del meta["codebook_fingerprint"], meta["site_fingerprints"]
        if old.get("shards") and not old.get("predictions"):
            # begun by a version that did not record predictions: every shard's tokens table
            # keeps the same columns
            meta["predictions"] = False
        width = int(grid_columns(meta["sites"])[-1])
        meta["shards"] = []
        for s in old.get("shards", []):
            why = shard_damage(path, s, width)
            if why is None:
                meta["shards"].append(s)
            else:
                import sys

                print(f"index: shard {s['id']} of {path} is damaged ({why}); rebuilding it",
                      file=sys.stderr, flush=True)
    done = {s["id"]: s for s in meta["shards"]}

    site_index = {s["name"]: i for i, s in enumerate(meta["sites"])}
    cols = np.asarray(grid_columns(meta["sites"]), np.int64)
    cnt_off = np.asarray(count_offsets(meta["sites"]), np.int64)
    slots = np.asarray([s["k"] for s in meta["sites"]], np.int64)
    ncodes = np.asarray([s["num_codes"] for s in meta["sites"]], np.int64)
    layers = [(site_index[s["name"]], model.site(s["name"])) for s in all_sites]
    device = next(iter(model.parameters())).device
    was_training = model.training
    model.eval()

    def flush(shard: _Shard, sid: int) -> None:
        files = {k: shard_file(sid, k) for k in (*KINDS, *ARRAYS)}
        info = {"id": sid, "first_doc": shard.docs[0], "end_doc": shard.docs[-1] + 1,
                "tokens": shard.tokens, "files": files}
        old = done.get(sid)
        if old is not None:
            if {k: old[k] for k in ("first_doc", "end_doc", "tokens")} != \
                    {k: info[k] for k in ("first_doc", "end_doc", "tokens")}:
                raise CodebookError(f"{path}: shard {sid} holds other documents than these "
                                    "texts give; pass the same texts or a new folder")
            return
        tok = {k: np.concatenate(v) for k, v in shard.tok.items()}
        columns = {
            "doc": tok["doc"].astype(np.int64), "pos": tok["pos"].astype(np.int32),
            "token_id": tok["token_id"].astype(np.int32),
            "token": pa.array(shard.tok_text, pa.string()),
            "start": tok["start"].astype(np.int32), "end": tok["end"].astype(np.int32)}
        if meta["predictions"]:
            columns["pred_id"] = tok["pred_id"].astype(np.int32)
        _write_parquet(pa.table(columns), path / files["tokens"])
        c = {k: np.concatenate(v) for k, v in shard.codes.items()}
        # Grid: row = the token's row in the tokens table, column = (site, grp, slot).
        first_row = np.cumsum(np.concatenate([[0], np.bincount(tok["doc"] - shard.docs[0])]))
        row = first_row[c["doc"] - shard.docs[0]] + c["pos"]
        grid = np.full((shard.tokens, int(cols[-1])), -1, np.int32)
        grid[row, cols[c["site"]] + c["grp"] * slots[c["site"]] + c["slot"]] = c["code"]
        _write_npy(grid, path / files["grid"])
        counts = np.bincount(cnt_off[c["site"]] + c["grp"] * ncodes[c["site"]] + c["code"],
                             minlength=int(cnt_off[-1]))
        _write_npy(counts.astype(np.int64), path / files["counts"])
        del grid
        order = np.lexsort((c["pos"], c["doc"], c["code"], c["grp"], c["site"]))
        score = c["score"][order].astype(np.float32)  # NaN (slots added by interventions): null
        _write_parquet(pa.table({
            "doc": c["doc"][order].astype(np.int64), "pos": c["pos"][order].astype(np.int32),
            "site": c["site"][order].astype(np.int16), "grp": c["grp"][order].astype(np.int16),
            "slot": c["slot"][order].astype(np.int16), "code": c["code"][order].astype(np.int32),
            "score": pa.array(score, mask=np.isnan(score))}), path / files["codes"])
        _write_parquet(pa.table({"doc": np.asarray(shard.docs, np.int64),
                                 "text": pa.array(shard.texts, pa.string())}),
                       path / files["docs"])
        info["checks"] = {k: file_check(path / f) for k, f in files.items()}
        meta["shards"] = sorted([*meta["shards"], info], key=lambda s: s["id"])
        done[sid] = info
        write_json(meta_path, meta)
        fault_point("shard")

    shard, sid, doc = _Shard(), 0, 0
    try:
        with torch.no_grad():
            for batch in _text_batches(texts, text_column, batch_size):
                enc = encode_long(tokenizer, batch, return_offsets_mapping=True)
                ids_list = enc["input_ids"]
                skip = sid in done
                if not skip:  # every document whole, in windows of max_length tokens
                    rows = [(j, p0, w) for j, ids in enumerate(ids_list)
                            for p0, w in token_windows(ids, max_length)]
                    got: list[np.ndarray] = []
                    for r in range(0, len(rows), batch_size):
                        got.extend(_run_batch(model, layers, rows[r:r + batch_size], device,
                                              shard, doc, tokenizer.pad_token_id))
                    preds = [np.concatenate([p for (j2, _, _), p in zip(rows, got, strict=True)
                                             if j2 == j] or [np.zeros(0, np.int32)])
                             for j in range(len(ids_list))]
                for j, (text, ids) in enumerate(zip(batch, ids_list, strict=True)):
                    offs = np.asarray(enc["offset_mapping"][j], dtype=np.int64).reshape(-1, 2)
                    n = len(ids)
                    shard.docs.append(doc + j)
                    shard.tokens += n
                    if not skip:
                        shard.texts.append(text)
                        shard.tok["doc"].append(np.full(n, doc + j))
                        shard.tok["pos"].append(np.arange(n))
                        shard.tok["token_id"].append(np.asarray(ids))
                        shard.tok["start"].append(offs[:, 0])
                        shard.tok["end"].append(offs[:, 1])
                        shard.tok["pred_id"].append(preds[j])
                        pieces = tokenizer.convert_ids_to_tokens(ids)
                        shard.tok_text.extend(
                            text[s:e] if e > s else piece
                            for (s, e), piece in zip(offs.tolist(), pieces, strict=True))
                doc += len(batch)
                if shard.tokens >= shard_tokens:
                    flush(shard, sid)
                    shard, sid = _Shard(), sid + 1
            if shard.docs:
                flush(shard, sid)
                sid += 1
    finally:
        model.train(was_training)
    if doc == 0:
        raise CodebookError("build_index: no texts; pass at least one")
    meta["num_docs"] = doc
    meta["num_tokens"] = sum(s["tokens"] for s in meta["shards"])
    meta["complete"] = True
    write_json(meta_path, meta)
    return path


def _run_batch(model: Any, layers: list[tuple[int, Any]],
               rows: list[tuple[int, int, list[int]]], device: torch.device, shard: _Shard,
               doc0: int, pad_id: int | None) -> list[np.ndarray]:
    """Forward one right-padded batch of windows ``(document in batch, first position,
    ids)`` and append their codes to ``shard`` (document ``doc0 + j``, positions from the
    window's first); returns each window's top-1 next-token predictions (int32: the argmax
    of the logits, the lowest token id on a tie)."""
    ids_list = [r[2] for r in rows]
    width = max(max(len(r) for r in ids_list), 1)
    ids = torch.full((len(ids_list), width), pad_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(ids_list):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
    logits = out.logits if hasattr(out, "logits") else out[0]
    preds = logits.argmax(-1).to(torch.int32).cpu().numpy()
    preds = [preds[i, :len(r)] for i, r in enumerate(ids_list)]
    for site, layer in layers:
        codes, scores = layer.last_codes, layer.last_scores
        if codes is None:
            raise CodebookError(f"build_index: site {layer.config.name} chose no codes in the "
                                "forward; is it bypassed?")
        codes = codes.reshape(len(ids_list), width, *codes.shape[-2:]).cpu().numpy()
        scores = scores.reshape(len(ids_list), width, *scores.shape[-2:]).float().cpu().numpy()
        g, k = codes.shape[-2:]
        if k != layer.config.k:
            raise CodebookError(f"build_index: site {layer.config.name} chose {k} codes per "
                                f"group, its k is {layer.config.k}; clear the interventions "
                                "that add codes (model.clear_interventions()) before indexing")
        if scores.shape[-1] != k:  # interventions appended slots: no scores for those
            pad = np.full((*scores.shape[:-1], k - scores.shape[-1]), np.nan, np.float32)
            scores = np.concatenate([scores, pad], -1)
        for i, (j, p0, r) in enumerate(rows):
            n = len(r)
            # Narrow dtypes: a shard holds tokens * sum(groups * k) rows.
            pos, grp, slot = np.meshgrid(np.arange(p0, p0 + n, dtype=np.int32),
                                         np.arange(g, dtype=np.int16),
                                         np.arange(k, dtype=np.int16), indexing="ij")
            shard.codes["doc"].append(np.full(n * g * k, doc0 + j, np.int64))
            shard.codes["pos"].append(pos.reshape(-1))
            shard.codes["site"].append(np.full(n * g * k, site, np.int16))
            shard.codes["grp"].append(grp.reshape(-1))
            shard.codes["slot"].append(slot.reshape(-1))
            shard.codes["code"].append(codes[i, :n].reshape(-1).astype(np.int32))
            shard.codes["score"].append(scores[i, :n].reshape(-1).astype(np.float32))
    return preds
