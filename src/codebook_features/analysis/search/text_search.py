"""Search by the text: regex search and token search, each scoring every code of a site
against the token positions found."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ...errors import CodebookError
from .results import CodeMatch


class _TextSearch:
    """The :class:`~.CodeIndex` routes from text to codes (regex and token search)."""

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
