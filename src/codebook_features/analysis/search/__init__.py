"""Queries over a code index (see :mod:`codebook_features.analysis.index`), run by DuckDB on
its Parquet files.

:class:`CodeIndex` (:mod:`.code_index`: its files and token rows) takes each route of its
queries from a module of its own: :mod:`.text_search` (regex and token search),
:mod:`.contexts` (a code in the text), :mod:`.related` (topic codes, similar codes) and
:mod:`.neurons` (the neuron baseline); :mod:`.results` holds what they return. Every name is
importable from here.
"""

from __future__ import annotations

from .code_index import CodeIndex, verify_shards
from .neurons import best_neuron_precision
from .results import CodeMatch, CodeStats, Context
from .text_search import _compile, _with_deadline  # noqa: F401

__all__ = ["CodeIndex", "CodeMatch", "CodeStats", "Context", "best_neuron_precision",
           "verify_shards"]
