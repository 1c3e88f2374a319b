"""Fault injection: each command that writes, killed with SIGKILL at chosen points and run
again, ends with exactly what an uninterrupted run gives; an unwritable destination is one
line.

The kill points are deterministic: ``$CODEBOOK_FEATURES_FAULT=KIND:N`` (or
``KIND@FILE_NAME:N``) makes the process SIGKILL itself the N-th time it reaches
``io.fault_point(KIND)`` (of that file): ``write``, an atomic write complete but not yet
renamed into place; ``written``, just renamed; ``checkpoint-staged``, a checkpoint complete in
its staging folder; ``checkpoint``, one in place; ``shard-file``, an index shard file written;
``shard``, an index shard recorded in meta.json. Each test chains several kills in one output
folder, each run resuming what the last one left; the killed runs are new processes, the
uninterrupted one and the last (finishing) one run in this process, with the same number of
torch threads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_models import assert_same_index, story_codebooks, story_workload

from codebook_features.cli import main
from codebook_features.io import FAULT_ENV

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "stories-local.yaml"


def cli(*args: str, fault: str | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    """``codebook-features ARGS`` in a new process; with ``fault``, expect it killed there."""
    import torch

    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # as in this process
    if fault:
        env[FAULT_ENV] = fault
    proc = subprocess.run([sys.executable, "-m", "codebook_features", *args], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=900)
    if fault:
        assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode,
                                                    proc.stderr[-2000:])
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run(capsys, *args: str) -> str:
    """``codebook-features ARGS`` in this process: status 0; returns its stderr."""
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().err


def assert_same_tensors(a: Path, b: Path) -> None:
    import torch

    want, got = load_file(str(a)), load_file(str(b))
    assert want.keys() == got.keys(), a
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{a.name}: {k}")


def assert_same_files(a: Path, b: Path, names: list[str], root_a: Path | None = None,
                      root_b: Path | None = None) -> None:
    """Same tensors, same bytes (a path under ``root_a`` in ``a``'s text files read as the
    same path under ``root_b``)."""
    for name in names:
        if name.endswith(".safetensors"):
            assert_same_tensors(a / name, b / name)
        else:
            text = (a / name).read_text()
            if root_a is not None:
                text = text.replace(str(root_a), str(root_b))
            assert text == (b / name).read_text(), name


def one_line_error(capsys, argv: list[str], blocker: Path) -> None:
    """``argv`` names an output under the file ``blocker``: status 2, one line naming it."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1].rsplit("\r", 1)[-1]
    assert "Traceback" not in err
    assert last.startswith(f"error: {blocker}: Not a directory; "), last


# ---------------------------------------------------------------- train and eval
@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault")
    corpus, _, _ = story_workload(d, num_stories=120, seed=0, positions=64)
    return d, corpus


def train_args(d: Path, corpus: Path, out: Path) -> list[str]:
    return ["train", str(CONFIG), f"model={d / 'model'}", f"data.files=[{corpus}]",
            "data.seq_len=32", "training.max_steps=3", "training.save_steps=1",
            "training.logging_steps=1", f"training.output_dir={out}", "training.use_cpu=true",
            "training.report_to=[]", "training.disable_tqdm=true", "codebooks.num_codes=16",
            "training.eval_strategy=no", "training.dead_code_interval=2"]


@pytest.mark.slow  # four training runs (test_train_cli's SIGKILL test runs in the default suite)
def test_train_killed_at_several_points_ends_as_uninterrupted(workload, tmp_path, capsys):
    d, corpus = workload
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(capsys, *train_args(d, corpus, full))
    # 1. after checkpoint-1 is in place; 2. (resumed from it) the final folder's codebooks
    # written but not renamed (after checkpoints 2 and 3's). (A kill inside a checkpoint
    # save: test_train_cli's SIGKILL test.)
    for fault in ("checkpoint:1", "write@codebooks.safetensors:3"):
        cli(*train_args(d, corpus, cut), fault=fault)
    assert not (cut / "final" / "finished.json").exists()
    assert f"{cut / 'checkpoint-3'} is the end of training" in run(
        capsys, *train_args(d, corpus, cut))
    files = ["codebooks.safetensors", "codebook_model.json", "model.safetensors",
             "metrics.json", "finished.json"]
    assert_same_files(full / "final", cut / "final", files, full, cut)
    assert not list(cut.glob(".tmp-*"))
    blocker = tmp_path / "file"  # an unwritable destination: one line, nothing done
    blocker.write_text("x")
    one_line_error(capsys, train_args(d, corpus, blocker / "run"), blocker)


def test_eval_killed_ends_as_uninterrupted(workload, tmp_path, capsys):
    """Killed with its metrics written but not renamed, then run again."""
    from codebook_features.model import CodebookModel, load_base_model

    d, corpus = workload
    cb = tmp_path / "cb"
    CodebookModel(load_base_model(d / "model"), placements=["attn_heads"], num_codes=8
                  ).save_codebooks(cb, base_model_name=str(d / "model"))
    ev_args = ["eval", str(cb), *train_args(d, corpus, tmp_path / "run")[1:],
               "data.eval_split=train", "data.max_eval_rows=4"]
    run(capsys, *ev_args, "--out", str(tmp_path / "ev_full"))
    cli(*ev_args, "--out", str(tmp_path / "ev_cut"), fault="write@eval_metrics.json:1")
    left = [p.name for p in (tmp_path / "ev_cut").iterdir()]
    assert len(left) == 1 and left[0].startswith(".eval_metrics.json.")  # its temporary
    run(capsys, *ev_args, "--out", str(tmp_path / "ev_cut"))
    assert not list((tmp_path / "ev_cut").glob(".*"))  # ... removed
    assert_same_files(tmp_path / "ev_full", tmp_path / "ev_cut",
                      ["eval_metrics.json", "eval_table.md"])

    blocker = tmp_path / "file"  # an unwritable destination: one line, nothing done
    blocker.write_text("x")
    one_line_error(capsys, [*ev_args, "--out", str(blocker / "ev")], blocker)


# ---------------------------------------------------------------- index
def test_index_killed_at_several_points_ends_as_uninterrupted(tmp_path, capsys):
    corpus, _, _ = story_codebooks(tmp_path, num_stories=30, seed=2)
    args = ["index", str(tmp_path / "cb"), "--files", str(corpus), "--shard-tokens", "300"]
    run(capsys, *args, "--out", str(tmp_path / "full"))
    cut = tmp_path / "cut"
    # 1. in the middle of shard 0's files; 2. (shard 0 written again, files 1-5) shard 1's
    # files all written, meta.json not yet listing it; 3. meta.json listing shard 1 written,
    # not yet renamed (files 1-5 shard 2's, then its meta.json: the 2nd meta.json write)
    for fault in ("shard-file:3", "shard-file:10", "write@meta.json:2"):
        cli(*args, "--out", str(cut), fault=fault)
    run(capsys, *args, "--out", str(cut))
    assert_same_index(tmp_path / "full", cut)
    assert not [p for p in cut.iterdir() if p.name.startswith(".")]  # no temporary left
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(capsys, [*args, "--out", str(blocker / "ix")], blocker)


# ---------------------------------------------------------------- demo and stories
def _report(run: Path, as_run: Path) -> dict:
    """``run``'s report.json, its own folder read as ``as_run``, without the timings."""
    report = json.loads((run / "report.json").read_text().replace(str(run), str(as_run)))
    report.pop("timings", None)
    return report


def _compare_runs(full: Path, cut: Path) -> None:
    assert _report(full, cut) == _report(cut, cut)
    tensors = sorted(p.relative_to(full) for p in full.rglob("*.safetensors")
                     if "runs" not in p.parts)
    assert tensors
    for rel in tensors:
        assert_same_tensors(full / rel, cut / rel)


@pytest.mark.slow
def test_demo_killed_at_several_points_ends_as_uninterrupted(tmp_path, capsys):
    args = ["demo", "--quick", "--set", "ks=1", "attn_only=false", "analysis_sequences=32",
            "eval_sequences=4", "pairs_per_state=1", "base_steps=6", "finetune_steps=4"]
    cli(*args, "--out", str(tmp_path / "full"))
    # after fsm.json; the codebook save half done
    for fault in ("written@fsm.json:1", "write@codebooks.safetensors:1"):
        cli(*args, "--out", str(tmp_path / "cut"), fault=fault)
    cli(*args, "--out", str(tmp_path / "cut"))
    _compare_runs(tmp_path / "full", tmp_path / "cut")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(capsys, [*args, "--out", str(blocker / "demo")], blocker)


@pytest.mark.slow
def test_stories_killed_at_several_points_ends_as_uninterrupted(tmp_path, capsys):
    args = ["stories", "--quick", "--set", "num_stories=200", "eval_stories=30",
            "samples_per_prompt=1", "gen_tokens=4", "topics=dragon", "base_steps=10"]
    cli(*args, "--out", str(tmp_path / "full"))
    # the model's codebooks written, not renamed; the index's first shard done
    for fault in ("write@codebooks.safetensors:1", "shard:1"):
        cli(*args, "--out", str(tmp_path / "cut"), fault=fault)
    cli(*args, "--out", str(tmp_path / "cut"))
    _compare_runs(tmp_path / "full", tmp_path / "cut")
    # the same index (its meta names the base model's folder: the run's own)
    full, cut = tmp_path / "full" / "index", tmp_path / "cut" / "index"
    meta = json.loads((full / "meta.json").read_text().replace(str(full.parent),
                                                                str(cut.parent)))
    assert meta == json.loads((cut / "meta.json").read_text())
    (full / "meta.json").write_text((cut / "meta.json").read_text())
    assert_same_index(full, cut)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(capsys, [*args, "--out", str(blocker / "st")], blocker)


# ---------------------------------------------------------------- convert
def test_convert_killed_at_several_points_ends_as_uninterrupted(tmp_path, capsys):
    """Killed while staging (its codebooks written, not renamed; then everything but the
    config written), then run again: the same folder as an uninterrupted conversion, and no
    staging folder left (each run removes the killed one's)."""
    from test_authors import FIXTURES, _base

    base = tmp_path / "base"
    _base("gpt2_heads_mlp_k4").save_pretrained(base)
    args = ["convert", str(FIXTURES / "gpt2_heads_mlp_k4" / "checkpoint")]
    run(capsys, *args, str(tmp_path / "full"), "--base", str(base))
    for fault in ("write@codebooks.safetensors:1", "write@codebook_model.json:1"):
        cli(*args, str(tmp_path / "cut"), "--base", str(base), fault=fault)
        assert not (tmp_path / "cut").exists()  # nothing in place until the whole is done
    assert len(list(tmp_path.glob(".cut.*.tmp"))) == 1  # the last killed run's staging
    run(capsys, *args, str(tmp_path / "cut"), "--base", str(base))
    assert not list(tmp_path.glob(".cut.*"))
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "cut").iterdir())
    assert_same_files(tmp_path / "full", tmp_path / "cut",
                      [n for n in names if n.endswith((".safetensors", ".json"))
                       and n != "codebook_model.json"])
    full = json.loads((tmp_path / "full" / "codebook_model.json").read_text())
    cut = json.loads((tmp_path / "cut" / "codebook_model.json").read_text())
    assert full == cut

    blocker = tmp_path / "file"  # an unwritable destination: one line, nothing done
    blocker.write_text("x")
    capsys.readouterr()
    assert main([*args, str(blocker / "out"), "--base", str(base)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {blocker}: "), err
