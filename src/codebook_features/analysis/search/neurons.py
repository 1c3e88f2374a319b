"""The neuron baseline: the site's neurons over the indexed tokens, and the best neuron's
precision at a code's recall."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...errors import CodebookError
from ..index import (
    check_model,
    encode_long,
    token_windows,
)
from .results import CodeMatch


class _NeuronBaseline:
    """The :class:`~.CodeIndex` queries of the neurons entering a site's codebook."""

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
