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


def _bracketed(text: str) -> str | None:
    """The first balanced ``[...]`` or ``(...)`` in ``text``, or None."""
    start = next((i for i, ch in enumerate(text) if ch in "(["), None)
    if start is None:
        return None
    depth = 0
    for j in range(start, len(text)):
        depth += text[j] in "([" and 1 or 0
        depth -= text[j] in ")]" and 1 or 0
        if depth == 0:
            return text[start:j + 1]
    return None


def check_claim(comment: str, printed: object) -> None:
    """The value a ``print(...)  # comment`` line shows in its comment is the printed one.

    A literal (``(2, 12, 4, 4)``, ``['a', 'b', ...]``: ``...`` ends a prefix) must equal the
    printed value (a shape, list or tuple; a tensor by its shape); a tuple of names
    (``(batch, tokens, groups, k)``) describes a shape of that many dimensions. Comments
    without brackets are prose."""
    import ast

    import torch

    claim = _bracketed(comment)
    if claim is None:
        return
    if isinstance(printed, torch.Tensor):
        printed = printed.shape
    got = list(printed) if isinstance(printed, (tuple, list, torch.Size)) else printed
    try:
        want = ast.literal_eval(claim)
    except (ValueError, SyntaxError):  # names: the number of dimensions
        names = [n.strip() for n in claim[1:-1].split(",") if n.strip()]
        assert all(n.isidentifier() for n in names), f"cannot read the claim {claim!r}"
        assert isinstance(got, list) and len(got) == len(names), (claim, printed)
        return
    want = list(want) if isinstance(want, (tuple, list)) else want
    if isinstance(want, list) and want and want[-1] is Ellipsis:
        assert got[: len(want) - 1] == want[:-1], f"README shows {claim}, code prints {printed}"
    else:
        assert got == want, f"README shows {claim}, code prints {printed}"


def test_check_claim_can_fail():
    import torch

    check_claim("one group per head: (2, 12, 4, 4)", torch.Size([2, 12, 4, 4]))
    check_claim("['a', 'b', ...]", ["a", "b", "c"])
    check_claim("codes: (batch, tokens, groups, k)", torch.zeros(1, 2, 3, 4))
    check_claim("the paper's Table 3", "anything")
    for comment, value in [("(2, 12, 4, 4)", torch.Size([2, 12, 4, 3])),
                           ("['a', 'b', ...]", ["b", "a", "c"]),
                           ("(groups, k)", torch.zeros(2, 2, 2))]:
        with pytest.raises(AssertionError):
            check_claim(comment, value)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block(i, tmp_path, monkeypatch):
    """Each block runs, and every ``print(...)  # comment`` shows what the code prints."""
    monkeypatch.chdir(tmp_path)
    claims = {n: line.split("#", 1)[1] for n, line in enumerate(BLOCKS[i].splitlines(), 1)
              if line.lstrip().startswith("print(") and "#" in line}
    printed: dict[int, tuple] = {}

    def recording_print(*args, **kwargs):
        printed[sys._getframe(1).f_lineno] = args
        print(*args, **kwargs)

    exec(compile(BLOCKS[i], f"README.md block {i}", "exec"),
         {"__name__": "__readme__", "print": recording_print})
    assert set(claims) <= set(printed), "a commented print did not run"
    for line, comment in claims.items():
        check_claim(comment, printed[line][-1])


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
