"""A code read in the text: its top contexts, its statistics, the codes at a token, the text
around tokens."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import CodebookError
from .results import CodeStats, Context


class _Contexts:
    """The :class:`~.CodeIndex` queries that show codes in the text."""

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
