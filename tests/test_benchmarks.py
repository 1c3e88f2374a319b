"""The benchmark scripts run end to end on a small shape and print what their docs promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from codebook_features import kernels

ROOT = Path(__file__).resolve().parents[1]


def test_snap_benchmark_small_shape():
    """``benchmarks/snap.py`` at one small shape: every peer's row, its memory (one child
    process each), the screen's route, and codes that agree with the torch backend."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "snap.py"), "--shape", "512,64,300,2,2",
         "--impls",
         "codebook,codebook_torch,codebook_screen_mm,codebook_screen_amx,naive,faiss_flatip",
         "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=600, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    by = {r["impl"]: r for r in rows if "impl" in r}
    assert set(by) == {"codebook", "codebook_torch", "codebook_screen_mm", "codebook_screen_amx",
                       "naive", "faiss_flatip"}
    for impl in ("codebook", "codebook_torch", "codebook_screen_mm", "codebook_screen_amx"):
        assert by[impl]["code_agreement"] == 1.0
        assert by[impl]["fwdbwd_ms"] > 0 and by[impl]["naive_x"] > 0
        assert by[impl]["peak_mib"] >= 0 and by[impl]["peak_mib_pinned"] >= 0
        assert by[impl]["floor_mib"] > 0
    assert by["faiss_flatip"]["fwdbwd_ms"] is None
    # Each screen peer reports the route it was held to (k = 2: the AMX route may run).
    routes = {"codebook_screen_mm": "mm", "codebook_screen_amx": "amx" if kernels.amx() else "mm"}
    for impl, route in routes.items():
        assert by[impl]["backend"] == "bf16_screen"
        assert by[impl]["route"] == (route if kernels.available() else "torch")
        assert 0 <= by[impl]["redo_fraction"] <= 1
