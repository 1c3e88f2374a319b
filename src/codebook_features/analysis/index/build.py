""":func:`build_index`: run a codebook model over a corpus and write the index's shards."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import CodebookError
from ...io import fault_point, read_json, write_json
from .fingerprints import codebook_fingerprint, site_fingerprints, site_infos
from .layout import (
    ARRAYS,
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    META_NAME,
    count_offsets,
    file_check,
    grid_columns,
    shard_damage,
    shard_file,
)
from .texts import _text_batches, encode_long, token_windows


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
