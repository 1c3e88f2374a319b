"""Code search: index the codes a CodebookModel chooses over a corpus and query them."""

from .index import build_index
from .search import CodeIndex, CodeMatch, CodeStats, Context, best_neuron_precision

__all__ = ["CodeIndex", "CodeMatch", "CodeStats", "Context", "best_neuron_precision",
           "build_index"]
