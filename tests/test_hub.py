"""Model cards and ``push`` without a network: HfApi's calls are captured by monkeypatching,
and the real client is run offline for its error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from tiny_models import tiny_model, tokens

from codebook_features.cli import main
from codebook_features.errors import CodebookError
from codebook_features.evaluation import evaluate_codebooks
from codebook_features.hub import push_to_hub
from codebook_features.io import write_json
from codebook_features.model import CodebookModel
from codebook_features.modelcard import MARK, refresh_model_card


def make_model() -> CodebookModel:
    torch.manual_seed(0)
    return CodebookModel(tiny_model("gpt_neox"), placements=["attn_heads"], num_codes=16, k=2)


@pytest.fixture
def saved(tmp_path):
    model = make_model()
    folder = tmp_path / "cb"
    model.save_codebooks(folder, base_model_name="EleutherAI/pythia-70m")
    return model, folder


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi.create_repo / upload_folder recorded (the card as it was at upload time)."""
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        folder = kw["folder_path"]
        kw["files"] = sorted(os.listdir(folder))
        kw["card"] = (folder / "README.md").read_text()
        calls.append(("upload_folder", kw))
        return type("Info", (), {"commit_url": f"https://hub.test/{kw['repo_id']}/commit/1"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return calls


def test_saved_folder_carries_a_model_card(saved, tmp_path):
    model, folder = saved
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "codebook-features"
    assert card.data.base_model == "EleutherAI/pythia-70m"
    assert {"codebook-features", "codebooks", "attn-heads", "gpt_neox"} <= set(card.data.tags)
    for row in ("| num_codes | 16 |", "| k | 2 |", "| similarity | cosine |",
                "| layers.0.attn_heads | `gpt_neox.layers.0.attention.dense` | 32 | 4 | 16 | 2 |",
                "| layers.1.attn_heads |"):
        assert row in card.text, row
    assert "## Evaluation" not in card.text
    # A local base model is not hub metadata.
    model.save_codebooks(tmp_path / "local", base_model_name=str(tmp_path / "base"))
    local = ModelCard.load(tmp_path / "local" / "README.md")
    assert local.data.base_model is None and str(tmp_path / "base") in local.text


def test_card_shows_evaluation_figures_newer_than_the_weights(saved):
    model, folder = saved
    metrics = evaluate_codebooks(model, tokens(6, 16), batch_size=4)
    write_json(folder / "eval_metrics.json", metrics)
    assert refresh_model_card(folder)
    text = (folder / "README.md").read_text()
    assert "## Evaluation" in text and "| all |" in text and "CE rec. (zero)" in text
    assert f"{metrics['standard']['all']['kl_div']:.4f}" in text
    # Saved again (new weights): the old figures no longer describe them.
    model.save_codebooks(folder, base_model_name="EleutherAI/pythia-70m")
    stamp = (folder / "codebooks.safetensors").stat().st_mtime_ns - 10**9
    os.utime(folder / "eval_metrics.json", ns=(stamp, stamp))
    assert refresh_model_card(folder)
    assert "## Evaluation" not in (folder / "README.md").read_text()


def test_a_users_own_readme_is_kept(saved):
    model, folder = saved
    (folder / "README.md").write_text("# My codebooks\n")
    model.save_codebooks(folder)
    assert not refresh_model_card(folder)
    assert (folder / "README.md").read_text() == "# My codebooks\n"


def test_push_uploads_the_folder_with_its_card(saved, fake_hub, capsys):
    _, folder = saved
    url = push_to_hub(folder, "me/tiny-codebooks", private=True)
    assert url == "https://hub.test/me/tiny-codebooks/commit/1"
    (c_name, create), (u_name, upload) = fake_hub
    assert (c_name, u_name) == ("create_repo", "upload_folder")
    assert create["repo_id"] == "me/tiny-codebooks" and create["exist_ok"] is True
    assert create["private"] is True
    assert upload["repo_id"] == "me/tiny-codebooks" and upload["folder_path"] == folder
    assert {"README.md", "codebook_model.json", "codebooks.safetensors"} <= set(upload["files"])
    assert 'from_pretrained("me/tiny-codebooks")' in upload["card"] and MARK in upload["card"]
    assert ".*" in upload["ignore_patterns"]  # atomic writes' temporaries stay home
    # The command does the same and prints the commit's URL.
    fake_hub.clear()
    assert main(["push", str(folder), "me/other", "--message", "v2"]) == 0
    assert capsys.readouterr().out.strip() == "https://hub.test/me/other/commit/1"
    assert fake_hub[1][1]["commit_message"] == "v2"
    assert fake_hub[0][1]["private"] is None  # the hub's default visibility


def test_push_a_model_saves_its_codebooks_first(fake_hub):
    model = make_model()
    push_to_hub(model, "me/from-model")
    upload = fake_hub[1][1]
    assert {"README.md", "codebook_model.json", "codebooks.safetensors"} <= set(upload["files"])
    assert not upload["folder_path"].exists()  # a temporary folder, removed


def test_push_bad_input_gets_one_line(saved, tmp_path, fake_hub, capsys, monkeypatch):
    _, folder = saved
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in [([str(empty), "me/x"], "holds no codebooks"),
                          ([str(tmp_path / "nowhere"), "me/x"], "folder not found"),
                          ([str(folder), "me/x/y"], "not a hub repo id")]:
        assert main(["push", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert fake_hub == []  # nothing was sent

    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(status):
        def create_repo(self, repo_id, **kw):
            r = httpx2.Response(status, request=httpx2.Request("POST", "https://hub.test/api"))
            raise HfHubHTTPError(f"{status} Client Error", response=r)
        return create_repo

    for status, message in [(401, "log in again"), (403, "may not write to me/x"),
                            (404, "no repo me/x")]:
        monkeypatch.setattr(HfApi, "create_repo", refuse(status))
        with pytest.raises(CodebookError, match=rf"HTTP {status}.*{message}"):
            push_to_hub(folder, "me/x")

    def unreachable(self, repo_id, **kw):
        raise httpx2.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    with pytest.raises(CodebookError, match="cannot reach the hub at .*Connection refused"):
        push_to_hub(folder, "me/x")

    def bad_revision(self, **kw):
        raise ValueError("Invalid rev id: no/such//branch")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", bad_revision)
    with pytest.raises(CodebookError, match="cannot push to me/x: Invalid rev id"):
        push_to_hub(folder, "me/x", revision="no/such//branch")


def _push_cli(folder, tmp_path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run([sys.executable, "-m", "codebook_features", "push", str(folder),
                           "me/x"], capture_output=True, text=True, timeout=300,
                          env={**clean, "HF_HOME": str(tmp_path / "hf"), **env})


def test_push_without_token_or_network_says_so(saved, tmp_path):
    """The real client: no token (an empty HF_HOME), then offline mode."""
    _, folder = saved
    res = _push_cli(folder, tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == ("error: no Hugging Face token: log in (hf auth login), set "
                                  "HF_TOKEN, or pass --token")
    res = _push_cli(folder, tmp_path, HF_TOKEN="hf_test_token", HF_HUB_OFFLINE="1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "error: HF_HUB_OFFLINE is set: pushing needs the network; unset it"
    assert json.loads((folder / "codebook_model.json").read_text())["format"]


def test_a_pushed_folder_loads_back_by_its_hub_id(tmp_path, fake_hub, monkeypatch, capsys):
    """Push (captured), lay the upload out as the hub cache would hold it, load it by hub id
    offline: the same model. ``eval`` of a hub id needs --out (the cache is not written)."""
    import shutil

    import huggingface_hub.constants as C

    model = make_model()
    folder = tmp_path / "run"
    model.base_model.save_pretrained(folder)
    model.save_codebooks(folder, base_model_name=".")  # the base beside the codebooks
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None and "# Codebook features for a finetuned gpt_neox" in \
        card.text and "is saved in this folder" in card.text
    push_to_hub(folder, "me/round-trip")
    snap = tmp_path / "hub" / "models--me--round-trip" / "snapshots" / ("c" * 40)
    shutil.copytree(fake_hub[1][1]["folder_path"], snap, ignore=shutil.ignore_patterns(".*"))
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = CodebookModel.from_pretrained("me/round-trip")
    ids = tokens(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    capsys.readouterr()
    assert main(["eval", "me/round-trip", "any-config.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: codebook folder me/round-trip not found") and "--out" in err
