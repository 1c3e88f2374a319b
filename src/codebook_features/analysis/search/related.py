"""Codes related to documents and to other codes: the documents' topic codes and a code's
nearest codes in its codebook."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import CodebookError
from ..index import (
    check_layer,
)


class _RelatedCodes:
    """The :class:`~.CodeIndex` routes from a document or a code to other codes."""

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
