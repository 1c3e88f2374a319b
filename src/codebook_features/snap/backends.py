"""Which backend ``auto`` stands for on this machine: the CPU's vendor and bfloat16 hardware,
FAISS's presence and its thread count."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .. import kernels

BACKENDS = ("auto", "torch", "faiss", "bf16_screen", "torch_bf16")


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
