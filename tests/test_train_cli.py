"""`codebook-features train`: a config, a local model folder and a text file, end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import story_workload

from codebook_features.cli import main
from codebook_features.errors import CodebookError
from codebook_features.experiments.stories import generate_stories, write_corpus
from codebook_features.training.config import load_config
from codebook_features.training.job import run_training

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "stories-local.yaml"


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    corpus, _, _ = story_workload(d, num_stories=300, seed=0, positions=64)
    return d, corpus


def overrides(d: Path, corpus: Path, *extra: str) -> list[str]:
    return [f"model={d / 'model'}", f"data.files=[{corpus}]", "data.seq_len=32",
            "training.max_steps=4", "training.save_steps=2", "training.logging_steps=2",
            f"training.output_dir={d / 'run'}", "training.use_cpu=true",
            "training.disable_tqdm=true", "codebooks.num_codes=64", *extra]


def test_train_end_to_end_and_resume(workload):
    d, corpus = workload
    cfg = load_config(CONFIG, overrides(d, corpus))
    metrics = run_training(cfg)
    final = d / "run" / "final"
    assert (final / "codebooks.safetensors").is_file()
    saved = json.loads((final / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    # The final metrics are the saved model's loss and accuracy on the evaluation rows, with
    # and without codebooks, recomputed here with plain cross-entropy.
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from codebook_features.model import CodebookModel
    from codebook_features.training.config import training_arguments
    from codebook_features.training.job import build_datasets

    _, eval_ds = build_datasets(cfg, AutoTokenizer.from_pretrained(final),
                                training_arguments(cfg).seed)
    ids = torch.tensor(eval_ds["input_ids"])
    labels = torch.tensor(eval_ds["labels"] if "labels" in eval_ds.column_names
                          else eval_ds["input_ids"])[:, 1:]
    saved = CodebookModel.from_pretrained(final).eval()
    for key in ("with_codebooks", "without_codebooks"):
        with torch.no_grad():
            if key == "with_codebooks":
                logits = saved(input_ids=ids).logits[:, :-1]
            else:
                with saved.codebooks_disabled():
                    logits = saved(input_ids=ids).logits[:, :-1]
        scored = labels != -100
        loss = F.cross_entropy(logits[scored], labels[scored])
        acc = (logits.argmax(-1)[scored] == labels[scored]).double().mean()
        assert metrics[key]["loss"] == pytest.approx(float(loss), rel=1e-5), key
        assert metrics[key]["accuracy"] == pytest.approx(float(acc), abs=1e-9), key
        assert metrics[key]["perplexity"] == pytest.approx(math.exp(metrics[key]["loss"]))
    assert (d / "run" / "checkpoint-4").is_dir()
    # Running again resumes from the last checkpoint (already at max_steps): nothing retrained.
    again = run_training(load_config(CONFIG, overrides(d, corpus)))
    assert again == metrics

    assert (final / "model.safetensors").is_file()  # the finetuned base weights
    # eval: the paper's Table 2 from the saved codebooks, on the training split.
    assert main(["eval", str(final), str(CONFIG), *overrides(d, corpus),
                 "data.eval_split=train"]) == 0
    ev = json.loads((final / "eval_metrics.json").read_text())
    table = (final / "eval_table.md").read_text()
    assert "| With codebooks |" in table and "| layers.0.attn_heads |" in table
    assert ev["sites"]["layers.0.attn_heads"]["fvu"] > 0
    assert 0 <= ev["sites"]["layers.0.attn_heads"]["dead_fraction"] < 1
    assert ev["with_codebooks"]["perplexity"] == pytest.approx(
        math.exp(ev["with_codebooks"]["loss"]))
    assert main(["eval", str(d / "nowhere"), str(CONFIG), *overrides(d, corpus)]) == 2


def test_cli_runs(workload, tmp_path):
    d, corpus = workload
    args = overrides(d, corpus, f"training.output_dir={tmp_path / 'cli'}",
                     "training.max_steps=2")
    proc = subprocess.run([sys.executable, "-m", "codebook_features", "train", str(CONFIG),
                           *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"with_codebooks"' in proc.stdout


def test_progress_bars_on_by_default_and_disable_tqdm_hides_them(workload, tmp_path):
    """A CLI run draws tqdm bars on stderr: the Trainer's (steps of max_steps) and the weight
    loading's; ``training.disable_tqdm=true`` hides every bar (data packing's, weight
    loading's and writing's), not only the Trainer's."""
    import re

    d, corpus = workload
    runs = {}
    for flag in ("false", "true"):
        args = overrides(d, corpus, f"training.output_dir={tmp_path / flag}",
                         "training.max_steps=3", "training.save_steps=3",
                         f"training.disable_tqdm={flag}")
        proc = subprocess.run([sys.executable, "-m", "codebook_features", "train",
                               str(CONFIG), *args], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[flag] = proc.stderr
    bar = re.compile(r"\d+%\|[^|]*\| \d+/\d+ \[")  # "100%|███| 3/3 [00:01<00:00, ...]"
    steps = re.findall(r"(?m)^\s*(\d+)%\|[^|]*\| (\d+)/3 \[", runs["false"])
    assert steps and steps[-1] == ("100", "3"), runs["false"][-2000:]  # the Trainer's bar
    assert re.search(r"Loading weights: +100%\|", runs["false"])  # transformers' bar
    assert not bar.search(runs["true"]) and "it/s]" not in runs["true"], runs["true"][-2000:]
    assert "examples/s]" not in runs["true"]


def test_progress_bars_switch_is_restored():
    import datasets
    from transformers.utils import logging as hf_logging

    from codebook_features.io import progress_bars, quiet_transformers

    def state():
        return (datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled(),
                hf_logging.get_verbosity())

    hf_logging.enable_progress_bar()
    datasets.enable_progress_bars()
    before = state()
    with progress_bars(False):
        assert not datasets.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
    assert state() == before == (True, True, before[2])
    with progress_bars(True):
        assert datasets.is_progress_bar_enabled()
    with quiet_transformers():
        assert state() == (False, False, hf_logging.ERROR)
    assert state() == before
    hf_logging.disable_progress_bar()  # off before: stays off after
    with progress_bars(False):
        pass
    assert not hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()


def test_torchrun_two_processes_write_one_final_folder(workload, tmp_path):
    """``torchrun --nproc_per_node 2 -m codebook_features train`` (gloo, CPU): k-means in the
    process group, training, and the final folder written once, by the main process."""
    d, corpus = workload
    out = tmp_path / "ddp"
    args = overrides(d, corpus, f"training.output_dir={out}", "training.max_steps=2",
                     "training.per_device_train_batch_size=4", "kmeans_init_batches=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "codebook_features", "train",
                           str(CONFIG), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"with_codebooks"') == 1  # the metrics, printed once
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "runs") == [
        "checkpoint-2", "final"]
    final = out / "final"
    assert {"codebooks.safetensors", "model.safetensors", "metrics.json"} <= {
        p.name for p in final.iterdir()}
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 4
    assert json.loads((final / "metrics.json").read_text())["with_codebooks"]["loss"] > 0


@pytest.mark.parametrize("extra,match", [
    (["training.colour=red"], r"training: unknown key\(s\) \['colour'\]"),
    (["codebooks.colour=red"], "unknown codebook model config keys"),
    (["training.max_steps=many"], "training.max_steps must be an integer, got 'many'"),
    (["data.seq_len=4096"], "data.seq_len=4096 exceeds the model's 64 positions"),
    (["data.text_column=body"], None),
    (["data.text_column=body", "data.streaming=true"], None),
    (["model=/nonexistent/model"], "cannot load model '/nonexistent/model'"),
    (["codebooks.k=100"], "k=100 must be between 1 and num_codes=64"),
    (["data.streaming=true", "training.max_steps=-1"], "data.streaming needs training.max_steps"),
    (["training.gradient_accumulation_steps=0"],
     r"training.gradient_accumulation_steps=0: must be at least 1"),
    (["training.codebook_learning_rate=-1"], "codebook_learning_rate=-1.0: must be at least 0"),
    (["training.max_steps=0"], "max_steps=0: give a positive number"),
    (["training.fp16=true"], "training.fp16 needs a GPU .* use training.bf16=true"),
    (["training.report_to=[tensorbored]"], r"report_to: unknown \['tensorbored'\]"),
    (["training.lr_scheduler_type=warmup_stable_decay"],
     "lr_scheduler_type=warmup_stable_decay with lr_scheduler_kwargs={}: .*num_decay_steps"),
    (["training.lr_scheduler_type=sometimes"], "training: sometimes is not a valid SchedulerType"),
    (["data.shuffle_buffer=10"], "data.shuffle_buffer is for data.streaming"),
])
def test_bad_configs_fail_before_work(workload, extra, match):
    d, corpus = workload
    if "data.text_column=body" in extra:  # a .jsonl file whose text is in "text"
        jsonl = write_corpus(d / "stories.jsonl", generate_stories(num_stories=5, seed=1))
        args = overrides(d, corpus, f"data.files=[{jsonl}]", *extra)
        match = r"dataset has no column 'body'"
    else:
        args = overrides(d, corpus, *extra)
    never = d / f"never-{abs(hash(tuple(extra)))}"
    with pytest.raises(CodebookError, match=match):
        run_training(load_config(CONFIG, [*args, f"training.output_dir={never}"]))
    assert not never.exists()  # stopped before any training output was written


WIKITEXT = CONFIG.with_name("wikitext103-pythia410m.yaml")
NO_HUB = "http://127.0.0.1:9"  # HF_ENDPOINT that refuses at once: a hub with no network


def _cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.parametrize("endpoint", [None, NO_HUB], ids=["this-network", "no-hub"])
def test_unreachable_hub_model_fails_fast_with_one_line(tmp_path, endpoint):
    """A hub name that is neither a folder nor cached: one error line and exit 2, whether
    the hub answers (no such repository) or not (no network), never huggingface_hub's
    retries (about 25 s of "Retrying in ..." lines before)."""
    env = _cli_env(tmp_path, **({"HF_ENDPOINT": endpoint} if endpoint else {}))
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "codebook_features", "train", str(WIKITEXT),
                           "model=nobody/no-such-model-xyz", f"training.output_dir={out}",
                           "training.use_cpu=true"],
                          capture_output=True, text=True, timeout=120, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(
        "error: cannot load model 'nobody/no-such-model-xyz'"), proc.stderr[-2000:]
    assert "Retrying" not in proc.stderr
    assert not out.exists()


def test_cached_hub_model_trains_with_no_hub(workload, tmp_path):
    """A hub name found in the Hugging Face cache trains with no network: the process goes
    offline after one failed request instead of retrying every file."""
    import shutil

    d, corpus = workload
    repo = tmp_path / "hf" / "hub" / "models--nobody--tiny-stories"
    shutil.copytree(d / "model", repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    out = tmp_path / "run"
    args = overrides(d, corpus, "model=nobody/tiny-stories", f"training.output_dir={out}",
                     "training.max_steps=1", "kmeans_init_batches=0")
    proc = subprocess.run([sys.executable, "-m", "codebook_features", "train", str(CONFIG),
                           *args], capture_output=True, text=True, timeout=300,
                          env=_cli_env(tmp_path, HF_ENDPOINT=NO_HUB))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hub unreachable: loading models and datasets from the Hugging Face cache only" \
        in proc.stderr
    assert "Retrying" not in proc.stderr
    assert (out / "final" / "codebooks.safetensors").is_file()


def test_config_file_errors(tmp_path):
    with pytest.raises(CodebookError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(CodebookError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(CodebookError, match="model is required"):
        load_config(CONFIG)


def test_yaml_no_and_yes_stay_strings(tmp_path):
    """YAML 1.1 reads ``no`` as False; HF settings like ``eval_strategy: no`` need the word."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: m\ntraining:\n  save_strategy: no\n  disable_tqdm: true\n")
    cfg = load_config(cfg_file, ["training.eval_strategy=no", "training.bf16=false"])
    assert cfg.training["save_strategy"] == "no" and cfg.training["eval_strategy"] == "no"
    assert cfg.training["disable_tqdm"] is True and cfg.training["bf16"] is False


# `python -m codebook_features` that SIGKILLs itself in the middle of writing the first
# checkpoint after step KILL_AFTER: once the codebooks are written into the staging folder,
# before the rest of the checkpoint (a deterministic point, whatever the machine's speed).
KILL_AFTER = 10
KILL_MID_SAVE = f"""
import os, re, runpy, signal, sys
from codebook_features.model import CodebookModel
real = CodebookModel.save_codebooks
def save_codebooks(self, directory, *args, **kwargs):
    real(self, directory, *args, **kwargs)
    m = re.search(r"[.]tmp-checkpoint-([0-9]+)", str(directory))
    if m and int(m.group(1)) > {KILL_AFTER}:
        os.kill(os.getpid(), signal.SIGKILL)
CodebookModel.save_codebooks = save_codebooks
sys.argv = ["codebook_features", *sys.argv[1:]]
runpy.run_module("codebook_features", run_name="__main__")
"""


def _train_proc(d: Path, corpus: Path, out: Path, kill: bool = False) -> subprocess.Popen:
    # Dead codes (3 steps unused) replaced every 5 steps: before the kill and after the resume.
    args = overrides(d, corpus, f"training.output_dir={out}", "training.max_steps=40",
                     "training.save_steps=5", "training.logging_steps=5",
                     "training.dead_code_interval=5", "codebooks.dead_code_window=3")
    entry = ["-c", KILL_MID_SAVE] if kill else ["-m", "codebook_features"]
    return subprocess.Popen([sys.executable, *entry, "train", str(CONFIG), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _replaced_by_step(run: Path) -> dict[int, int]:
    """``codes_replaced`` logged at each step (counted from the start of the process that
    logged it), from the newest checkpoint's trainer state."""
    from codebook_features.training import last_complete_checkpoint

    state = json.loads((Path(last_complete_checkpoint(run)) / "trainer_state.json").read_text())
    return {h["step"]: h["codes_replaced"] for h in state["log_history"]
            if "codes_replaced" in h}


def test_sigkill_then_resume_gives_the_same_codebooks(workload, tmp_path):
    """SIGKILL in the middle of writing a checkpoint (step 15's, after step 10's is complete):
    the half-written one is only a hidden staging folder, never a ``checkpoint-N`` that resume
    (Hugging Face's or ours) would pick up; resuming ends exactly like the uninterrupted run."""
    import signal

    from safetensors.torch import load_file
    from transformers.trainer_utils import get_last_checkpoint

    from codebook_features.training import last_complete_checkpoint

    d, corpus = workload
    full = _train_proc(d, corpus, tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()[-2000:]

    cut_dir = tmp_path / "cut"
    cut = _train_proc(d, corpus, cut_dir, kill=True)
    cut.wait(timeout=600)
    assert cut.returncode == -signal.SIGKILL, cut.stderr.read()[-2000:]
    assert not (cut_dir / "final").exists()
    staged = cut_dir / ".tmp-checkpoint-15" / "checkpoint-15"
    assert (staged / "codebooks.safetensors").is_file()  # killed mid-save ...
    assert not (staged / "trainer_state.json").exists()  # ... before the trainer state
    assert not (cut_dir / "checkpoint-15").exists()  # ... and not where resume looks
    assert last_complete_checkpoint(cut_dir) == str(cut_dir / "checkpoint-10")
    assert get_last_checkpoint(str(cut_dir)) == last_complete_checkpoint(cut_dir)
    before = _replaced_by_step(tmp_path / "cut")
    assert before[10] > 0, before  # dead codes were replaced before the kill

    resumed = _train_proc(d, corpus, cut_dir)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    assert not list(cut_dir.glob(".tmp-*"))  # the next save removed the staging folder
    after = _replaced_by_step(tmp_path / "cut")
    assert after[40] > 0, after  # ... and by the resumed process, after the kill
    for name in ("codebooks.safetensors", "model.safetensors"):  # codebooks and base weights
        want = load_file(str(tmp_path / "full" / "final" / name))
        got = load_file(str(tmp_path / "cut" / "final" / name))
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{name}: {k}")


def test_incomplete_checkpoint_is_skipped(tmp_path):
    from codebook_features.training import last_complete_checkpoint

    good, bad = tmp_path / "checkpoint-5", tmp_path / "checkpoint-10"
    for p in (good, bad):
        p.mkdir()
        (p / "codebook_model.json").write_text("{}")
    (good / "trainer_state.json").write_text("{}")
    (bad / "trainer_state.json").write_text('{"trunc')  # killed mid-write
    assert last_complete_checkpoint(tmp_path) == str(good)
    assert last_complete_checkpoint(tmp_path / "absent") is None


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``run_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run_dir.glob("runs/*/events.out.tfevents.*"))
    assert files, f"no TensorBoard event files under {run_dir}/runs"
    out: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_streaming_run_with_eval_during_training_and_tensorboard(workload, tmp_path):
    d, corpus = workload
    out = tmp_path / "stream"
    cfg = load_config(CONFIG, overrides(
        d, corpus, f"training.output_dir={out}", "data.streaming=true", "data.max_eval_rows=8",
        "training.eval_strategy=steps", "training.eval_steps=2"))
    metrics = run_training(cfg)
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    site = "layers.0.attn_heads"
    for h in evals:
        for key in ("loss", "accuracy", "perplexity"):
            assert f"eval_{key}" in h and f"eval_without_codebooks_{key}" in h
        assert h["eval_perplexity"] == pytest.approx(math.exp(h["eval_loss"]))
        assert h["eval_loss"] != h["eval_without_codebooks_loss"]
        assert 0 < h[f"eval_{site}/fvu"] and 0 <= h[f"eval_{site}/dead_fraction"] < 1
        assert h[f"eval_{site}/mse"] > 0 and h[f"eval_{site}/usage_entropy"] > 0
        assert h["eval_tokens"] == 8 * 31  # the 8 held-out rows of 32 tokens, 31 scored each
    # The evaluation at the last step saw the final model on the same rows as the final one.
    assert evals[-1]["eval_loss"] == pytest.approx(metrics["with_codebooks"]["loss"], rel=1e-6)
    assert evals[-1]["eval_without_codebooks_loss"] == pytest.approx(
        metrics["without_codebooks"]["loss"], rel=1e-6)
    assert metrics["sites"][site]["fvu"] > 0
    # eval on the same 8 rows (the stream's first) gives the training run's final figures: the
    # finetuned base weights were saved with the codebooks.
    final = out / "final"
    assert main(["eval", str(final), str(CONFIG), *overrides(d, corpus),
                 "data.streaming=true", "data.max_eval_rows=8"]) == 0
    ev = json.loads((final / "eval_metrics.json").read_text())
    for key in ("with_codebooks", "without_codebooks"):
        assert ev[key] == pytest.approx(metrics[key], rel=1e-6), key
    assert ev["sites"][site] == pytest.approx(metrics["sites"][site], rel=1e-6)

    # TensorBoard (the CLI's default report_to) has the training and evaluation scalars.
    scalars = _scalars(out)
    train_logs = [h for h in history if "codebook_mse" in h]
    assert [v for _, v in scalars["train/codebook_mse"]] == pytest.approx(
        [h["codebook_mse"] for h in train_logs])
    assert [s for s, _ in scalars["eval/without_codebooks_loss"]] == [2, 4]
    assert scalars[f"eval/{site}/fvu"][-1][1] == pytest.approx(evals[-1][f"eval_{site}/fvu"])


def _no_wandb_login(monkeypatch, home: Path) -> None:
    """No credentials and no mode, with every variable restored after the test."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))


def test_wandb_goes_offline_without_credentials(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from codebook_features.training.network import wandb_offline_unless_logged_in as offline

    _no_wandb_login(monkeypatch, tmp_path)
    assert offline(SimpleNamespace(report_to=["tensorboard"], output_dir=str(tmp_path))) is None
    assert "WANDB_MODE" not in os.environ
    args = SimpleNamespace(report_to=["wandb"], output_dir=str(tmp_path / "out"))
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert offline(args) is None and "WANDB_MODE" not in os.environ  # logged in via netrc
    assert os.environ["WANDB_DIR"] == str((tmp_path / "out").resolve())
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert offline(args) is None and "WANDB_MODE" not in os.environ
    monkeypatch.delenv("WANDB_API_KEY")
    assert offline(args) == "offline" and os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert offline(args) is None and os.environ["WANDB_MODE"] == "disabled"


def test_wandb_run_without_network_logs_offline(workload, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    d, corpus = workload
    _no_wandb_login(monkeypatch, tmp_path)
    out = tmp_path / "wb"
    args = overrides(d, corpus, f"training.output_dir={out}", "training.max_steps=2",
                     "training.report_to=[wandb]", "kmeans_init_batches=0")
    proc = subprocess.run([sys.executable, "-m", "codebook_features", "train", str(CONFIG),
                           *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb: not logged in, logging offline" in proc.stderr
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    assert b"codebook_mse" in runs[0].read_bytes()
    assert not list(out.glob("runs/*/events.out.tfevents.*"))  # report_to replaced the default


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG.parent.glob("*.yaml")))
def test_shipped_configs_load_and_their_arguments_check(name):
    from codebook_features.training.config import training_arguments

    extra = ["model=somewhere"] if name == CONFIG.name else []
    cfg = load_config(CONFIG.parent / name, [*extra, "training.use_cpu=true"])
    args = training_arguments(cfg)
    assert args.max_steps > 0 and args.report_to == ["tensorboard"]
    # The cooldown variant the TinyStories config describes is accepted as written there.
    cfg = load_config(CONFIG.parent / name, [
        *extra, "training.use_cpu=true", "training.lr_scheduler_type=warmup_stable_decay",
        "training.lr_scheduler_kwargs={num_decay_steps: 3000, decay_type: linear}"])
    assert training_arguments(cfg).lr_scheduler_kwargs["num_decay_steps"] == 3000
