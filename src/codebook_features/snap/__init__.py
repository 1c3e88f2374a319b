"""The numerical core of a codebook: similarity search, exact top-k, and the combine step.

Shapes: ``x`` is ``(N, G, dg)`` (N tokens, G groups of width dg), a codebook ``(G, C, dg)``.

Search backends (``search(..., backend=)``), all exact unless named otherwise:

* ``faiss``: FAISS's blocked brute-force search (``knn_inner_product`` / ``knn_L2sqr`` on
  NumPy views of the torch tensors, no index built, results written straight into torch
  tensors). CPU, float32 only. It fuses the similarity block with the top-k scan; on the AMD
  CPU we measured its sgemm beat torch's; on the Intel one its flat search took 1.3-6x
  torch's similarity matmul.
* ``torch``: token chunks whose score block is bounded by ``chunk_mib``; one ``bmm`` per
  chunk into a reused buffer, then an exact top-k per row: the compiled kernel
  (:mod:`codebook_features.kernels`) where it runs, else a *block-max* top-k (see
  :func:`topk_last`). Any device and dtype; no host sync.
* ``bf16_screen``: exact, for float32 CPU inputs on CPUs that multiply bfloat16 in hardware
  (AMX): a bfloat16 matmul scores every code, a shortlist is scored exactly in float32, and a
  rigorous rounding-error bound certifies per token that no other code can beat the k-th; the
  few tokens it cannot certify are searched again exactly. With the compiled kernel the
  shortlist is every code within twice the token's bound of the k-th best screen score
  (:func:`_search_screened_kernel`; the screen scores come from AMX tiles inside the kernel
  where a group's keys fit :data:`AMX_KEY_BYTES`); without it, a fixed ``2k + 4``
  (:func:`_search_screened`).
* ``auto`` (default): for float32 CPU inputs, ``bf16_screen`` where it is measured faster
  (AMX, and groups at least 32 wide with the kernel, else at least 256 wide and 4096 codes),
  else ``torch`` on Intel CPUs and ``faiss`` on others (when installed); ``torch`` for
  everything else (GPU, float64).
* ``torch_bf16``: an *approximate* variant of ``torch``: the similarity in bfloat16, a
  shortlist of ``max(2k, k + 8)`` codes per token re-ranked exactly in the input's dtype.
  Scores of the returned codes are exact; the codes agree with exact search on almost every
  token, not all (measured in ``benchmarks/snap.py --bf16``).

``snap_combine`` is one autograd function with a straight-through input gradient and a sparse
codebook gradient (only chosen codes get any).

One module a part: :mod:`.route` (:func:`search`), one module per backend
(:mod:`.torch_search`, :mod:`.faiss_search`, :mod:`.screen` and :mod:`.screen_kernel` for
``bf16_screen``, :mod:`.torch_bf16`), :mod:`.backends` (what ``auto`` picks), :mod:`.topk`,
:mod:`.scores` (keys, scores, scratch buffers), :mod:`.approximate` (approximate inference
search) and :mod:`.combine` (the autograd function); every name is importable from here.
Code that replaces one of the private helpers (a test's spy) replaces it in the module that
calls it (e.g. ``snap.screen_kernel._redo``).
"""

from __future__ import annotations

from .approximate import APPROXIMATE_KINDS, ApproximateIndex, _version_tag  # noqa: F401
from .backends import (
    BACKENDS,
    _cpu_flags,  # noqa: F401
    _faiss,  # noqa: F401
    _faiss_threads,  # noqa: F401
    _sync_faiss_threads,  # noqa: F401
    faiss_available,
    fast_bf16_matmul,
    resolve_backend,
)
from .combine import (
    COMBINES,
    _flat_codes,  # noqa: F401
    _single_code_grad,  # noqa: F401
    _SnapCombine,  # noqa: F401
    combine_weights,
    mse_scale,
    snap_combine,
    sq_error,
)
from .faiss_search import _search_faiss  # noqa: F401
from .route import search
from .scores import (
    SIMILARITIES,
    SearchResult,
    Workspace,
    _bias,  # noqa: F401
    _finish_scores,  # noqa: F401
    _inv_norms,  # noqa: F401
    _score_blocks,  # noqa: F401
    _scratch,  # noqa: F401
    _unit_keys,  # noqa: F401
    default_chunk,
    search_keys,
)
from .screen import (
    _U,  # noqa: F401
    _U32,  # noqa: F401
    _bf16_value,  # noqa: F401
    _certified,  # noqa: F401
    _screen_chunk,  # noqa: F401
    _search_screened,  # noqa: F401
    screen_sizes,
)
from .screen_kernel import (
    AMX_KEY_BYTES,
    _amx_fits,  # noqa: F401
    _redo,  # noqa: F401
    _screen_kernel_ok,  # noqa: F401
    _screen_mm,  # noqa: F401
    _ScreenKeys,  # noqa: F401
    _search_screened_kernel,  # noqa: F401
)
from .topk import block_size, topk_last
from .torch_bf16 import _search_bf16, shortlist_size  # noqa: F401
from .torch_search import _rerank, _search_scaled, _search_torch  # noqa: F401

__all__ = ["AMX_KEY_BYTES", "APPROXIMATE_KINDS", "BACKENDS", "COMBINES", "SIMILARITIES",
           "ApproximateIndex", "SearchResult", "Workspace", "block_size", "combine_weights",
           "default_chunk", "faiss_available", "fast_bf16_matmul", "mse_scale",
           "resolve_backend", "screen_sizes", "search", "search_keys", "shortlist_size",
           "snap_combine", "sq_error", "topk_last"]
