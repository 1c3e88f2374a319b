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
  (:mod:`.kernels`) where it runs, else a *block-max* top-k (see :func:`topk_last`). Any
  device and dtype; no host sync.
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
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

SIMILARITIES = ("cosine", "inner", "euclidean")
COMBINES = ("mean", "sum")
BACKENDS = ("auto", "torch", "faiss", "bf16_screen", "torch_bf16")
APPROXIMATE_KINDS = ("hnsw", "ivf")


class SearchResult(NamedTuple):
    """Top-k codes per token and group, best first."""

    codes: Tensor  # (N, G, k) int64
    scores: Tensor  # (N, G, k) similarity of each chosen code (cosine, inner, or -squared dist)


class Workspace:
    """Reusable scratch buffers of one layer's search (normalised keys, score blocks, a
    transposed copy of the inputs), so that a step does not page-fault fresh multi-MiB
    allocations. Buffers only grow; contents never outlive one search.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A contiguous uninitialised ``shape`` tensor with ``like``'s dtype and device."""
        numel = 1
        for s in shape:
            numel *= s
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or \
                buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:numel].view(shape)


def _scratch(ws: Workspace | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if ws is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return ws.get(name, shape, like)


def _unit_keys(codebook: Tensor, ws: Workspace | None) -> Tensor:
    """``F.normalize(codebook, dim=-1)``, written into the workspace when there is one."""
    norms = torch.linalg.vector_norm(codebook, dim=-1, keepdim=True).clamp_min_(1e-12)
    return torch.div(codebook, norms, out=_scratch(ws, "keys", tuple(codebook.shape), codebook))


def search_keys(codebook: Tensor, similarity: str, ws: Workspace | None = None,
                ) -> tuple[Tensor, Tensor | None]:
    """What inputs are matched against: keys ``(G, C, dg)`` and an optional bias ``(G, C)``.

    Ranking by ``x . key + bias`` equals ranking by the similarity: cosine needs only unit
    codes (``|x|`` does not change a row's ranking, so the input is never normalised);
    Euclidean ranks by ``x . c - |c|^2 / 2``.
    """
    if similarity == "cosine":
        return _unit_keys(codebook, ws), None
    if similarity == "inner":
        return codebook, None
    if similarity == "euclidean":
        return codebook, -0.5 * codebook.pow(2).sum(-1)
    raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}")


def default_chunk(n_tokens: int, groups: int, num_codes: int, chunk_mib: float,
                  itemsize: int = 4) -> int:
    """Tokens per chunk so that one score block ``(G, chunk, C)`` fits ``chunk_mib``."""
    rows = int(chunk_mib * 2**20 / (itemsize * groups * num_codes))
    return max(1, min(n_tokens, rows))


@functools.cache
def _faiss() -> Any:
    """The ``faiss`` module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency, but optional here
        return None
    return faiss


def faiss_available() -> bool:
    return _faiss() is not None


_faiss_threads = [0]


def _sync_faiss_threads(faiss: Any) -> None:
    """Give FAISS's OpenMP pool torch's thread count (set once, again only when it changes)."""
    n = torch.get_num_threads()
    if _faiss_threads[0] != n:
        faiss.omp_set_num_threads(n)
        _faiss_threads[0] = n


@functools.cache
def _cpu_flags() -> tuple[str, frozenset[str]]:
    """This CPU's vendor and feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    vendor, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return vendor, flags


def fast_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX-BF16): on the one
    we measured, a bfloat16 ``torch.mm`` of the benchmark shapes ran 1.7-8x faster than
    float32."""
    return "amx_bf16" in _cpu_flags()[1]


def resolve_backend(backend: str, x: Tensor, codebook: Tensor | None = None) -> str:
    """The backend ``auto`` stands for, for inputs ``x`` ``(N, G, dg)`` and a ``(G, C, dg)``
    codebook (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "torch"
    if codebook is not None and fast_bf16_matmul():
        dg, num_codes = codebook.shape[-1], codebook.shape[1]
        if (kernels.available() and dg >= 32) or (dg >= 256 and num_codes >= 4096):
            return "bf16_screen"
    if faiss_available() and _cpu_flags()[0] != "GenuineIntel":
        return "faiss"
    return "torch"


def block_size(num_codes: int, k: int) -> int | None:
    """Block width for :func:`topk_last` over ``num_codes`` scores, or None for a plain top-k.

    A divisor of ``num_codes`` near 100 (wide enough for a fast vectorised ``amax``), used only
    when the ``k`` candidate blocks hold at most a quarter of the codes.
    """
    best = None
    for bs in range(32, 257):
        if num_codes % bs == 0 and (best is None or abs(bs - 100) < abs(best - 100)):
            best = bs
    if best is None or num_codes // best < k or 4 * k * best > num_codes:
        return None
    return best


def topk_last(s: Tensor, k: int, bs: int | None) -> tuple[Tensor, Tensor]:
    """Exact top-k (values, indices) over the last axis of ``s``, best first.

    With ``bs``: split the axis into blocks of ``bs`` and take each block's max with ``amax``
    (many times faster than ``max``/``topk`` with indices on CPU). At most k blocks have a max
    at or above the k-th best value, and those blocks hold all the top k, so the top-k over the
    ``k * bs`` scores of the k best blocks is the exact answer (ties aside).

    On CPUs where the compiled kernel runs (:mod:`.kernels`), float32 and int16 rows go to it
    instead (several times faster than torch's per-row ``topk``).
    """
    if kernels.supports(s):
        return kernels.topk_rows(s, k)
    if bs is None:
        if k == 1:
            v, i = s.max(-1, keepdim=True)
            return v, i
        return s.topk(k, -1)
    nb = s.shape[-1] // bs
    blocks = s.unflatten(-1, (nb, bs))
    bmax = blocks.amax(-1)
    if k == 1:
        blk = bmax.argmax(-1, keepdim=True)
    else:
        blk = bmax.topk(k, -1, sorted=False).indices
    # The chosen blocks as whole rows of a (rows * nb, bs) view: index_select copies them
    # ~20x faster than an element-wise gather.
    lead = blk.shape[:-1]
    first = torch.arange(bmax.numel() // nb, device=s.device).view(*lead, 1) * nb
    cand = blocks.reshape(-1, bs).index_select(0, (blk + first).view(-1)).view(*lead, k * bs)
    v, j = cand.max(-1, keepdim=True) if k == 1 else cand.topk(k, -1)
    idx = blk.gather(-1, torch.div(j, bs, rounding_mode="floor")).mul_(bs).add_(j % bs)
    return v, idx


def _finish_scores(scores: Tensor, x: Tensor, similarity: str, norms: Tensor | None = None,
                   ) -> Tensor:
    """Turn ranking scores ``x . key + bias`` ``(N, G, k)`` into true similarities (``norms``:
    ``|x|`` ``(N, G)`` when already known)."""
    if similarity == "cosine":
        xn = x.norm(dim=-1) if norms is None else norms
        return scores / xn.unsqueeze(-1).clamp_min(1e-12)
    if similarity == "euclidean":
        sq = x.pow(2).sum(-1) if norms is None else norms.square()
        return 2 * scores - sq.unsqueeze(-1)
    return scores


@torch.no_grad()
def search(x: Tensor, codebook: Tensor, k: int, similarity: str = "cosine",
           chunk_mib: float = 16.0, backend: str = "auto", workspace: Workspace | None = None,
           ) -> SearchResult:
    """Top-k codes of every token in every group; exact except for ``torch_bf16``.

    Extra memory is bounded: one ``(G, chunk, C)`` score block of ``chunk_mib`` (torch) or
    FAISS's fixed query x database block (faiss), never ``N x C``. Scores are true
    similarities: cosine (``x . c / |x||c|``), inner product, or negative squared Euclidean
    distance. See the module docstring for the backends. ``workspace`` (one per layer) keeps
    the scratch buffers between calls.
    """
    backend = resolve_backend(backend, x, codebook)
    if backend == "faiss":
        return _search_faiss(x, codebook, k, similarity, workspace)
    if backend == "bf16_screen" and _screen_kernel_ok(x, codebook):
        codes, scores, norms = _search_screened_kernel(x, codebook, k, similarity, chunk_mib,
                                                       workspace)
        return SearchResult(codes, _finish_scores(scores, x, similarity, norms))
    keys, bias = search_keys(codebook, similarity, workspace)
    if backend == "torch_bf16":
        return _search_bf16(x, keys, bias, k, similarity, chunk_mib)
    if backend == "bf16_screen":
        codes, scores = _search_screened(x, keys, bias, k, similarity, chunk_mib, workspace)
    else:
        codes, scores = _search_torch(x, keys, bias, k, chunk_mib, workspace)
    return SearchResult(codes, _finish_scores(scores, x, similarity))


def _score_blocks(xt: Tensor, keys_t: Tensor, bias3: Tensor | None, rows: int, buf: Tensor,
                  ) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, end, scores)`` for token chunks of ``rows``: ``scores`` ``(G, end - start, C)``
    is ``xt[:, start:end] @ keys_t (+ bias3)``, written into the reused ``buf``."""
    g, n, _ = xt.shape
    num_codes = keys_t.shape[-1]
    for start in range(0, n, rows):
        end = min(n, start + rows)
        s = buf[: g * (end - start) * num_codes].view(g, end - start, num_codes)
        if bias3 is None:
            torch.bmm(xt[:, start:end], keys_t, out=s)
        else:
            torch.baddbmm(bias3, xt[:, start:end], keys_t, out=s)
        yield start, end, s


def _search_torch(x: Tensor, keys: Tensor, bias: Tensor | None, k: int, chunk_mib: float,
                  ws: Workspace | None = None) -> tuple[Tensor, Tensor]:
    """Exact chunked top-k of ``x . key + bias``: codes and ranking scores ``(N, G, k)``."""
    n, g, dg = x.shape
    num_codes = keys.shape[1]
    keys_t = keys.transpose(1, 2)  # (G, dg, C)
    xt = x.transpose(0, 1)  # (G, N, dg)
    chunk = default_chunk(n, g, num_codes, chunk_mib, x.element_size())
    bs = block_size(num_codes, k)
    codes = torch.empty(g, n, k, dtype=torch.long, device=x.device)
    scores = torch.empty(g, n, k, dtype=x.dtype, device=x.device)
    buf = _scratch(ws, "scores", (g * chunk * num_codes,), x)
    bias3 = None if bias is None else bias.unsqueeze(1)
    for start, end, s in _score_blocks(xt, keys_t, bias3, chunk, buf):
        v, i = topk_last(s, k, bs)
        scores[:, start:end] = v
        codes[:, start:end] = i
    return codes.transpose(0, 1).contiguous(), scores.transpose(0, 1).contiguous()


def _search_faiss(x: Tensor, codebook: Tensor, k: int, similarity: str,
                  ws: Workspace | None = None) -> SearchResult:
    """Exact search by FAISS's blocked brute force, one call per group (CPU float32)."""
    faiss = _faiss()
    if faiss is None:
        raise RuntimeError("search backend 'faiss' needs the faiss package (faiss-cpu)")
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"search backend 'faiss' needs float32 CPU inputs, got {x.dtype} on "
                         f"{x.device}; use backend 'torch' or 'auto'")
    _sync_faiss_threads(faiss)
    n, g, dg = x.shape
    num_codes = codebook.shape[1]
    keys = (_unit_keys(codebook, ws) if similarity == "cosine" else codebook).contiguous()
    if g == 1:
        xt = x.reshape(n, dg).contiguous().view(1, n, dg)
    else:
        xt = _scratch(ws, "xt", (g, n, dg), x)
        xt.copy_(x.transpose(0, 1))
    dist = torch.empty(g, n, k, dtype=torch.float32)
    labels = torch.empty(g, n, k, dtype=torch.long)
    knn = faiss.knn_L2sqr if similarity == "euclidean" else faiss.knn_inner_product
    ptr = faiss.swig_ptr
    if n:
        for i in range(g):  # one C++ call per group; all the work is inside FAISS
            knn(ptr(xt[i].numpy()), ptr(keys[i].numpy()), dg, n, num_codes, k,
                ptr(dist[i].numpy()), ptr(labels[i].numpy()))
    codes = labels.transpose(0, 1).contiguous()
    scores = dist.transpose(0, 1)
    if similarity == "cosine":
        scores = scores / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    elif similarity == "euclidean":
        scores = scores.neg()
    return SearchResult(codes, scores.contiguous())


def shortlist_size(k: int) -> int:
    """Codes per token re-ranked exactly after a bfloat16 similarity (``torch_bf16``)."""
    return max(2 * k, k + 8)


def _search_bf16(x: Tensor, keys: Tensor, bias: Tensor | None, k: int, similarity: str,
                 chunk_mib: float) -> SearchResult:
    """Approximate: bfloat16 similarity, then an exact re-rank of a shortlist per token."""
    num_codes = keys.shape[1]
    m = min(num_codes, shortlist_size(k))
    short, _ = _search_torch(x.to(torch.bfloat16), keys.to(torch.bfloat16),
                             None if bias is None else bias.to(torch.bfloat16), m, chunk_mib)
    codes, scores = _rerank(x, keys, bias, short, k, chunk_mib)
    return SearchResult(codes, _finish_scores(scores, x, similarity))


# ------------------------------------------------------------------ certified bfloat16 screen
_U = 2.0**-8  # bfloat16 unit roundoff (8 significant bits, round to nearest)
_U32 = 2.0**-24  # float32 unit roundoff


def screen_sizes(num_codes: int, k: int) -> tuple[int, int] | None:
    """``(shortlist, block_width)`` of the bfloat16 screen, or None where it cannot run (too
    few codes to split into blocks). The shortlist (``2k + 4`` codes) is sized so that the
    exact top k is certified for all but ~1% of tokens on random data (``benchmarks/snap.py``
    counts them)."""
    m = 2 * k + 4
    fits = [bs for bs in range(8, 257) if num_codes % bs == 0 and 4 * m * bs <= num_codes]
    return (m, min(fits, key=lambda bs: abs(bs - 100))) if fits else None


def _bf16_value(bits: Tensor) -> Tensor:
    """float32 values of bfloat16 bit patterns held as int32 (upper bound 0 for negatives:
    see :func:`_screen_chunk`)."""
    return (bits.clamp_min(0) << 16).view(torch.float32)


def _screen_chunk(s: Tensor, m: int, bs: int) -> tuple[Tensor, Tensor]:
    """The ``m`` best codes of one bfloat16 score block ``s`` ``(G, r, C)`` and ``bound``
    ``(G, r)`` float32: an upper bound on the score of every code left out.

    Block-max top-k (as :func:`topk_last`) on the bit patterns as int16: non-negative bfloat16
    values order like their bits and every negative value's bits are below every non-negative
    one's, so the shortlist is exact among codes scoring >= 0, and a negative bound (every
    left-out code scores < 0) is raised to 0. Integer ``amax`` is several times faster than
    bfloat16's.
    """
    v, i = topk_last(s.view(torch.int16), m, bs)
    return i, _bf16_value(v[..., -1].int())


def _rerank(x: Tensor, keys: Tensor, bias: Tensor | None, short: Tensor, k: int,
            chunk_mib: float, ws: Workspace | None = None) -> tuple[Tensor, Tensor]:
    """The exact top k of each token's shortlisted codes ``short`` ``(N, G, m)``: codes and
    ranking scores ``x . key + bias`` ``(N, G, k)``. Key rows are gathered in chunks into a
    reused buffer (fresh multi-MiB gathers page-fault)."""
    n, g, dg = x.shape
    m = short.shape[-1]
    offsets = torch.arange(g, device=x.device).view(1, g, 1) * keys.shape[1]
    flat = (short + offsets).reshape(n * g * m)
    book = keys.reshape(-1, dg)
    exact = torch.empty(n * g, m, dtype=x.dtype, device=x.device)
    xf = x.reshape(n * g, dg, 1)
    step = max(1, min(n * g, int(chunk_mib / 8 * 2**20 / (m * dg * x.element_size()))))
    rows = _scratch(ws, "shortlist_keys", (step * m, dg), x)
    for start in range(0, n * g, step):
        end = min(n * g, start + step)
        got = torch.index_select(book, 0, flat[start * m:end * m], out=rows[: (end - start) * m])
        torch.bmm(got.view(end - start, m, dg), xf[start:end],
                  out=exact[start:end].unsqueeze(-1))
    exact = exact.view(n, g, m)
    if bias is not None:
        exact += bias.reshape(-1)[flat].view(n, g, m)
    v, j = exact.topk(k, -1) if k > 1 else exact.max(-1, keepdim=True)
    return short.gather(-1, j), v


def _search_screened(x: Tensor, keys: Tensor, bias: Tensor | None, k: int, similarity: str,
                     chunk_mib: float, ws: Workspace | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k with a bfloat16 screen: a bfloat16 ``bmm`` ranks every code, a shortlist is
    re-scored exactly, and a rigorous error bound certifies per token that no code left out can
    beat the k-th exact score; tokens it cannot certify are searched exactly again.

    Bound: with ``x~``, ``c~`` the bfloat16 roundings, ``|x.c - x~.c~| <= |x - x~| max|c| +
    |x~| max|c - c~|``, plus float32 accumulation (``dg`` ulps of ``|x~| max|c~|``, for the
    screen and the re-score alike) and the bfloat16 rounding of each score (relative ``2^-8``;
    and of the bias, for Euclidean).
    """
    n, g, dg = x.shape
    num_codes = keys.shape[1]
    sizes = screen_sizes(num_codes, k)
    if sizes is None or n == 0:
        return _search_torch(x, keys, bias, k, chunk_mib, ws)
    m, bs = sizes
    xb = x.to(torch.bfloat16)
    kb = keys.to(torch.bfloat16)
    kbt = _scratch(ws, "kbt", (g, dg, num_codes), kb)  # contiguous: 2-3x faster bmm
    kbt.copy_(kb.transpose(1, 2))
    xbt = _scratch(ws, "xbt", (g, n, dg), xb)
    xbt.copy_(xb.transpose(0, 1))
    bias_b = None if bias is None else bias.to(torch.bfloat16).unsqueeze(1)
    rows = default_chunk(n, g, num_codes, chunk_mib, 2)
    short = torch.empty(g, n, m, dtype=torch.long, device=x.device)
    bound = torch.empty(g, n, dtype=torch.float32, device=x.device)
    buf = _scratch(ws, "scores_bf16", (g * rows * num_codes,), xb)
    for start, end, st in _score_blocks(xbt, kbt, bias_b, rows, buf):
        short[:, start:end], bound[:, start:end] = _screen_chunk(st, m, bs)
    short = short.transpose(0, 1)  # (N, G, m)
    codes, v = _rerank(x, keys, bias, short, k, chunk_mib, ws)
    # The certificate: the k-th exact score beats every left-out code's largest possible one.
    xn = x.norm(dim=-1)  # (N, G)
    dx = torch.linalg.vector_norm(x - xb, dim=-1)
    dkmax = torch.linalg.vector_norm(keys - kb, dim=-1).amax(-1)  # (G,)
    kmax = (torch.ones_like(dkmax) if similarity == "cosine"  # unit keys
            else keys.norm(dim=-1).amax(-1)) * (1 + 1e-6)
    bmax = None if bias is None else bias.abs().amax(-1)  # (G,)
    ok = _certified(v, bound.t().to(x.dtype), xn, dx, kmax, dkmax, bmax, dg)  # (N,)
    if not bool(ok.all()):  # rare: redo the tokens the bound cannot certify exactly
        redo = (~ok).nonzero().squeeze(-1)
        rc, rv = _search_torch(x[redo], keys, bias, k, chunk_mib)
        codes[redo], v[redo] = rc, rv
    return codes, v


def _screen_kernel_ok(x: Tensor, codebook: Tensor) -> bool:
    """Whether the compiled screen (:mod:`.kernels`) runs for these float32 CPU inputs."""
    return (kernels.available() and x.device.type == "cpu" and x.dtype == torch.float32
            and codebook.dtype == torch.float32 and codebook.device.type == "cpu")


def _certified(v: Tensor, bound: Tensor, xn: Tensor, dx: Tensor, kmax: Tensor, dkmax: Tensor,
               bmax: Tensor | None, dg: int, extra_ulps: int = 0) -> Tensor:
    """Bool ``(N,)``: tokens whose k-th exact ranking score ``v[..., -1]`` beats ``bound``
    ``(N, G)`` (every left-out code's bfloat16 score) by more than the screen's worst-case
    error, in every group. ``xn``, ``dx``: ``|x|``, ``|x - bf16(x)|`` ``(N, G)``; ``kmax``,
    ``dkmax``: ``max |key|``, ``max |key - bf16(key)|`` ``(G,)``; ``bmax``: ``max |bias|``
    ``(G,)``; ``extra_ulps``: float32 roundings of the exact score beyond its dot product.
    ``cbf_screen_rows`` in ``csrc/topm.cpp`` applies the same bound in the compiled screen."""
    err = (dx * kmax + xn * (1 + _U) * dkmax
           + (2 * dg + extra_ulps) * _U32 * xn * kmax * (1 + _U) ** 2)
    if bmax is not None:  # the bias and the sum are rounded to bfloat16 too
        err = err + 3 * _U * bmax + 2 * _U * (xn * kmax + bmax)
    return (v[..., -1] - 1.1 * err > bound + 2 * _U * bound.abs()).all(-1)


def _search_scaled(x: Tensor, book: Tensor, scale: Tensor | None, bias: Tensor | None, k: int,
                   chunk_mib: float) -> tuple[Tensor, Tensor]:
    """Exact top-k of ``(x . code) * scale + bias`` (float32): codes and ranking scores
    ``(N, G, k)``, one group and token chunk at a time. The screen's fallback for tokens it
    cannot certify (no unit-key copy of the codebook)."""
    n, g, dg = x.shape
    num_codes = book.shape[1]
    codes = torch.empty(n, g, k, dtype=torch.long)
    scores = torch.empty(n, g, k, dtype=x.dtype)
    rows = default_chunk(n, 1, num_codes, chunk_mib)
    buf = torch.empty(min(n, rows) * num_codes, dtype=x.dtype)
    bs = block_size(num_codes, k)
    for gi in range(g):
        for start in range(0, n, rows):
            end = min(n, start + rows)
            s = torch.mm(x[start:end, gi], book[gi].t(), out=buf[: (end - start) * num_codes]
                         .view(end - start, num_codes))
            if scale is not None:
                s.mul_(scale[gi])
            if bias is not None:
                s.add_(bias[gi])
            scores[start:end, gi], codes[start:end, gi] = topk_last(s, k, bs)
    return codes, scores


def _search_screened_kernel(x: Tensor, codebook: Tensor, k: int, similarity: str,
                            chunk_mib: float, ws: Workspace | None = None,
                            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The certified bfloat16 screen with the compiled kernel (the bound of
    :func:`_search_screened`). Screen scores come from AMX tiles inside the kernel, 16 tokens
    at a time (:func:`kernels.amx_screen`: no score matrix, no bfloat16 copies of the inputs),
    or else from a bfloat16 ``mm`` per group and token block; then per token one
    compiled pass finds the k-th best screen score, re-scores exactly every code within
    twice the token's error bound of it (usually k plus a few: the shortlist adapts to how
    close the scores are) and certifies the result. Cosine never forms unit keys in float32:
    exact scores are ``(x . code) / |code|``. Returns codes, ranking scores and ``|x|``
    ``(N, G)`` (None when it fell back to plain exact search)."""
    n, g, dg = x.shape
    num_codes = codebook.shape[1]
    if n == 0 or 4 * k > num_codes:
        return (*_search_scaled(x, codebook, _inv_norms(codebook, similarity),
                                _bias(codebook, similarity), k, chunk_mib), None)
    book = codebook.contiguous()
    x = x.contiguous()
    codes = torch.empty(n, g, k, dtype=torch.long)
    v = torch.empty(n, g, k)
    ok = torch.empty(n, g, dtype=torch.uint8)
    norms = torch.empty(n, g)
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    if _amx_fits(g, num_codes, dg, k):  # scores made by AMX tiles, 16 tokens at a time
        keys = _ScreenKeys(book, similarity,
                           _scratch(ws, "kb_tiles", kernels.amx_tiles(g, num_codes, dg), bf16))
        kernels.amx_screen(x, keys.kb, book, keys.scale, keys.bias, k, keys.kmax, keys.dkmax,
                           keys.bmax, keys.extra_ulps, codes, v, ok, norms)
    else:
        keys = _ScreenKeys(book, similarity, _scratch(ws, "kbt", (g, dg, num_codes), bf16))
        _screen_mm(x, book, keys, k, chunk_mib, ws, codes, v, ok, norms)
    certified = ok.bool().all(-1)
    if not bool(certified.all()):  # rare: redo the tokens the bound cannot certify exactly
        redo = (~certified).nonzero().squeeze(-1)
        codes[redo], v[redo] = _redo(x[redo], book, keys.scale, keys.bias, k, chunk_mib)
    return codes, v, norms


class _ScreenKeys:
    """The compiled screen's bfloat16 keys, written into ``kb`` (AMX tiles when its shape is
    :func:`kernels.amx_tiles`, else transposed ``(G, dg, C)``), and what the certificate needs
    of them: the cosine ``scale`` and Euclidean ``bias`` of the exact scores (None where they
    do not apply) and per-group bounds ``kmax`` (max key norm), ``dkmax`` (max key rounding
    error), ``bmax`` (max |bias|), float32 ``(G,)`` with the norms' rounding allowed for."""

    TOL = 1 + 1e-6  # the float32 roundings of the norms

    def __init__(self, book: Tensor, similarity: str, kb: Tensor) -> None:
        cos = similarity == "cosine"
        self.kb = kb
        tiles = kb.dim() == 4  # kernels.amx_tiles shape
        scale, dk, kn = kernels.bf16_keys(book, cos, kb, tiles=tiles)
        self.scale = scale if cos else None
        self.bias = -0.5 * kn * kn if similarity == "euclidean" else None
        self.kmax, self.dkmax = kn.amax(-1) * self.TOL, dk.amax(-1) * self.TOL
        self.bmax = None if self.bias is None else self.bias.abs().amax(-1) * self.TOL
        self.extra_ulps = 4 if cos else 1  # the exact score's own roundings


AMX_KEY_BYTES = 512 << 10
"""The AMX screen streams every key of a group past each 16 tokens. While a group's key tiles
(``C x dg`` bfloat16, padded) stay in L2 it beat the bfloat16 ``mm`` route (C = 1000, dg = 32:
21 against 31 ms for a layer's forward + backward); at C = 10000 it lost (dg = 512: 283
against 210; dg = 64: 306 against 274): ``benchmarks/snap.py --impls
codebook_screen_mm,codebook_screen_amx``."""


def _amx_fits(g: int, c: int, dg: int, k: int) -> bool:
    """Whether the screen scores with AMX tiles: AMX is usable, a group's key tiles fit
    :data:`AMX_KEY_BYTES`, and k <= 16 (its threshold comes from 64 lane maxima)."""
    _, ncb, nq, tile = kernels.amx_tiles(g, c, dg)
    return k <= 16 and ncb * nq * tile * 2 <= AMX_KEY_BYTES and kernels.amx()


def _screen_mm(x: Tensor, book: Tensor, keys: _ScreenKeys, k: int, chunk_mib: float,
               ws: Workspace | None, codes: Tensor, v: Tensor, ok: Tensor, norms: Tensor,
               ) -> None:
    """The screen's scores by a bfloat16 ``mm`` per group and token block against the
    transposed ``keys``, then the compiled per-token pass on each block; fills the outputs."""
    n, g, dg = x.shape
    num_codes = book.shape[1]
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    kbt = keys.kb
    bias_b = None if keys.bias is None else keys.bias.to(torch.bfloat16)
    xbt = _scratch(ws, "xbt", (g, n, dg), bf16)
    xbt.copy_(x.transpose(0, 1))
    # Score blocks of ~1 MiB (they stay in L2 between the mm and the per-token pass) but at
    # least 256 rows (fewer make the mm slow): measured fastest at C = 1000 and 10000.
    rows = default_chunk(n, 1, num_codes, min(chunk_mib, 1.0), 2)
    if chunk_mib >= 1.0:
        rows = max(rows, min(n, 256))
    buf = _scratch(ws, "scores_bf16", (rows * num_codes,), bf16)
    kmax, dkmax = keys.kmax.tolist(), keys.dkmax.tolist()
    bmax = [None] * g if keys.bmax is None else keys.bmax.tolist()
    for gi in range(g):
        for start in range(0, n, rows):
            end = min(n, start + rows)
            s = buf[: (end - start) * num_codes].view(end - start, num_codes)
            if bias_b is None:
                torch.mm(xbt[gi, start:end], kbt[gi], out=s)
            else:
                torch.addmm(bias_b[gi], xbt[gi, start:end], kbt[gi], out=s)
            kernels.screen_rows(s.view(torch.int16), start, gi, x, book, keys.scale, keys.bias,
                                k, kmax[gi], dkmax[gi], bmax[gi], keys.extra_ulps, codes, v, ok,
                                norms)


def _redo(x: Tensor, book: Tensor, scale: Tensor | None, bias: Tensor | None, k: int,
          chunk_mib: float) -> tuple[Tensor, Tensor]:
    """Exact search of the tokens the compiled screen could not certify."""
    return _search_scaled(x, book, scale, bias, k, chunk_mib)


def _inv_norms(codebook: Tensor, similarity: str) -> Tensor | None:
    if similarity != "cosine":
        return None
    return 1 / torch.linalg.vector_norm(codebook, dim=-1).clamp_min(1e-12)


def _bias(codebook: Tensor, similarity: str) -> Tensor | None:
    return search_keys(codebook, similarity)[1] if similarity == "euclidean" else None


class ApproximateIndex:
    """Approximate search (FAISS HNSW or IVF, one index per group) for inference.

    The indexes are built on the codebook's keys (unit codes for cosine) on first use and
    rebuilt whenever the codebook changes: any in-place update through the parameter (an
    optimizer step, ``load_state_dict``, dead-code replacement) bumps its version counter.
    Edits through ``.data`` bypass that counter: call :meth:`reset` after them.

    ``hnsw``: ``m`` links per node, ``ef_search`` (recall/speed), ``ef_construction``.
    ``ivf``: ``nlist`` lists (default ``sqrt(C)``, at most ``C // 39``), ``nprobe`` lists
    visited per query. Rows for which the index finds fewer than k codes fall back to exact.
    """

    def __init__(self, kind: str, similarity: str, *, m: int = 32, ef_search: int = 64,
                 ef_construction: int = 80, nlist: int | None = None, nprobe: int = 8) -> None:
        if kind not in APPROXIMATE_KINDS:
            raise ValueError(f"unknown approximate search {kind!r}; choose one of "
                             f"{APPROXIMATE_KINDS}")
        if _faiss() is None:
            raise RuntimeError("approximate search needs the faiss package (faiss-cpu)")
        self.kind, self.similarity = kind, similarity
        self.m, self.ef_search, self.ef_construction = m, ef_search, ef_construction
        self.nlist, self.nprobe = nlist, nprobe
        self._tag: tuple | None = None
        self._indexes: list[Any] = []

    def reset(self) -> None:
        """Forget the built indexes; the next search rebuilds them."""
        self._tag, self._indexes = None, []

    def _build(self, codebook: Tensor) -> None:
        faiss = _faiss()
        _sync_faiss_threads(faiss)
        g, c, dg = codebook.shape
        keys = (F.normalize(codebook, dim=-1, eps=1e-12) if self.similarity == "cosine"
                else codebook).detach().to("cpu", torch.float32).contiguous()
        metric = faiss.METRIC_L2 if self.similarity == "euclidean" else faiss.METRIC_INNER_PRODUCT
        self._indexes = []
        for i in range(g):
            data = keys[i].numpy()
            if self.kind == "hnsw":
                index = faiss.IndexHNSWFlat(dg, self.m, metric)
                index.hnsw.efConstruction = self.ef_construction
                index.hnsw.efSearch = self.ef_search
            else:
                nlist = self.nlist or max(1, min(int(c**0.5), c // 39))
                quantizer = (faiss.IndexFlatL2(dg) if self.similarity == "euclidean"
                             else faiss.IndexFlatIP(dg))
                index = faiss.IndexIVFFlat(quantizer, dg, nlist, metric)
                index.cp.seed = 1234 + i
                index.train(data)
                index.nprobe = min(self.nprobe, nlist)
            index.add(data)
            self._indexes.append(index)
        self._tag = _version_tag(codebook)

    @torch.no_grad()
    def search(self, x: Tensor, codebook: Tensor, k: int) -> SearchResult:
        """Approximate top-k of float32 CPU inputs ``(N, G, dg)``; true similarities."""
        if self._tag != _version_tag(codebook):
            self._build(codebook)
        _sync_faiss_threads(_faiss())
        n, g, dg = x.shape
        xt = x.transpose(0, 1).to(torch.float32).contiguous()
        dist = torch.empty(g, n, k, dtype=torch.float32)
        labels = torch.empty(g, n, k, dtype=torch.long)
        for i, index in enumerate(self._indexes):
            index.search(xt[i].numpy(), k, D=dist[i].numpy(), I=labels[i].numpy())
        codes = labels.transpose(0, 1).contiguous()
        scores = dist.transpose(0, 1)
        if self.similarity == "cosine":
            scores = scores / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        elif self.similarity == "euclidean":
            scores = scores.neg()
        scores = scores.contiguous()
        missing = (codes < 0).any(-1).any(-1)
        if bool(missing.any()):  # too few codes found (e.g. IVF lists too small): exact there
            exact = search(x[missing], codebook, k, self.similarity, backend="auto")
            codes[missing], scores[missing] = exact.codes, exact.scores.to(scores.dtype)
        return SearchResult(codes, scores)


def _version_tag(codebook: Tensor) -> tuple:
    """Identifies a codebook's contents: storage, shape and in-place version counter."""
    return (codebook.data_ptr(), tuple(codebook.shape), codebook._version)


def combine_weights(k: int, combine: str) -> float:
    """The weight of every slot of a plain top-k: ``1/k`` for mean, 1 for sum."""
    return 1.0 / k if combine == "mean" else 1.0


def _flat_codes(codes: Tensor, num_codes: int) -> Tensor:
    """Codes ``(N, G, K)`` as rows of the flattened ``(G*C, dg)`` codebook: ``(N*G, K)``."""
    n, g, k = codes.shape
    if g == 1:
        return codes.view(n, k)
    offsets = torch.arange(g, device=codes.device).mul_(num_codes).view(1, g, 1)
    return (codes + offsets).view(n * g, k)


class _SnapCombine(torch.autograd.Function):
    """``y[n, g] = sum_j w[n, g, j] * codebook[g, codes[n, g, j]]`` with codebook gradients.

    Backward: ``dL/dx = dL/dy`` (straight-through); each chosen code gets
    ``w * (dL/dy + mse_scale * (y - x))`` (the reconstruction term's gradient; without
    ``dL/dy`` when ``lm_grad`` is off), accumulated with one
    ``index_add_`` per slot; no ``N x C`` tensor is formed and the ``(N*G, dg)`` rows are never
    copied k times. ``weights`` is a float (the same for every slot) or a
    ``(N, G, K)`` tensor (after interventions).
    """

    @staticmethod
    def forward(ctx, x: Tensor, codebook: Tensor, codes: Tensor, weights: Tensor | float,
                mse_scale: float, commit_scale: float, lm_grad: bool) -> Tensor:
        n, g, dg = x.shape
        num_codes = codebook.shape[1]
        k = codes.shape[-1]
        flat = _flat_codes(codes, num_codes)
        book = codebook.reshape(-1, dg)
        if isinstance(weights, Tensor):
            w = weights.to(codebook.dtype).reshape(n * g, k)
            y = F.embedding_bag(flat, book, per_sample_weights=w, mode="sum")
        elif k == 1:
            y = book.index_select(0, flat.view(-1))
            if weights != 1.0:
                y = y.mul_(weights)
            w = weights
        else:  # weights is 1 (sum) or 1/k (mean)
            y = F.embedding_bag(flat, book, mode="sum" if weights == 1.0 else "mean")
            w = weights
        y = y.view(n, g, dg)
        ctx.save_for_backward(x, y, flat, codebook, *([w] if isinstance(w, Tensor) else []))
        ctx.scalar_w = None if isinstance(w, Tensor) else float(w)
        ctx.mse_scale, ctx.commit_scale, ctx.lm_grad = mse_scale, commit_scale, lm_grad
        ctx.codebook_shape = codebook.shape
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, y, flat, codebook, *w = ctx.saved_tensors
        a = ctx.mse_scale
        grad_codebook = None
        if not ctx.needs_input_grad[1]:
            pass
        elif ctx.lm_grad and not w and kernels.dense_ok(grad_y, x, y, flat):
            # One compiled pass over the rows, any k, no (N, d) temporary.
            g_c, c, dg = ctx.codebook_shape
            grad_codebook = torch.zeros(g_c * c, dg, dtype=grad_y.dtype)
            kernels.scatter_slots(grad_codebook, flat, grad_y, y, x, ctx.scalar_w, a)
            grad_codebook = grad_codebook.view(g_c, c, dg)
        elif ctx.lm_grad and flat.shape[1] == 1 and not w:
            grad_codebook = _single_code_grad(x, grad_y, flat.view(-1), codebook,
                                              ctx.scalar_w, a)
        else:
            g_c, c, dg = ctx.codebook_shape
            scale = 1.0 if w else ctx.scalar_w  # tensor weights are applied per slot
            if a:  # one temporary: ((y - x) * a + grad_y) * scale
                row = torch.sub(y, x).mul_(a)
                if ctx.lm_grad:
                    row.add_(grad_y)
                if scale != 1.0:
                    row.mul_(scale)
            elif ctx.lm_grad:
                row = grad_y * scale if scale != 1.0 else grad_y
            else:
                row = torch.zeros_like(grad_y)
            row = row.reshape(-1, dg)
            grad_codebook = torch.zeros(g_c * c, dg, dtype=grad_y.dtype, device=grad_y.device)
            # One index_add_ per slot: never expands the rows to (N*G*K, dg).
            slots = flat.t().contiguous()
            for j in range(slots.shape[0]):
                src = row * w[0][:, j : j + 1] if w else row
                grad_codebook.index_add_(0, slots[j], src)
            grad_codebook = grad_codebook.view(g_c, c, dg)
        grad_x = None
        if ctx.needs_input_grad[0]:  # straight-through, plus the commitment pull toward y
            grad_x = grad_y if not ctx.commit_scale else torch.sub(x, y).mul_(
                ctx.commit_scale).add_(grad_y)
        return grad_x, grad_codebook, None, None, None, None, None


def sq_error(y: Tensor, x: Tensor) -> Tensor:
    """``sum((y - x)^2)`` as a 0-d tensor of ``y``'s dtype, without an ``(N, d)`` temporary."""
    if kernels.dense_ok(y, x) and y.shape == x.shape:
        return torch.tensor(kernels.sq_dist(y, x), dtype=y.dtype)
    return torch.dist(y, x).square()


def _single_code_grad(x: Tensor, grad_y: Tensor, idx: Tensor, codebook: Tensor, w: float,
                      a: float) -> Tensor:
    """The codebook gradient when every token has one code (k = 1) of weight ``w``, with no
    ``(N, d)`` temporary: code c gets ``w * sum_(tokens of c) (grad_y + a (y - x))`` with
    ``a`` the MSE gradient's scale (see :func:`mse_scale`), and since every such ``y`` is
    ``w * code``, the ``y`` sum is ``count_c * w * code``: two ``index_add_`` passes and one
    over the codebook (the torch path; with the compiled kernel,
    :func:`kernels.scatter_slots` does it in one pass)."""
    g_c, c, dg = codebook.shape
    grad = torch.zeros(g_c * c, dg, dtype=grad_y.dtype, device=grad_y.device)
    grad.index_add_(0, idx, grad_y.reshape(-1, dg), alpha=w)
    if a:
        grad.index_add_(0, idx, x.reshape(-1, dg), alpha=-a * w)
        counts = torch.bincount(idx, minlength=g_c * c).to(grad.dtype).unsqueeze(-1)
        grad.addcmul_(counts, codebook.reshape(-1, dg), value=a * w * w)
    return grad.view(g_c, c, dg)


def mse_scale(mse_coeff: float, x: Tensor, reduction: str = "sum") -> float:
    """``a`` such that the reconstruction term's gradient is ``a * (y - x)``.

    ``sum`` (the paper's, the authors' ``aeloss``): ``mse_coeff * mean over tokens of the sum
    over the site's features``, so ``a = 2 * mse_coeff / tokens``; ``mean`` (codebooks saved
    before format 2): the per-element mean, ``a = 2 * mse_coeff / (tokens * width)``.
    ``x`` is ``(tokens, G, dg)``.
    """
    if not mse_coeff:
        return 0.0
    return 2.0 * mse_coeff / (x.shape[0] if reduction == "sum" else x.numel())


def snap_combine(x: Tensor, codebook: Tensor, codes: Tensor, weights: Tensor | float,
                 mse_coeff: float = 1.0, *, reduction: str = "sum",
                 commitment_coeff: float = 0.0, codes_lm_grad: bool = True) -> Tensor:
    """Combine the chosen codes into the output; see :class:`_SnapCombine` for gradients.

    ``x`` ``(N, G, dg)`` is the (layer-normed) input, used for the straight-through gradient and
    the reconstruction term (``mse_coeff``, reduced as ``reduction``: see :func:`mse_scale`);
    ``codes`` is ``(N, G, K)``; ``weights`` a float or ``(N, G, K)``. ``commitment_coeff``
    (beta) adds ``2 beta (x - y)`` to the input's gradient, as the authors' ``fullaeloss`` and
    ``vqvae`` losses do (the gradient of ``beta * sum |x - stop_grad(y)|^2``, summed over tokens
    as in their code). ``codes_lm_grad=False`` gives the codes only the reconstruction
    gradient (their ``vqvae``).
    """
    return _SnapCombine.apply(x, codebook, codes, weights, mse_scale(mse_coeff, x, reduction),
                              2.0 * float(commitment_coeff), bool(codes_lm_grad))
