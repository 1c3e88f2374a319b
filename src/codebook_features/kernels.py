"""Compiled CPU kernels for the codebook search and combine (``csrc/topm.cpp``), built on
first use, with torch as the fallback.

torch's CPU ``topk`` costs 1-3 us per row whatever the row's length, which is most of a
codebook search's time once the similarity matmul is fast. The top-k kernel selects with two
SIMD passes over each row (lane maxima, then one compare pass against a threshold that at
least k values reach; see the source's header) and sorts the few survivors. The same library
holds the certified bfloat16 screen's key preparation and per-token pass
(:func:`bf16_keys`, :func:`screen_rows`), the screen with its scores made by AMX tiles inside
the kernel (:func:`amx_screen`, where :func:`amx` says it can run), and the combine's MSE sum
and codebook-gradient scatter (:func:`sq_dist`, :func:`scatter_slots`), neither of which
forms an ``(N, d)`` temporary.

Rows are split over ``torch.get_num_threads()`` threads (ctypes releases the GIL; no OpenMP
runtime of its own). It is compiled once per source, compiler and CPU with ``$CXX`` (default
``g++``) ``-O3 -march=native`` into ``$CODEBOOK_FEATURES_CACHE`` (default
``~/.cache/codebook_features``), written atomically, and loaded with ``ctypes``: no torch
headers, about a second. Where there is no compiler, the build fails, the CPU lacks AVX-512 or
``CODEBOOK_FEATURES_KERNEL=0`` is set, :func:`available` is False and callers use torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "topm.cpp"
_P, _I = ctypes.c_void_p, ctypes.c_int64


def cache_dir() -> Path:
    """Where built kernels live: ``$CODEBOOK_FEATURES_CACHE`` or ``~/.cache/codebook_features``."""
    env = os.environ.get("CODEBOOK_FEATURES_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "codebook_features"


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _build_key(source: bytes) -> str:
    """Identifies a build: the source, the compiler's version and this CPU's model and flags."""
    try:
        version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    blob = b"\0".join([source, version.encode(), cpu.encode(), platform.machine().encode()])
    return hashlib.sha256(blob).hexdigest()[:16]


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (if not already built) and return the shared library's path.

    Raises RuntimeError with the compiler's message when the build fails."""
    source = SOURCE.read_bytes()
    out_dir = out_dir or cache_dir()
    path = out_dir / f"topm-{_build_key(source)}.so"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [_compiler(), "-O3", "-march=native", "-shared", "-fPIC",
           "-o", tmp, str(SOURCE)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed: {' '.join(cmd)}\n"
                               f"{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)  # atomic: other processes see no or a whole library
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"building {SOURCE.name} failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The loaded kernel, or None (disabled, no compiler, failed build or no AVX-512)."""
    if os.environ.get("CODEBOOK_FEATURES_KERNEL", "1") == "0" or platform.machine() not in (
            "x86_64", "AMD64"):
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"codebook_features: top-k kernel unavailable, using torch ({e})",
                      RuntimeWarning, stacklevel=3)
        return None
    lib.cbf_simd_width.restype = ctypes.c_int
    if lib.cbf_simd_width() < 512:  # the portable build is no faster than torch
        return None
    c_int = ctypes.c_int
    for fn in (lib.cbf_topm_f32, lib.cbf_topm_i16):
        fn.argtypes = [_P, _I, _I, _I, _I, c_int, _P, _P]
    lib.cbf_bf16_keys.argtypes = [_P, _I, _I, _I, _I, c_int, _I, _I, _P, _P, _P, _P]
    f32 = ctypes.c_float
    lib.cbf_screen_rows.argtypes = [_P, _I, _I, _I, _I, _I, _I, _P, _I, _I, _P, _P, _P, c_int,
                                    f32, f32, f32, c_int, _P, _P, _P, _P]
    lib.cbf_amx_screen.argtypes = [_I, _I, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, c_int, _P,
                                   _P, _P, c_int, _P, _P, _P, _P]
    lib.cbf_amx_enable.restype = c_int
    lib.cbf_sq_dist.argtypes = [_P, _P, _I, _I]
    lib.cbf_sq_dist.restype = ctypes.c_double
    lib.cbf_scatter_slots.argtypes = [_P, _P, _I, _P, _P, _P, _I, _I, f32, f32]
    for fn in (lib.cbf_topm_f32, lib.cbf_topm_i16, lib.cbf_bf16_keys, lib.cbf_screen_rows,
               lib.cbf_amx_screen, lib.cbf_scatter_slots):
        fn.restype = None
    return lib


_pool: list = [None, 0, 0]  # executor, its size, the process that made it


def _parallel(call: Callable[[int, int], None], total: int, min_rows: int = 64) -> None:
    """Run ``call(r0, r1)`` over ``[0, total)`` split into ``torch.get_num_threads()`` parts
    (ctypes releases the GIL, so the parts run at once); one part runs in this thread."""
    threads = torch.get_num_threads()
    parts = min(threads, max(1, total // min_rows))
    if parts <= 1:
        call(0, total)
        return
    pool, size, pid = _pool
    if pool is None or size != parts - 1 or pid != os.getpid():  # none, resized or forked
        pool = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="cbf-kernel")
        _pool[:] = [pool, parts - 1, os.getpid()]
    bounds = [total * i // parts for i in range(parts + 1)]
    futures = [pool.submit(call, a, b) for a, b in zip(bounds[1:-1], bounds[2:], strict=True)]
    call(0, bounds[1])
    for f in futures:
        f.result()


def available() -> bool:
    """Whether :func:`topk_rows` runs the compiled kernel here."""
    return _lib() is not None


_FNS = {torch.float32: "cbf_topm_f32", torch.int16: "cbf_topm_i16"}


def supports(s: Tensor) -> bool:
    """Whether the kernel can select over ``s`` (CPU float32 or int16, rows laid out evenly)."""
    if s.device.type != "cpu" or s.dtype not in _FNS or s.dim() < 1 or not available():
        return False
    if s.shape[-1] > 2**31 - 1 or s.numel() == 0:
        return False
    return s.stride(-1) == 1 and (s.dim() == 1 or _row_stride(s) is not None)


def _row_stride(s: Tensor) -> int | None:
    """The constant distance between consecutive rows of ``s`` viewed as ``(-1, C)``."""
    try:
        return s.view(-1, s.shape[-1]).stride(0)
    except RuntimeError:
        return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def topk_rows(s: Tensor, k: int, values: Tensor | None = None, indices: Tensor | None = None,
              ) -> tuple[Tensor, Tensor]:
    """The k largest values of each row of ``s`` (last axis) and their indices, best first
    (ties: lower index first); ``s`` must pass :func:`supports`. int16 rows order as signed
    integers (bfloat16 bit patterns: exact among non-negative values). ``values`` and
    ``indices``, when given, are contiguous ``(..., k)`` outputs to write into."""
    c = s.shape[-1]
    if not 1 <= k <= c:
        raise ValueError(f"k={k} must be between 1 and the row length {c}")
    lead = s.shape[:-1]
    rows = s.numel() // c
    ld = _row_stride(s) if s.dim() > 1 else c
    if values is None:
        values = torch.empty(*lead, k, dtype=s.dtype)
    if indices is None:
        indices = torch.empty(*lead, k, dtype=torch.long)
    assert values.is_contiguous() and indices.is_contiguous() and values.numel() == rows * k
    fn = getattr(_lib(), _FNS[s.dtype])
    sp, ip, vp = s.data_ptr(), indices.data_ptr(), values.data_ptr()
    _parallel(lambda r0, r1: fn(sp, r0, r1, c, ld, k, ip, vp), rows)
    return values, indices


def bf16_keys(book: Tensor, unit: bool, kb: Tensor, tiles: bool = False,
              ) -> tuple[Tensor, Tensor, Tensor]:
    """The bfloat16 screen's keys: ``key = book * scale`` (``scale = 1/|code|`` when ``unit``,
    else 1) written as bfloat16 into ``kb``: transposed ``(G, dg, C)`` for a bfloat16 ``mm``,
    or with ``tiles`` as AMX tiles (:func:`amx_tiles` gives the shape; padding is zeroed).
    Returns ``scale``, ``|key - bf16(key)|`` and ``|key|``, each ``(G, C)`` float32. ``book`` is
    a contiguous float32 ``(G, C, dg)`` CPU tensor."""
    g, c, dg = book.shape
    ncb, nq = _tile_blocks(c, dg) if tiles else (0, 0)
    scale, dk, kn = torch.empty(3, g, c)
    ptrs = [t.data_ptr() for t in (book, kb, scale, dk, kn)]
    _parallel(lambda r0, r1: _lib().cbf_bf16_keys(ptrs[0], r0, r1, c, dg, int(unit), ncb, nq,
                                                  *ptrs[1:]),
              g * (ncb * 16 if tiles else c))
    return scale, dk, kn


@functools.cache
def _amx_enabled() -> bool:
    return available() and bool(_lib().cbf_amx_enable())


def amx() -> bool:
    """Whether the screen can score codes with AMX tiles here (the kernel was built for a CPU
    with AMX-BF16, Linux granted the tile state, and ``CODEBOOK_FEATURES_AMX`` is not 0)."""
    return os.environ.get("CODEBOOK_FEATURES_AMX", "1") != "0" and _amx_enabled()


def _tile_blocks(c: int, dg: int) -> tuple[int, int]:
    return -(-c // 16), -(-dg // 32)


def amx_tiles(g: int, c: int, dg: int) -> tuple[int, ...]:
    """The shape of the AMX key tiles for :func:`bf16_keys` ``(tiles=True)``: per group, code
    blocks of 16 by dimension blocks of 32, 512 bfloat16 each (pairs of dimensions adjacent)."""
    ncb, nq = _tile_blocks(c, dg)
    return (g, ncb, nq, 512)


def amx_screen(x: Tensor, kb: Tensor, book: Tensor, scale: Tensor | None, bias: Tensor | None,
               k: int, kmax: Tensor, dkmax: Tensor, bmax: Tensor | None, extra_ulps: int,
               codes: Tensor, scores: Tensor, ok: Tensor, norms: Tensor) -> None:
    """The certified screen with scores made by AMX tiles (``cbf_amx_screen``): every token
    of ``x`` ``(N, G, dg)`` in every group against the key tiles ``kb``; outputs as
    :func:`screen_rows`. ``kmax``, ``dkmax``, ``bmax``: float32 ``(G,)`` per-group bounds."""
    n, g, dg = x.shape
    c = book.shape[1]
    if not 1 <= k <= min(16, c):
        raise ValueError(f"the AMX screen takes 1 <= k <= min(16, C): k={k}, C={c}")
    ncb, nq = _tile_blocks(c, dg)
    ptrs = (x.data_ptr(), g, dg, c, ncb, nq, kb.data_ptr(), book.data_ptr(), _ptr(scale),
            _ptr(bias), k, kmax.data_ptr(), dkmax.data_ptr(), _ptr(bmax), extra_ulps,
            codes.data_ptr(), scores.data_ptr(), ok.data_ptr(), norms.data_ptr())
    _parallel(lambda r0, r1: _lib().cbf_amx_screen(r0, r1, *ptrs), n, 16)


def screen_rows(s: Tensor, n0: int, group: int, x: Tensor, book: Tensor, scale: Tensor | None,
                bias: Tensor | None, k: int, kmax: float, dkmax: float, bmax: float | None,
                extra_ulps: int, codes: Tensor, scores: Tensor, ok: Tensor, norms: Tensor,
                ) -> None:
    """The certified screen on one block of bfloat16 scores ``s`` ``(rows, C)`` (int16 bits)
    of tokens ``n0 ..`` in ``group``: see ``cbf_screen_rows`` in the source. Writes the exact
    top-k ``codes`` and ranking ``scores`` ``(N, G, k)``, ``ok`` ``(N, G)`` uint8 (1 where
    certified) and ``norms`` ``(N, G)`` float32 (``|x|``). ``x`` ``(N, G, dg)`` and ``book``
    ``(G, C, dg)`` are contiguous float32; ``scale``, ``bias`` ``(G, C)`` or None; ``kmax``,
    ``dkmax``, ``bmax``: the group's max key norm, key rounding error and |bias| (None: no
    bias)."""
    rows, c = s.shape
    ld = _row_stride(s)
    g, dg = x.shape[1], x.shape[2]
    head = (s.data_ptr(),)
    tail = (ld, c, n0, group, x.data_ptr(), g, dg, book.data_ptr(), _ptr(scale), _ptr(bias), k,
            kmax, dkmax, -1.0 if bmax is None else bmax, extra_ulps, codes.data_ptr(),
            scores.data_ptr(), ok.data_ptr(), norms.data_ptr())
    _parallel(lambda r0, r1: _lib().cbf_screen_rows(*head, r0, r1, *tail), rows)


def dense_ok(*tensors: Tensor) -> bool:
    """Whether the row kernels below apply: the kernel runs and every tensor is a contiguous
    float32 (or int64 index) CPU tensor."""
    return available() and all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype in (torch.float32, torch.int64)
        for t in tensors)


def sq_dist(a: Tensor, b: Tensor) -> float:
    """``sum((a - b)^2)`` without a temporary (float32 blocks of 1024, summed in float64)."""
    n = a.numel()
    parts: list[float] = []
    ap, bp = a.data_ptr(), b.data_ptr()
    _parallel(lambda e0, e1: parts.append(_lib().cbf_sq_dist(ap, bp, e0, e1)), n, 1 << 16)
    return float(sum(parts))


def _check_rows(idx: Tensor, rows: int) -> None:
    """Refuse indices outside ``[0, rows)`` before compiled code writes through them."""
    if not idx.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= rows:
        raise IndexError(f"code index out of range [0, {rows}): {lo}..{hi}")


def scatter_slots(grad: Tensor, flat: Tensor, gy: Tensor, y: Tensor, x: Tensor, w: float,
                  a: float) -> None:
    """``grad[flat[r, j]] += w * (gy[r] + a * (y[r] - x[r]))`` for every row r and slot j, one
    pass over the rows and one thread; ``flat`` ``(n, K)``, ``gy``, ``y``, ``x`` ``(n, dg)``."""
    n, kk = flat.shape
    _check_rows(flat, grad.shape[0])
    _lib().cbf_scatter_slots(grad.data_ptr(), flat.data_ptr(), kk, gy.data_ptr(), y.data_ptr(),
                             x.data_ptr(), n, grad.shape[-1], w, a)
