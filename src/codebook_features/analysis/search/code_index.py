"""The code index opened for queries: :class:`CodeIndex`, its files and token rows (each
route of its queries sits in its own module), and the shard check."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import CodebookError
from ...io import read_json
from ..index import (
    FORMAT,
    FORMAT_VERSION,
    META_NAME,
    VERIFY_BYTES,
    check_model,
    count_offsets,
    grid_columns,
    shard_damage,
)
from .contexts import _Contexts
from .neurons import _NeuronBaseline
from .related import _RelatedCodes
from .results import CodeMatch
from .text_search import _TextSearch


class CodeIndex(_Contexts, _TextSearch, _NeuronBaseline, _RelatedCodes):
    """A code index opened for queries: ``CodeIndex.open(path, model=None, tokenizer=None)``.

    ``tokenizer`` (optional, settable): names token ids that never occur in the indexed text
    (the model's predicted next tokens can be such); without one, the index's tokenizer is
    loaded from local files when it can be, else such a token is shown as ``"<id N>"``.
    """

    def __init__(self, path: Path, meta: dict[str, Any], model: Any = None,
                 tokenizer: Any = None) -> None:
        import duckdb

        self.path = path
        self.meta = meta
        self.model = model
        self.sites: list[str] = [s["name"] for s in meta["sites"]]
        self.con = duckdb.connect()
        try:  # every query reads the same files: keep their footers (row-group statistics)
            self.con.execute("SET parquet_metadata_cache = true")
        except duckdb.Error:  # pragma: no cover - an older DuckDB without the setting
            pass
        self._cols = grid_columns(meta["sites"])
        self._offs = count_offsets(meta["sites"])
        self._shard_rows = np.cumsum([0] + [sh["tokens"] for sh in meta["shards"]])
        self._grids: list[np.ndarray] | None = None
        self._doc_rows: np.ndarray | None = None
        self._counts: np.ndarray | None = None
        self._tok_cols: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._preds: np.ndarray | None = None
        self._has_preds: bool | None = None
        self.tokenizer: Any = tokenizer
        self._tokenizer_tried = False
        self._vocab: dict[int, str] | None = None
        self._texts: dict[int, tuple[str, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._regex_cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        for kind in ("tokens", "codes", "docs"):
            files = ", ".join("'" + str(path / s["files"][kind]).replace("'", "''") + "'"
                              for s in meta["shards"])
            self.con.execute(f"CREATE VIEW {kind} AS SELECT * FROM read_parquet([{files}])")

    @classmethod
    def open(cls, path: str | os.PathLike, model: Any = None, tokenizer: Any = None
             ) -> CodeIndex:
        """Open the index at ``path``; with ``model``, check it is the model it was built with
        (shapes, and the codebook weights' fingerprint: another model's codebooks of the same
        shapes are refused; an index built before fingerprints were recorded opens with a
        warning).

        A folder without ``meta.json``, or with an index still being built (or interrupted),
        is refused with a CodebookError.
        """
        path = Path(path)
        meta_path = path / META_NAME
        if not meta_path.is_file():
            raise CodebookError(f"{path}: no code index there ({META_NAME} missing); build "
                                "one with build_index")
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CodebookError(f"{meta_path}: not a code index meta file; build the index "
                                "with build_index")
        kinds = {"shards": list, "sites": list, "settings": dict, "base_model": dict}
        bad = [k for k, t in kinds.items() if not isinstance(meta.get(k), t)]
        if meta.get("complete"):
            bad += [k for k in ("num_tokens", "num_docs") if not isinstance(meta.get(k), int)]
        if meta.get("version") == FORMAT_VERSION and bad:
            raise CodebookError(f"{meta_path}: malformed ({', '.join(bad)} missing or of the "
                                "wrong type); rebuild the index with build_index into a new "
                                "folder")
        if meta.get("version") != FORMAT_VERSION:
            raise CodebookError(f"{path}: the code index has format version "
                                f"{meta.get('version')}, this codebook-features reads version "
                                f"{FORMAT_VERSION}; rebuild it with build_index into a new "
                                "folder")
        if not meta.get("complete"):
            raise CodebookError(f"{path}: the code index is incomplete ({len(meta['shards'])} "
                                "shard(s) done); rerun build_index with the same arguments "
                                "to finish it")
        verify_shards(path, meta)
        if model is not None:
            check_model(meta, model, path)
        return cls(path, meta, model, tokenizer)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> CodeIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def num_docs(self) -> int:
        return int(self.meta["num_docs"])

    def _site(self, site: str) -> tuple[int, dict[str, Any]]:
        if site not in self.sites:
            raise CodebookError(f"unknown site {site!r}; the index has sites "
                                f"{', '.join(self.sites)}")
        i = self.sites.index(site)
        return i, self.meta["sites"][i]

    def _code(self, site: str, code: int, group: int) -> int:
        i, info = self._site(site)
        if not 0 <= int(group) < info["groups"]:
            raise CodebookError(f"group {group} out of range for site {site} "
                                f"({info['groups']} group(s)); pick 0..{info['groups'] - 1}")
        if not 0 <= int(code) < info["num_codes"]:
            raise CodebookError(f"code {code} out of range for site {site} "
                                f"({info['num_codes']} codes); pick 0..{info['num_codes'] - 1}")
        return i

    def _rows(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        return self.con.execute(sql, params or []).fetchall()

    def _doc_texts(self, docs: list[int]) -> dict[int, str]:
        if not docs:
            return {}
        return dict(self._rows("SELECT doc, text FROM docs WHERE doc IN "
                               "(SELECT unnest(?::BIGINT[]))", [sorted(set(docs))]))

    @property
    def doc_rows(self) -> np.ndarray:
        """int64 (num_docs + 1,): the global token row where each document starts (rows are
        tokens in (doc, pos) order over the whole index), then the total."""
        if self._doc_rows is None:
            counts = np.zeros(self.num_docs, np.int64)
            got = self.con.execute("SELECT doc, count(*) AS n FROM tokens GROUP BY doc"
                                   ).fetchnumpy()
            counts[np.asarray(got["doc"])] = np.asarray(got["n"])
            self._doc_rows = np.concatenate([[0], np.cumsum(counts)])
        return self._doc_rows

    def rows_of(self, doc: Any, pos: Any) -> np.ndarray:
        """Global token rows of (doc, pos) pairs (arrays)."""
        return self.doc_rows[np.asarray(doc, np.int64)] + np.asarray(pos, np.int64)

    @property
    def counts(self) -> np.ndarray:
        """int64: how many tokens each (site, grp, code) fires on, all sites concatenated
        (site ``i`` starts at ``count_offsets(meta['sites'])[i]``, then grp * num_codes)."""
        if self._counts is None:
            total = np.zeros(self._offs[-1], np.int64)
            for sh in self.meta["shards"]:
                total += np.load(self.path / sh["files"]["counts"])
            self._counts = total
        return self._counts

    def grid_rows(self, rows: np.ndarray, site: str | None = None) -> np.ndarray:
        """Codes at global token ``rows`` (int array): int32 (len(rows), width), width = all
        sites' groups * k in site order, or only ``site``'s (groups * k, group-major)."""
        if self._grids is None:
            self._grids = [np.load(self.path / sh["files"]["grid"], mmap_mode="r")
                           for sh in self.meta["shards"]]
        lo, hi = 0, self._cols[-1]
        if site is not None:
            i = self._site(site)[0]
            lo, hi = self._cols[i], self._cols[i + 1]
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), hi - lo), np.int32)
        shard = np.searchsorted(self._shard_rows, rows, side="right") - 1
        for sh in np.unique(shard):
            sel = shard == sh
            out[sel] = self._grids[sh][rows[sel] - self._shard_rows[sh], lo:hi]
        return out

    def score_rows(self, site: str, rows: np.ndarray, min_hits: int = 1) -> list[CodeMatch]:
        """Every code of ``site`` scored against a set of positive token ``rows`` (global,
        distinct): precision = hits / fired, recall = hits / len(rows); codes with at least
        ``min_hits`` hits, sorted by precision, recall (descending), group, code."""
        i, info = self._site(site)
        rows = np.unique(np.asarray(rows, np.int64))
        if len(rows) == 0:
            return []
        nc, k = info["num_codes"], info["k"]
        codes = self.grid_rows(rows, site).astype(np.int64)  # (P, groups * k)
        grp = np.repeat(np.arange(info["groups"]), k)
        hits = np.bincount((grp * nc + codes).reshape(-1), minlength=info["groups"] * nc)
        fired = self.counts[self._offs[i]:self._offs[i + 1]]
        keep = np.flatnonzero(hits >= max(int(min_hits), 1))
        h, f = hits[keep], fired[keep]
        prec, rec = h / f, h / len(rows)
        order = np.lexsort((keep, -rec, -prec))  # keep = grp * nc + code: group, then code
        return [CodeMatch(int(keep[j] // nc), int(keep[j] % nc), float(prec[j]), float(rec[j]),
                          int(f[j]), int(h[j])) for j in order]

    def _token_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """token_id, start and end of every token by global row (int32; 12 bytes a token,
        read once)."""
        if self._tok_cols is None:
            import pyarrow.parquet as pq

            cols: list[list[np.ndarray]] = [[], [], []]
            for sh in self.meta["shards"]:
                t = pq.read_table(self.path / sh["files"]["tokens"],
                                  columns=["token_id", "start", "end"])
                for i, name in enumerate(("token_id", "start", "end")):
                    cols[i].append(t.column(name).to_numpy().astype(np.int32))
            self._tok_cols = tuple(np.concatenate(c) if c else np.zeros(0, np.int32)
                                   for c in cols)  # type: ignore[assignment]
        return self._tok_cols  # type: ignore[return-value]

    @property
    def has_predictions(self) -> bool:
        """Whether every shard's tokens table holds the model's next-token predictions
        (``pred_id``; indexes built before they were recorded do not)."""
        if self._has_preds is None:
            import pyarrow.parquet as pq

            self._has_preds = bool(self.meta["shards"]) and all(
                "pred_id" in pq.read_schema(self.path / sh["files"]["tokens"]).names
                for sh in self.meta["shards"])
        return self._has_preds

    @property
    def predictions(self) -> np.ndarray | None:
        """int32 (num_tokens,): by global row, the model's top-1 prediction of the token after
        each token (argmax of its logits with the codebooks on, recorded at build time); None
        when the index has none (see :attr:`has_predictions`)."""
        if self._preds is None and self.has_predictions:
            import pyarrow.parquet as pq

            self._preds = np.concatenate([
                pq.read_table(self.path / sh["files"]["tokens"], columns=["pred_id"])
                .column("pred_id").to_numpy().astype(np.int32)
                for sh in self.meta["shards"]])
        return self._preds

    def token_text(self, token_id: int) -> str:
        """A token id's text: the smallest text it has in the index, else (a token that never
        occurs there, e.g. one only predicted) the tokenizer's text for it (decoded, or its
        piece when it decodes to part of a character): :attr:`tokenizer`, else one loaded
        from local files only (the index's, else the base model's folder); else
        ``"<id N>"``."""
        text = self.vocab.get(int(token_id))
        if text is not None:
            return text
        if self.tokenizer is None and not self._tokenizer_tried:
            self._tokenizer_tried = True
            names = [self.meta.get("tokenizer"),
                     (self.meta.get("base_model") or {}).get("name_or_path")]
            for name in filter(None, names):
                try:
                    from transformers import AutoTokenizer

                    self.tokenizer = AutoTokenizer.from_pretrained(name,
                                                                   local_files_only=True)
                    break
                except Exception:  # not there: the next, or the id
                    continue
        if self.tokenizer is not None:
            try:
                piece = self.tokenizer.decode([int(token_id)])
                if not piece or "\ufffd" in piece:
                    piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
                if piece:
                    return str(piece)
            except Exception:  # an id outside the tokenizer's vocabulary
                pass
        return f"<id {int(token_id)}>"

    @property
    def vocab(self) -> dict[int, str]:
        """Token id -> its text (the smallest text it has in the index)."""
        if self._vocab is None:
            self._vocab = dict(self._rows("SELECT token_id, min(token) FROM tokens "
                                          "GROUP BY token_id"))
        return self._vocab

    def tokens(self) -> Any:
        """All tokens as a pyarrow Table ordered by (doc, pos): the row order that neuron
        activations passed to :meth:`regex_search` must follow."""
        rel = self.con.sql("SELECT * FROM tokens ORDER BY doc, pos")
        return (getattr(rel, "to_arrow_table", None) or rel.arrow)()  # duckdb 2 / 1


def verify_shards(path: str | os.PathLike, meta: dict[str, Any],
                  checksums: bool | None = None) -> None:
    """Raise a CodebookError naming the first damaged shard of the index at ``path`` (a
    file missing, truncated, unreadable, or unlike its recorded checksum: see
    :func:`codebook_features.analysis.index.shard_damage`). ``checksums``: compare every
    file's SHA-256 (default: when the shard files total at most
    :data:`codebook_features.analysis.index.VERIFY_BYTES`; sizes and structure always)."""
    path = Path(path)
    if checksums is None:
        total = sum((s.get("checks") or {}).get(k, {}).get("bytes", 0)
                    for s in meta["shards"] for k in s["files"])
        checksums = total <= VERIFY_BYTES
    width = int(grid_columns(meta["sites"])[-1])
    for s in meta["shards"]:
        why = shard_damage(path, s, width, checksums=checksums)
        if why is not None:
            raise CodebookError(f"{path}: shard {s['id']} is damaged ({why}); rerun "
                                "`codebook-features index` (or build_index) with the same "
                                "arguments to rebuild it")
