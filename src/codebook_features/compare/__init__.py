"""``codebook-features compare``: a codebook site against a TopK sparse autoencoder, side by side.

For one site of a codebook model, a TopK SAE of matched size (latents = the site's codes over
all groups, ``k`` = the codes active per token over all groups) is trained with EleutherAI's
sparsify (:mod:`codebook_features.sae`) on the activations entering the site (every codebook
bypassed), and the two are compared, each spliced into the site alone (other sites bypassed):

* **standard evaluation** (:mod:`codebook_features.standard_eval`): CE loss recovered against
  zero and mean ablation, KL, explained variance (the codebook's against its LayerNorm'd
  input, the SAE's against the raw activation), L0, alive fraction;
* **training cost**: wall time and peak memory of training the SAE and, on the same batches,
  a fresh codebook of the site's settings (the site's own codebook may have been trained with
  the LM; the fresh one is the like-for-like cost, and its evaluation is reported too);
* **interpretability** as the paper measures it (regex code search): for each topic's regex
  (the story topics' words), the token positions overlapping a match are the positives; a
  unit (code, SAE latent) fires where it is among the chosen ones (a latent: with a positive
  activation); precision = hits / firings, recall = hits / positives; units with recall <= 1%
  are dropped (the authors' rule) and the best is the most precise (then the highest recall);
  the best neuron (a dimension of the site's input) is thresholded at the best code's and the
  best latent's recall (:func:`~codebook_features.analysis.search.best_neuron_precision`);
* **steering** (the paper's Table 3): the held-out documents mentioning one topic alone are
  that topic's; each topic's best codes and best latents (firing on the largest share of its
  documents' tokens and not others', :func:`~codebook_features.steering.rank_topic_codes`)
  are forced on while generating from short prompts (a latent at its mean firing
  activation, written over the weakest slots), and the generations mentioning the topic are
  counted against the same model unsteered (each with its own bottleneck in).

Writes ``report.json``, ``report.html`` and ``report.md`` (the tables as printed) into the
output folder, the SAE (sparsify's format, ``sae/``) and the fresh codebook (``codebook/``);
a rerun with the same settings reuses them (their training cost as first measured).

One module a part: :mod:`.comparison` (the settings and the run), :mod:`.site` (one site
holding a codebook or an SAE), :mod:`.search` (the regex search), :mod:`.report` (its tables)
and :mod:`.command` (the command line); every name is importable from here.
"""

from __future__ import annotations

from .command import load_data, options, run
from .comparison import (
    DEFAULT_TOPICS,
    CompareConfig,
    _cached,  # noqa: F401
    _log,  # noqa: F401
    _version,  # noqa: F401
    compare_site,
)
from .report import _pct, format_html, format_report, report_tables, write_report  # noqa: F401
from .search import (
    TokenTable,
    best_unit,
    interpretability,
    regex_positives,
    token_table,
    topic_labels,
    topic_patterns,
)
from .site import _SiteView, check_sae, matched_sizes  # noqa: F401

__all__ = [
    "DEFAULT_TOPICS",
    "CompareConfig",
    "TokenTable",
    "best_unit",
    "check_sae",
    "compare_site",
    "format_html",
    "format_report",
    "interpretability",
    "load_data",
    "matched_sizes",
    "options",
    "regex_positives",
    "report_tables",
    "run",
    "token_table",
    "topic_labels",
    "topic_patterns",
    "write_report",
]
