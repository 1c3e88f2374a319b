"""The story job end to end (quick settings) and the ``steer`` command on its model."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from codebook_features.analysis import CodeIndex
from codebook_features.errors import CodebookError
from codebook_features.evaluation import evaluate_codebooks
from codebook_features.experiments.stories.job import _rows_dataset, config_from_args
from codebook_features.model import CodebookModel


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codebook_features", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``codebook-features stories --quick --out OUT`` run as a command: it exits 0, prints the
    eval and steering figures, and its report.json holds them."""
    out = tmp_path_factory.mktemp("stories") / "run"
    res = _cli("stories", "--quick", "--out", str(out), cwd=out.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()  # progress lines, then the figures as JSON
    printed = json.loads("\n".join(lines[len(lines) - lines[::-1].index("{") - 1:]))
    report = json.loads((out / "report.json").read_text())
    assert printed["steering"] == report["steering"]
    assert printed["eval"] == {k: report["eval"][k] for k in ("with_codebooks",
                                                               "without_codebooks")}
    cfg = config_from_args(argparse.Namespace(out=str(out), quick=True, set=[]))
    assert report["config"]["out"] == str(out) and report["config"]["seed"] == cfg.seed
    return out, cfg, report


def test_quick_run_writes_a_complete_report(quick_run):
    out, cfg, report = quick_run
    assert set(report["steering"][0]) >= {"topic", "codes", "baseline", "steered"}
    assert [r["topic"] for r in report["steering"]] == list(cfg.topics)
    for r in report["steering"]:
        assert r["samples"] == 4 * cfg.samples_per_prompt and 0 <= r["steered"] <= 1
    for topic, codes in report["topic_codes"].items():
        assert len(codes) == cfg.codes_per_topic
        assert all(c["share"] >= c["other_share"] for c in codes[:1]), topic
    ev = report["eval"]
    assert ev["with_codebooks"]["loss"] > 0 and ev["without_codebooks"]["loss"] > 0
    assert ev["base_model"]["perplexity"] > 1
    assert "| Base model (before codebooks) |" in (out / "table.md").read_text()
    # The standard evaluation: its table (each site and all), plot, and the model's card.
    assert {"layers.0.attn_heads", "all"} <= set(ev["standard"])
    for row in ev["standard"].values():
        assert row["l0"] == cfg.heads * cfg.k and 0 <= row["alive_fraction"] <= 1
        assert row["ce_loss_base"] == ev["without_codebooks"]["loss"]
    table_md = (out / "table.md").read_text()
    assert "| all |" in table_md and "![code density](code_density.png)" in table_md
    assert (out / "code_density.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "model" / "README.md").read_text()
    assert "library_name: codebook-features" in card and "## Evaluation" in card
    assert (out / "table.md").read_text().count("|") > 20
    assert json.loads((out / "report.json").read_text())["steering"] == report["steering"]


def test_saved_model_reloads_with_the_same_metrics(quick_run, tmp_path):
    out, cfg, report = quick_run
    # The folder is self-contained (the base recorded as "."): a copy elsewhere, as the hub
    # would deliver it, loads too.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out / "model", copy)
    model = CodebookModel.from_pretrained(copy)
    tok = AutoTokenizer.from_pretrained(out / "model")
    from codebook_features.experiments.stories import StoryConfig, generate_stories

    eval_stories = generate_stories(StoryConfig(num_stories=cfg.eval_stories,
                                                seed=cfg.seed + 1))
    again = evaluate_codebooks(model, _rows_dataset(tok, eval_stories, cfg.seq_len),
                               batch_size=cfg.batch)
    assert again["with_codebooks"]["loss"] == pytest.approx(
        report["eval"]["with_codebooks"]["loss"], rel=1e-5)
    with CodeIndex.open(out / "index", model=model) as idx:
        assert idx.num_docs == cfg.eval_stories


def test_steer_command(quick_run, tmp_path):
    out, _, report = quick_run
    code = report["topic_codes"]["dragon"][0]
    spec = f"{code['site']}:{code['group']}:{code['code']}"
    res = _cli("steer", str(out / "model"), "--prompt", "Once upon a time", "--code", spec,
               "--mode", "replace", "--samples", "2", "--max-new-tokens", "8", "--greedy",
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["codes"] == [spec] and len(got["steered"]) == 2 and len(got["unsteered"]) == 2
    bad = _cli("steer", str(out / "model"), "--code", "layers.7.attn_heads:0:1", cwd=tmp_path)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("error: no codebook at site")
    assert "Traceback" not in bad.stderr
    bad = _cli("steer", str(out / "model"), "--code", code["site"], "--positions", "x",
               cwd=tmp_path)
    assert bad.returncode == 2 and "SITE:GROUP:CODE" in bad.stderr


def test_bad_settings():
    threads = torch.get_num_threads()
    with pytest.raises(CodebookError, match="KEY=VALUE"):
        config_from_args(argparse.Namespace(out="x", quick=False, set=["nope=1"]))
    cfg = config_from_args(argparse.Namespace(out="x", quick=False,
                                              set=["topics=dragon,fire", "k=4"]))
    assert cfg.topics == ("dragon", "fire") and cfg.k == 4
    assert torch.get_num_threads() == threads  # reading settings changes nothing
