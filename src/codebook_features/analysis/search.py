"""Queries over a code index (see :mod:`.index`), run by DuckDB on its Parquet files."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CodebookError
from ..io import read_json
from .index import (
    FORMAT,
    FORMAT_VERSION,
    META_NAME,
    VERIFY_BYTES,
    check_layer,
    check_model,
    count_offsets,
    encode_long,
    grid_columns,
    shard_damage,
    token_windows,
)


@dataclass(frozen=True)
class Context:
    """One occurrence of a code: the token and the text around it."""

    doc: int
    position: int
    before: str
    token: str
    after: str
    score: float


@dataclass(frozen=True)
class CodeStats:
    """How often a code fires and on which tokens."""

    count: int
    """Token positions where the code is among the chosen codes (of its group)."""
    frequency: float
    """``count`` over all indexed tokens."""
    tokens: list[tuple[str, int]]
    """Most common tokens it fires on: (token text, count), most common first."""
    next_tokens: list[tuple[str, int]]
    """Most common tokens that follow the ones it fires on in the corpus (the next token of
    the same document)."""
    predicted_next_tokens: list[tuple[str, int]] | None = None
    """Most common next tokens the model itself predicts where the code fires (its top-1
    prediction, recorded when the index was built); None for an index built before
    predictions were recorded."""


@dataclass(frozen=True)
class CodeMatch:
    """A code's precision and recall on the token positions a regex matches."""

    group: int
    code: int
    precision: float
    recall: float
    fired: int
    """Token positions where the code fires."""
    hits: int
    """Of those, positions that overlap a match."""
    neuron_precision: float | None = None
    """Best neuron's precision when thresholded to at least the same recall (if given)."""


class CodeIndex:
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

    # ------------------------------------------------------------------ checks
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

    # ----------------------------------------------------------------- queries
    def top_contexts(self, site: str, code: int, group: int = 0, n: int = 20,
                     window: int = 10) -> list[Context]:
        """The ``n`` occurrences of ``code`` with the highest similarity score (ties: first
        document and position first), each with the text of up to ``window`` tokens before
        and after the token (sliced from the document by character offsets)."""
        s = self._code(site, code, group)
        if int(n) < 1 or int(window) < 0:
            raise CodebookError(f"top_contexts(n={n}, window={window}): need n >= 1 and "
                                "window >= 0")
        hits = self._rows(
            "SELECT doc, pos, score FROM codes WHERE site = ? AND grp = ? AND code = ? "
            "ORDER BY score DESC NULLS LAST, doc, pos LIMIT ?",
            [s, int(group), int(code), int(n)])
        texts = self._doc_texts([h[0] for h in hits])
        tid, starts, ends = self._token_columns()
        out = []
        for doc, pos, score in hits:
            text, first, last = texts[doc], self.doc_rows[doc], self.doc_rows[doc + 1]
            r = int(first + pos)
            start, end = int(starts[r]), int(ends[r])
            token = text[start:end] if end > start else self.vocab[int(tid[r])]
            b = starts[max(r - int(window), first):r]
            a = ends[r + 1:min(r + int(window) + 1, last)]
            before = text[min(int(b.min()), start):start] if len(b) else ""
            after = text[end:max(int(a.max()), end)] if len(a) else ""
            out.append(Context(int(doc), int(pos), before, token, after,
                               float("nan") if score is None else float(score)))
        return out

    def code_stats(self, site: str, code: int, group: int = 0, top: int = 10) -> CodeStats:
        """Frequency of ``code`` and the ``top`` most common tokens it fires on, that follow
        it in the corpus (``next_tokens``), and that the model predicts next where it fires
        (``predicted_next_tokens``; None for an index without recorded predictions). Ties
        are broken by token id; a token id's text is the smallest text it has in the index
        (for a predicted token that never occurs there: the tokenizer's piece)."""
        s = self._code(site, code, group)
        got = self.con.execute("SELECT doc, pos FROM codes WHERE site = ? AND grp = ? AND "
                               "code = ?", [s, int(group), int(code)]).fetchnumpy()
        doc = np.asarray(got["doc"], np.int64)
        rows = np.unique(self.rows_of(doc, got["pos"]))  # a code fires once per token
        tid = self._token_columns()[0]
        nxt = rows + 1
        nxt = nxt[nxt < self.doc_rows[np.searchsorted(self.doc_rows, rows, side="right")]]

        def common(r: np.ndarray, ids_of: np.ndarray = tid) -> list[tuple[str, int]]:
            c = np.bincount(ids_of[r]) if len(r) else np.zeros(0, np.int64)
            ids = np.lexsort((np.arange(len(c)), -c))[:int(top)]
            return [(self.token_text(int(i)), int(c[i])) for i in ids if c[i] > 0]

        count = len(rows)
        preds = self.predictions
        return CodeStats(count, count / max(self.num_tokens, 1), common(rows), common(nxt),
                         None if preds is None else common(rows, preds))

    def codes_at(self, doc: int, position: int) -> dict[str, list[list[int]]]:
        """Codes at token ``position`` of document ``doc``: site -> per group, the k codes in
        slot order."""
        if not 0 <= int(doc) < self.num_docs:
            raise CodebookError(f"document {doc} is not in the index (0..{self.num_docs - 1})")
        lo, hi = self.doc_rows[int(doc)], self.doc_rows[int(doc) + 1]
        if not 0 <= int(position) < hi - lo:
            raise CodebookError(f"position {position} is not in document {doc}; pick one "
                                f"below the document's token count ({hi - lo})")
        row = self.grid_rows(np.asarray([lo + int(position)]))[0]
        out: dict[str, list[list[int]]] = {}
        for i, info in enumerate(self.meta["sites"]):
            g, k = info["groups"], info["k"]
            out[info["name"]] = row[self._cols[i]:self._cols[i + 1]].reshape(g, k).tolist()
        return out

    # ---------------------------------------------------- token rows and the grid
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

    def windows(self, at: list[tuple[int, int]], window: int = 8) -> list[list[dict[str, Any]]]:
        """For each ``(doc, position)``: the tokens from ``position - window`` to ``position +
        window`` of the document as ``{"pos", "text"}``, ``text`` running from the previous
        token's end to this token's end (so the pieces joined give the text, whitespace
        included); a token without characters (e.g. BOS) gets its token string."""
        if int(window) < 0:
            raise CodebookError(f"windows(window={window}): need window >= 0")
        for doc, _ in at:
            if not 0 <= int(doc) < self.num_docs:
                raise CodebookError(f"document {doc} is not in the index "
                                    f"(0..{self.num_docs - 1})")
        texts = self._doc_texts([d for d, _ in at])
        tid, starts, ends = self._token_columns()
        out = []
        for doc, pos in at:
            first, last = int(self.doc_rows[doc]), int(self.doc_rows[doc + 1])
            lo, hi = max(int(pos) - int(window), 0), min(int(pos) + int(window), last - first - 1)
            text, prev, pieces = texts[doc], None, []
            for p in range(max(lo - 1, 0), hi + 1):
                start, end = int(starts[first + p]), int(ends[first + p])
                if p >= lo:
                    a = start if prev is None else min(prev, start)
                    pieces.append({"pos": p, "text": text[a:end] if end > start
                                   else self.vocab[int(tid[first + p])]})
                prev = end if end > start else prev
            out.append(pieces)
        return out

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

    def neuron_activations(self, model: Any, tokenizer: Any, site: str, batch_size: int = 8,
                           max_tokens: int | None = None) -> torch.Tensor:
        """The activations entering ``site``'s codebook (the site's neurons) on every indexed
        token: float32 ``(num_tokens, dim)`` in :meth:`tokens` order, for ``regex_search``'s
        ``neurons``. Runs ``model`` (the index's model) over the stored texts again.
        ``max_tokens``: only the first documents, as many as hold at least that many tokens
        in all (a sample for a quick neuron baseline)."""
        return self.neuron_activations_at(model, tokenizer, [site], batch_size,
                                          max_tokens)[site]

    def neuron_activations_at(self, model: Any, tokenizer: Any, sites: list[str],
                              batch_size: int = 8, max_tokens: int | None = None
                              ) -> dict[str, torch.Tensor]:
        """:meth:`neuron_activations` of several sites from one pass of the model."""
        check_model(self.meta, model, self.path)
        for site in sites:
            self._site(site)
        ndocs = self.num_docs
        if max_tokens is not None:
            ndocs = min(int(np.searchsorted(self.doc_rows, int(max_tokens), side="left")),
                        self.num_docs)
            ndocs = max(ndocs, 1)
        want = int(self.doc_rows[ndocs])
        layers = {site: model.site(site) for site in sites}
        max_length = int(self.meta["settings"]["max_length"])
        windows = bool(self.meta["settings"].get("windows"))
        device = next(iter(model.parameters())).device
        rows: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
        was_training = model.training
        model.eval()
        for layer in layers.values():
            layer.recorded = []
        try:
            with torch.no_grad():
                for shard in self.meta["shards"]:
                    if shard["first_doc"] >= ndocs:
                        break
                    f = str(self.path / shard["files"]["docs"]).replace("'", "''")
                    texts = [t for (t,) in self._rows(
                        f"SELECT text FROM read_parquet('{f}') WHERE doc < ? ORDER BY doc",
                        [ndocs])]
                    if windows:  # as indexed: every document whole, in windows
                        enc = encode_long(tokenizer, texts)["input_ids"]
                        seqs = [w for r in enc for _, w in token_windows(r, max_length)]
                    else:  # an index built when documents were cut to max_length
                        seqs = tokenizer(texts, truncation=True,
                                         max_length=max_length)["input_ids"]
                    for i in range(0, len(seqs), batch_size):
                        ids = seqs[i:i + batch_size]
                        width = max(max(len(r) for r in ids), 1)
                        x = torch.full((len(ids), width), tokenizer.pad_token_id or 0)
                        mask = torch.zeros_like(x)
                        for j, r in enumerate(ids):
                            x[j, :len(r)] = torch.tensor(r)
                            mask[j, :len(r)] = 1
                        for layer in layers.values():
                            layer.recorded.clear()
                        model(input_ids=x.to(device), attention_mask=mask.to(device))
                        for site, layer in layers.items():
                            a = layer.recorded[-1].reshape(len(ids), width, -1).float().cpu()
                            rows[site].extend(a[j, :len(r)] for j, r in enumerate(ids))
        finally:
            for layer in layers.values():
                layer.recorded = None
            model.train(was_training)
        out = {site: torch.cat(r) if r else torch.zeros(0, layers[site].config.dim)
               for site, r in rows.items()}
        got = next(iter(out.values())).shape[0] if out else want
        if got != want:
            raise CodebookError(f"neuron_activations: the tokenizer gives {got} tokens "
                                f"but the index holds {want}; pass the tokenizer the index "
                                "was built with")
        return out

    def regex_positions(self, pattern: str | re.Pattern[str]) -> Any:
        """Token positions (pyarrow Table ``doc, pos``) whose characters overlap a match.

        Matches are ``re.finditer(pattern, text)`` over each document's text; empty matches
        are ignored. Token ``[start, end)`` overlaps match ``[ms, me)`` when
        ``start < me and ms < end``; tokens with no characters (e.g. BOS) never match.
        """
        import pyarrow as pa

        rows = self.regex_rows(pattern)
        doc = np.searchsorted(self.doc_rows, rows, side="right") - 1
        return pa.table({"doc": doc.astype(np.int64),
                         "pos": (rows - self.doc_rows[doc]).astype(np.int32)})

    def regex_rows(self, pattern: str | re.Pattern[str], timeout: float | None = None
                   ) -> np.ndarray:
        """Global token rows (sorted int64) of :meth:`regex_positions`; the last few
        patterns' rows are cached.

        ``timeout``: seconds the whole search may take (for untrusted patterns: a pattern
        that backtracks catastrophically is stopped with a CodebookError); the pattern then
        runs on the ``regex`` module, which matches as ``re`` does.

        Speed: each shard's documents are searched as one string, joined by newlines, when
        the pattern has no anchors or lookarounds (``^ $ \\A \\Z (?< (?= (?!``) and no match
        spans a newline that joins two documents; otherwise document by document. Both give
        the same matches.
        """
        rx = _compile(pattern)
        key = (rx.pattern, rx.flags)
        if key in self._regex_cache:
            self._regex_cache.move_to_end(key)
            return self._regex_cache[key]
        if timeout is not None:
            rows = _with_deadline(rx, float(timeout), self._regex_rows)
        else:
            rows = self._regex_rows(rx, re.finditer)
        self._regex_cache[key] = rows
        while len(self._regex_cache) > 16:
            self._regex_cache.popitem(last=False)
        return rows

    def _regex_rows(self, rx: Any, finditer: Any) -> np.ndarray:
        """:meth:`regex_rows` uncached, matching with ``finditer(rx, text)``."""
        joinable = not any(t in rx.pattern for t in ("^", "$", "\\A", "\\Z", "(?<", "(?=",
                                                       "(?!"))
        out: list[np.ndarray] = []
        for i, row0 in enumerate(self._shard_rows[:-1]):
            joined, first, st, en = self._shard_text(i)
            spans = None
            if joinable:
                spans = np.asarray([a.span() for a in finditer(rx, joined)],
                                   np.int64).reshape(-1, 2)
                spans = spans[spans[:, 1] > spans[:, 0]]
                joins = first[1:-1] - 1  # the newline after each document but the last
                k = np.searchsorted(joins, spans[:, 0], side="left")
                if np.any((k < len(joins)) & (joins[np.minimum(k, len(joins) - 1)]
                                               < spans[:, 1])):
                    spans = None  # a match runs across two documents: search them one by one
            if spans is None:
                m = [(a.start() + int(first[d]), a.end() + int(first[d]))
                     for d in range(len(first) - 1)
                     for a in finditer(rx, joined[first[d]:first[d + 1] - 1])
                     if a.end() > a.start()]
                spans = np.asarray(m, np.int64).reshape(-1, 2)
            if len(spans) == 0:
                continue
            # First match ending after the token's start; it overlaps if it starts before the
            # token's end (matches are sorted and disjoint).
            j = np.searchsorted(spans[:, 1], st, side="right")
            ok = (j < len(spans)) & (en > st)
            ok &= spans[np.minimum(j, len(spans) - 1), 0] < en
            out.append(np.flatnonzero(ok).astype(np.int64) + int(row0))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _shard_text(self, i: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        """Shard ``i``'s documents joined by newlines, each document's first character in it
        (plus the end), and every token's start and end in it (by row; cached: the text plus
        16 bytes a token)."""
        if i not in self._texts:
            import pyarrow.parquet as pq

            sh = self.meta["shards"][i]
            t = pq.read_table(self.path / sh["files"]["docs"], columns=["doc", "text"])
            order = np.argsort(t.column("doc").to_numpy(), kind="stable")
            texts = t.column("text").take(order).to_pylist()
            lengths = np.fromiter((len(x) for x in texts), np.int64, len(texts))
            first = np.concatenate([[0], np.cumsum(lengths + 1)])
            lo, hi = int(self._shard_rows[i]), int(self._shard_rows[i + 1])
            _, starts, ends = self._token_columns()
            docs = np.searchsorted(self.doc_rows, np.arange(lo, hi), side="right") - 1
            char0 = first[docs - sh["first_doc"]]
            self._texts[i] = ("\n".join(texts), first, starts[lo:hi] + char0,
                              ends[lo:hi] + char0)
        return self._texts[i]

    def regex_search(self, pattern: str | re.Pattern[str], site: str, n: int | None = None,
                     min_hits: int = 1, neurons: Any = None) -> list[CodeMatch]:
        """Codes of ``site`` scored against a regex over the text.

        Positives P: token positions overlapping a match (see :meth:`regex_positions`). For a
        code (group, code), F: positions where it is among the chosen codes. precision =
        |F ∩ P| / |F|, recall = |F ∩ P| / |P|. Codes with at least ``min_hits`` hits are
        returned sorted by precision, then recall (descending), then group and code; the first
        ``n`` if given. ``neurons``: optional activations of shape (num_tokens, num_neurons)
        in :meth:`tokens` order (or only the rows of the index's first documents, as
        ``neuron_activations(max_tokens=)`` gives); then each match also gets the best neuron's
        precision on those tokens when the neuron is thresholded to fire on the fewest
        top-activation tokens that reach the code's recall (ties in activation are broken by
        token order).
        """
        self._site(site)
        rows = self.regex_rows(pattern)
        return self._search(site, rows, n, min_hits, neurons)

    def token_search(self, token: str, site: str, n: int | None = None, min_hits: int = 1,
                     neurons: Any = None) -> list[CodeMatch]:
        """Codes of ``site`` scored, as in :meth:`regex_search`, against the positions of a
        token: tokens whose text equals ``token`` once both are stripped of surrounding
        whitespace (so ``"dragon"`` finds ``" dragon"``)."""
        self._site(site)
        want = str(token).strip()
        if not want:
            raise CodebookError("token_search: the token is empty; type a token's text")
        got = self.con.execute("SELECT doc, pos FROM tokens WHERE trim(token) = ?",
                               [want]).fetchnumpy()
        rows = self.rows_of(got["doc"], got["pos"])
        return self._search(site, rows, n, min_hits, neurons)

    def _search(self, site: str, rows: np.ndarray, n: int | None, min_hits: int,
                neurons: Any) -> list[CodeMatch]:
        """score_rows, the first ``n``, then the neuron baseline if ``neurons`` are given."""
        matches = self.score_rows(site, rows, min_hits)
        if n is not None:
            matches = matches[:n]
        if neurons is not None and matches:
            matches = self._with_neurons(matches, rows, neurons)
        return matches

    def _with_neurons(self, matches: list[CodeMatch], rows: np.ndarray, neurons: Any
                      ) -> list[CodeMatch]:
        """Add the best neuron's precision at each match's recall. ``neurons`` covers the
        first documents of the index (all tokens of each, in :meth:`tokens` order)."""
        m = int(neurons.shape[0]) if hasattr(neurons, "shape") and len(neurons.shape) == 2 \
            else -1
        if m != self.num_tokens and m not in set(self.doc_rows.tolist()):
            raise CodebookError(f"neurons of shape {tuple(getattr(neurons, 'shape', ()))} do "
                                f"not match the index: need (num_tokens={self.num_tokens}, "
                                "num_neurons), or the rows of its first documents")
        mask = np.zeros(m, dtype=bool)
        rows = np.asarray(rows, np.int64)
        mask[rows[rows < m]] = True
        best = best_neuron_precision(neurons, mask, [mt.recall for mt in matches])
        return [CodeMatch(mt.group, mt.code, mt.precision, mt.recall, mt.fired, mt.hits, b)
                for mt, b in zip(matches, best, strict=True)]

    def topic_codes(self, site: str, min_share: float = 0.5, group: int | None = None
                    ) -> dict[int, list[tuple[int, int, float]]]:
        """Per document, the codes of ``site`` (all groups, or ``group``) that fire on at least
        ``min_share`` of its tokens (all tokens, BOS included): doc -> [(group, code, share)],
        highest share first. Documents with no such code are left out."""
        s, info = self._site(site)
        if not 0.0 < float(min_share) <= 1.0:
            raise CodebookError(f"topic_codes(min_share={min_share}): must be in (0, 1]")
        extra, p = "", [s]
        if group is not None:
            if not 0 <= int(group) < info["groups"]:
                raise CodebookError(f"group {group} out of range for site {site} "
                                    f"({info['groups']} group(s))")
            extra, p = " AND grp = ?", [s, int(group)]
        rows = self._rows(
            "WITH n AS (SELECT doc, count(*) AS ntok FROM tokens GROUP BY doc), "
            f"c AS (SELECT doc, grp, code, count(*) AS cnt FROM codes WHERE site = ?{extra} "
            "GROUP BY doc, grp, code) "
            "SELECT c.doc, c.grp, c.code, c.cnt / n.ntok AS share FROM c JOIN n USING (doc) "
            "WHERE c.cnt / n.ntok >= ? ORDER BY c.doc, share DESC, c.grp, c.code",
            [*p, float(min_share)])
        out: dict[int, list[tuple[int, int, float]]] = {}
        for doc, g, c, share in rows:
            out.setdefault(int(doc), []).append((int(g), int(c), float(share)))
        return out

    def similar_codes(self, site: str, code: int, group: int = 0, n: int = 10,
                      model: Any = None) -> list[tuple[int, float]]:
        """The ``n`` codes of the same codebook group nearest to ``code`` by cosine similarity
        of their vectors: [(code, similarity)], most similar first, the code itself left out.
        ``model``: the CodebookModel or the site's CodebookLayer (default: the model given
        to :meth:`open`)."""
        self._code(site, code, group)
        info = self._site(site)[1]
        if int(n) < 1:
            raise CodebookError(f"similar_codes(n={n}): need n >= 1")
        model = model if model is not None else self.model
        if model is None:
            raise CodebookError("similar_codes needs the codebook: pass model= (the "
                                "CodebookModel or the site's CodebookLayer) here or to open")
        layer = model.site(site) if hasattr(model, "site") else model
        book = getattr(layer, "codebook", None)
        if not isinstance(book, torch.Tensor) or tuple(book.shape[:2]) != (info["groups"],
                                                                          info["num_codes"]):
            raise CodebookError(f"similar_codes: the layer given does not hold site {site}'s "
                                f"codebook ({info['groups']} groups x {info['num_codes']} "
                                "codes); pass the matching model or layer")
        check_layer(self.meta, site, layer, self.path)
        vecs = torch.nn.functional.normalize(book[int(group)].detach().float(), dim=-1)
        sims = vecs @ vecs[int(code)]
        sims[int(code)] = -float("inf")
        k = min(int(n), sims.numel() - 1)
        vals, idx = torch.topk(sims, k)
        return [(int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]


def verify_shards(path: str | os.PathLike, meta: dict[str, Any],
                  checksums: bool | None = None) -> None:
    """Raise a CodebookError naming the first damaged shard of the index at ``path`` (a
    file missing, truncated, unreadable, or unlike its recorded checksum: see
    :func:`.index.shard_damage`). ``checksums``: compare every file's SHA-256 (default:
    when the shard files total at most :data:`.index.VERIFY_BYTES`; sizes and structure
    always)."""
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


def _with_deadline(rx: re.Pattern[str], seconds: float, run: Any) -> Any:
    """``run(compiled, finditer)`` with every ``finditer`` bounded by what is left of
    ``seconds`` (the ``regex`` module's timeout); a CodebookError when time runs out."""
    import time

    import regex

    try:
        flags = 0  # the flags given outside the pattern, by name (the values differ)
        for name in ("IGNORECASE", "MULTILINE", "DOTALL", "VERBOSE", "ASCII"):
            if rx.flags & getattr(re, name):
                flags |= getattr(regex, name)
        crx = regex.compile(rx.pattern, flags)
    except regex.error as e:
        raise CodebookError(f"regex {rx.pattern!r} does not compile: {e}; fix the "
                            "pattern") from None
    end = time.monotonic() + seconds

    def finditer(c: Any, text: str) -> Any:
        return c.finditer(text, timeout=max(end - time.monotonic(), 1e-3))

    try:
        return run(crx, finditer)
    except TimeoutError:
        raise CodebookError(f"regex {rx.pattern!r} took longer than {seconds:g} s over the "
                            "index (it backtracks too much); simplify the pattern") from None


def _compile(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise CodebookError(f"regex {pattern!r} does not compile: {e}; fix the pattern") \
            from None


def best_neuron_precision(acts: Any, positive: np.ndarray, recalls: list[float]
                          ) -> list[float]:
    """For each recall r, the best precision over neurons, each neuron firing on its top-m
    tokens by activation with m the smallest count reaching recall >= r.

    ``acts``: (num_tokens, num_neurons); ``positive``: bool (num_tokens,).
    """
    a = acts.detach().float().cpu().numpy() if isinstance(acts, torch.Tensor) else \
        np.asarray(acts, dtype=np.float32)
    if a.ndim != 2 or a.shape[0] != positive.shape[0]:
        raise CodebookError(f"neurons of shape {a.shape} do not match the index: need "
                            f"(num_tokens={positive.shape[0]}, num_neurons)")
    total = int(positive.sum())
    if total == 0:
        return [0.0 for _ in recalls]
    order = np.argsort(-a, axis=0, kind="stable")
    cum = np.cumsum(positive[order], axis=0)  # (T, N): hits among the top m+1
    need = np.maximum(np.ceil(np.asarray(recalls, np.float64) * total - 1e-9), 1).astype(int)
    best = np.zeros(len(need))
    for j in range(a.shape[1]):  # cum[:, j] is sorted: the first m reaching `need` hits
        m = np.searchsorted(cum[:, j], need, side="left")
        best = np.maximum(best, need / (m + 1))
    return [float(b) for b in best]
