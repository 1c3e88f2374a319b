"""Every ```python block of README.md runs as written, and the documented CLI works."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), {"__name__": "__readme__"})


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codebook_features", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_synthetic(tmp_path):
    out = run_cli("synthetic", "--steps", "150", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)
    assert metrics["code_cluster_purity"] > 0.9  # each cluster gets its own code
    assert metrics["test_mse"] < 0.2
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / "codebook" / "codebook.safetensors").is_file()


def test_cli_help_lists_commands(tmp_path):
    out = run_cli("--help", cwd=tmp_path)
    assert out.returncode == 0 and "synthetic" in out.stdout and "demo" in out.stdout
