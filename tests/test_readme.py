"""Every ```python block of README.md and of the documentation (docs/*.md) runs as written,
and the documented CLI works."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


# Each distinct block once (the README's tour repeats some of the guide's), with its page.
WHERE = {b: p.relative_to(ROOT).as_posix() for p in reversed(PAGES) for b in python_blocks(p)}
BLOCKS = list(WHERE)


def test_readme_has_examples():
    assert len(python_blocks(README)) >= 4
    assert len(BLOCKS) > len(python_blocks(README))  # the guide's own examples run too


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


@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=[f"{WHERE[b]}-{i}" for i, b in
                                                       enumerate(BLOCKS)])
def test_readme_python_block(i, tmp_path, monkeypatch):
    """Each block runs, and every ``print(...)  # comment`` shows what the code prints.
    Blocks that load the paper's released models by hub id run in tests/test_authors.py, on a
    hub cache laid out there."""
    if "taufeeque/" in BLOCKS[i]:
        pytest.skip("runs in test_authors.py::test_readme_released_model_block")
    run_block(BLOCKS[i], tmp_path, monkeypatch)


def run_block(block: str, tmp_path: Path, monkeypatch) -> None:
    """Run a page's block in ``tmp_path``; each commented print must show what it prints."""
    monkeypatch.chdir(tmp_path)
    claims = {n: line.split("#", 1)[1] for n, line in enumerate(block.splitlines(), 1)
              if line.lstrip().startswith("print(") and "#" in line}
    printed: dict[int, tuple] = {}

    def recording_print(*args, **kwargs):
        printed[sys._getframe(1).f_lineno] = args
        print(*args, **kwargs)

    exec(compile(block, f"{WHERE.get(block, 'README.md')} block", "exec"),
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


def test_stories_block_is_rewritten_from_a_run(tmp_path):
    """scripts/stories_results.py: the stories page's figures come from a run's report.json
    and table.md (here a small fake run), and --check tells a stale block."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import stories_results as rs
    finally:
        sys.path.pop(0)
    run = tmp_path / "run"
    run.mkdir()
    eval_table = "| Model | Loss |\n|---|---|\n| With codebooks | 0.578 |"
    steering = ("| topic | codes | samples | baseline | steered |\n|---|---|---|---|---|\n"
                "| dragon | 8 | 64 | 10.0% | 50.0% |\n| fire | 8 | 64 | 12.5% | 25.0% |")
    (run / "table.md").write_text(f"{eval_table}\n\n| Site | MSE |\n|---|---|\n\n{steering}\n")
    (run / "report.json").write_text(json.dumps({
        "config": {"steer_mode": "replace", "codes_per_topic": 8, "samples_per_prompt": 16,
                   "gen_tokens": 64},
        "eval": {"with_codebooks": {"loss": 0.578}, "without_codebooks": {"loss": 0.716},
                 "base_model": {"loss": 0.576},
                 "sites": {"layers.0.attn_heads": {"fvu": 0.293, "dead_fraction": 0.0}}},
        "steering": [{"baseline": 0.1, "steered": 0.5}, {"baseline": 0.125, "steered": 0.25}],
        "timings": {"total_s": 300.4, "base_train_s": 110.0, "finetune_s": 115.2}}))
    assert rs.PAGE.read_text().count(rs.BEGIN) == 1 == rs.PAGE.read_text().count(rs.END)
    page = tmp_path / "stories.md"
    page.write_text(f"intro\n{rs.BEGIN}\nold figures\n{rs.END}\nafter\n")
    args = [str(run), "--page", str(page), "--machine", "a test machine"]
    assert rs.main([*args, "--check"]) == 1
    assert rs.main(args) == 0
    assert rs.main([*args, "--check"]) == 0
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("\nafter\n")
    assert eval_table in text and steering in text and "old figures" not in text
    prose = " ".join(text.split())  # the sentences are wrapped
    assert "rises 2.0 to 5.0 times" in prose and "FVU 0.29, 0% dead codes" in prose
    assert "changes it by +0.138 nats" in prose and "300 s in all" in prose
