"""Nothing lost, one clear line: finished runs left alone, resumes that say so, settings that
no longer match their checkpoint, filesystem errors as one line, file permissions."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from tiny_models import story_workload

from codebook_features.cli import main
from codebook_features.errors import CodebookError
from codebook_features.training.config import load_config
from codebook_features.training.job import run_training

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "stories-local.yaml"
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # permissions do not stop root


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust")
    corpus, _, _ = story_workload(d, num_stories=120, seed=0, positions=64)
    return d, corpus


def overrides(d: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [f"model={d / 'model'}", f"data.files=[{corpus}]", "data.seq_len=32",
            "training.max_steps=2", "training.save_steps=2", "training.logging_steps=2",
            f"training.output_dir={out}", "training.use_cpu=true", "training.report_to=[]",
            "training.disable_tqdm=true", "codebooks.num_codes=16", "kmeans_init_batches=0",
            "training.eval_strategy=no", *extra]


def last_line(err: str) -> str:
    """The last line of stderr (progress bars before it end in carriage returns)."""
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err
    return lines[-1].rsplit("\r", 1)[-1]


def _digest(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- train
def test_finished_run_is_left_alone_and_a_larger_max_steps_continues_it(workload, tmp_path,
                                                                         capsys):
    d, corpus = workload
    out = tmp_path / "run"
    first = run_training(load_config(CONFIG, overrides(d, corpus, out)))
    final = _digest(out / "final")
    capsys.readouterr()
    again = run_training(load_config(CONFIG, overrides(d, corpus, out)))
    err = capsys.readouterr().err
    assert "already holds a finished run (2 steps" in err and "nothing to do" in err
    assert again == json.loads(json.dumps(first))
    assert _digest(out / "final") == final  # final/ untouched
    assert not (out / "checkpoint-3").exists()  # no step past max_steps
    with pytest.raises(CodebookError, match=r"final: the finished run there was trained with "
                       r"codebooks\.num_codes=16, the config now has 32"):
        run_training(load_config(CONFIG, overrides(d, corpus, out, "codebooks.num_codes=32")))
    # A larger max_steps continues from the last checkpoint.
    more = run_training(load_config(CONFIG, overrides(d, corpus, out, "training.max_steps=4")))
    err = capsys.readouterr().err
    assert "continuing the finished run" in err and "max_steps=4" in err
    assert f"resuming from {out / 'checkpoint-2'} (step 2)" in err
    assert (out / "checkpoint-4").is_dir()
    assert json.loads((out / "final" / "finished.json").read_text())["global_step"] == 4
    assert more != first


@pytest.mark.parametrize("change,field", [("codebooks.num_codes=32", "num_codes"),
                                          ("codebooks.placements=[mlp_out]", "placements")])
def test_resume_with_changed_codebooks_names_the_field(workload, tmp_path, change, field):
    d, corpus = workload
    out = tmp_path / "run"
    run_training(load_config(CONFIG, overrides(d, corpus, out, "training.max_steps=2")))
    (out / "final" / "finished.json").unlink()  # as if killed before final/ was written
    (out / "checkpoint-2" / "trainer_state.json").write_text(
        (out / "checkpoint-2" / "trainer_state.json").read_text().replace(
            '"global_step": 2', '"global_step": 1'))  # ... and before the end
    with pytest.raises(CodebookError, match=rf"checkpoint-2: the run to resume was started "
                       rf"with codebooks\.{field}=.*set codebooks\.{field} back.*new "
                       r"training\.output_dir"):
        run_training(load_config(CONFIG, overrides(d, corpus, out, change)))


def test_yaml_k_not_an_integer(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ncodebooks: {k: two}\n")
    with pytest.raises(CodebookError, match=r"codebooks\.k must be an integer, got 'two'"):
        load_config(cfg)


# ---------------------------------------------------------------- one line per OSError
def test_out_naming_an_existing_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    assert main(["synthetic", "--out", str(f), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {f}: ") and "\n" not in err and "Traceback" not in err
    assert main(["synthetic", "--out", str(f / "sub"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "a file is where a folder is needed" in err


@pytest.mark.parametrize("code,fix", [(errno.EACCES, "permissions"),
                                      (errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full")])
def test_any_os_error_of_any_command_is_one_line(tmp_path, capsys, monkeypatch, code, fix):
    """The handler is in cli.main: whatever write fails, in whatever command."""
    import codebook_features.io as cio

    def fail(*a, **k):
        raise OSError(code, os.strerror(code), str(tmp_path / "out" / "x"))

    monkeypatch.setattr(cio.tempfile, "mkstemp", fail)
    assert main(["synthetic", "--out", str(tmp_path / "out"), "--steps", "1"]) == 2
    err = last_line(capsys.readouterr().err)
    assert err.startswith(f"error: {tmp_path / 'out' / 'x'}: {os.strerror(code)}; ")
    assert fix in err


@pytest.mark.skipif(ROOT, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["synthetic", "--out", str(ro / "x"), "--steps", "1"]) == 2
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert "Permission denied; check its permissions" in err and "\n" not in err


def test_atomic_writes_honour_the_umask(tmp_path):
    import torch

    from codebook_features.io import write_json, write_safetensors, write_text

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        write_text(tmp_path / "b.html", "x")
        write_safetensors(tmp_path / "c.safetensors", {"t": torch.zeros(1)})
        os.umask(0o077)
        write_json(tmp_path / "d.json", {})
    finally:
        os.umask(old)
    for name in ("a.json", "b.html", "c.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "d.json").stat().st_mode) == 0o600


def test_version(capsys):
    from codebook_features import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == \
        f"codebook-features {__version__}"


def test_train_into_a_file_is_one_line_before_any_work(workload, tmp_path, capsys):
    d, corpus = workload
    f = tmp_path / "taken"
    f.write_text("x")
    for out, why in ((f, "File exists"), (f / "run", "Not a directory")):
        assert main(["train", str(CONFIG), *overrides(d, corpus, out)]) == 2
        assert last_line(capsys.readouterr().err).startswith(f"error: {f}: {why}; ")
    assert f.read_text() == "x"


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_codebook_layer_refuses_integer_input(dtype):
    from codebook_features import CodebookConfig, CodebookLayer

    layer = CodebookLayer(CodebookConfig(dim=8, num_codes=4, k=1))
    with pytest.raises(CodebookError, match=f"dtype {dtype} is not floating point"):
        layer(torch.ones(3, 8, dtype=dtype))
    assert layer(torch.ones(3, 8)).shape == (3, 8)


# ---------------------------------------------------------------- eval, steer, help
def test_eval_refuses_a_config_whose_model_or_tokenizer_is_not_the_base(workload, tmp_path,
                                                                       capsys):
    from codebook_features.model import CodebookModel, load_base_model

    d, corpus = workload
    other = tmp_path / "other"
    other.mkdir()
    story_workload(other, num_stories=40, seed=5, positions=64)  # another tokenizer and model
    out = tmp_path / "run"
    run_training(load_config(CONFIG, overrides(d, corpus, out)))
    final = str(out / "final")
    args = overrides(d, corpus, out, "data.eval_split=train", "data.max_eval_rows=4")
    # finetuned folder (base weights and tokenizer saved with it): the config's tokenizer
    assert main(["eval", final, str(CONFIG), *args, f"model={other / 'model'}"]) == 2
    assert "the tokenizer saved with the model differs from the config's" in \
        last_line(capsys.readouterr().err)
    assert not (out / "final" / "eval_metrics.json").exists()
    assert main(["eval", final, str(CONFIG), *args]) == 0  # the run's own config
    capsys.readouterr()
    # codebooks alone: the config's model must be the base they were trained on
    cb = tmp_path / "cb"
    CodebookModel(load_base_model(d / "model"), placements=["attn_heads"], num_codes=8
                  ).save_codebooks(cb, base_model_name=str(d / "model"))
    assert main(["eval", str(cb), str(CONFIG), *args, f"model={other / 'model'}"]) == 2
    err = last_line(capsys.readouterr().err)
    assert f"trained on base model {d / 'model'}, the config names model={other / 'model'}" \
        in err
    assert main(["eval", str(cb), str(CONFIG), *args]) == 0


def test_help_texts(capsys):
    import re

    for cmd, options in (("steer", ("--samples", "--max-new-tokens", "--temperature",
                                    "--seed", "--code")),
                         ("eval", ("--batch-size", "--out"))):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for opt in options:  # each option has words after its metavar
            assert re.search(rf"{opt} [A-Z_:]+ [a-z(]", text), (cmd, opt)
        if cmd == "eval":
            assert "metrics.json and table.md" not in text


def test_steer_without_code_refuses(tmp_path, capsys):
    assert main(["steer", str(tmp_path / "nowhere")]) == 2
    err = last_line(capsys.readouterr().err)
    assert err.startswith("error: no --code given: the generation would run unsteered")


def test_other_bad_input_found_by_the_search_is_one_line(workload, tmp_path, capsys):
    """What a sweep of every command with bad paths and values found: each one line."""
    from codebook_features.model import CodebookModel, load_base_model

    d, corpus = workload
    cb = tmp_path / "cb"
    CodebookModel(load_base_model(d / "model"), placements=["attn_heads"], num_codes=8
                  ).save_codebooks(cb, base_model_name=str(d / "model"))
    empty = tmp_path / "empty"
    empty.mkdir()
    ix = tmp_path / "ix"
    ix.mkdir()
    (ix / "meta.json").write_text('{"format": "codebook-features/code-index", "version": 2}')
    for argv, want in (
            (["steer", str(cb), "--code", "layers.0.attn_heads:0:1", "--tokenizer",
              str(empty)], f"cannot load a tokenizer from '{empty}'"),
            (["eval", str(cb), str(CONFIG), *overrides(d, corpus, tmp_path / "r"),
              "--batch-size", "0"], "--batch-size 0: give at least 1"),
            (["synthetic", "--steps", "0", "--out", str(tmp_path / "s")],
             "--steps 0: give at least 1"),
            (["search", str(ix), "--site", "x", "--code", "1"], "meta.json: malformed"),
            (["browse", str(ix)], "meta.json: malformed")):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert want in last_line(capsys.readouterr().err), argv


def test_os_errors_wrapped_by_libraries_are_one_line(tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as SafetensorError("... Os { code: 28 ... }"); a
    library error raised from an OSError carries it as its cause: both one line."""
    from safetensors import SafetensorError

    import codebook_features.io as cio

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                              'StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(cio, "save_file", full)
    assert main(["synthetic", "--out", str(tmp_path / "a"), "--steps", "1"]) == 2
    assert last_line(capsys.readouterr().err) == (
        f"error: {os.strerror(errno.ENOSPC)}; the disk is full; free some space (or pass a "
        "folder on another disk) and run again: finished work is kept")

    def wrapped(*a, **k):
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/x/y")
        except OSError as e:
            raise RuntimeError("could not save") from e

    monkeypatch.setattr(cio, "save_file", wrapped)
    assert main(["synthetic", "--out", str(tmp_path / "b"), "--steps", "1"]) == 2
    assert last_line(capsys.readouterr().err).startswith("error: /x/y: Permission denied; ")
    monkeypatch.setattr(cio, "save_file", lambda *a, **k: 1 / 0)  # a bug: its traceback
    with pytest.raises(ZeroDivisionError):
        main(["synthetic", "--out", str(tmp_path / "c"), "--steps", "1"])
