"""``codebook-features compare``: a codebook site against a TopK SAE (sparsify), end to end on a
tiny story model, its figures checked against plain recomputations."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sparsify = pytest.importorskip("sparsify")

from tiny_models import story_codebooks  # noqa: E402

from codebook_features.cli import main  # noqa: E402
from codebook_features.compare import best_unit, load_data  # noqa: E402
from codebook_features.experiments.stories import topic_regex  # noqa: E402
from codebook_features.sae import SaeSite, record_site  # noqa: E402
from codebook_features.training.config import load_config  # noqa: E402

SITE = "layers.0.attn_heads"
ARGS = ["--site", SITE, "--steps", "30", "--batch-tokens", "256", "--max-train-tokens", "4096",
        "--max-docs", "60",
        "--topics", "dragon,flower", "--codes-per-topic", "2", "--samples-per-prompt", "2",
        "--gen-tokens", "8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    corpus, tok, model = story_codebooks(d, num_stories=200, seed=0)
    cfg = d / "cfg.yaml"
    cfg.write_text(f"model: {d / 'model'}\ndata:\n  files: [{corpus}]\n  seq_len: 64\n")
    out = d / "out"
    assert main(["compare", str(d / "cb"), str(cfg), "--out", str(out), *ARGS]) == 0
    return d, cfg, out, tok, model, json.loads((out / "report.json").read_text())


def _dense(model):
    """The module whose input is the attention-heads site (GPT-NeoX's o_proj)."""
    return model.base_model.gpt_neox.layers[0].attention.dense


def test_report_files_and_matched_sizes(run):
    d, cfg, out, tok, model, r = run
    assert (out / "report.html").read_text().count("<table>") == 4
    assert "TopK SAE (sparsify)" in (out / "report.md").read_text()
    layer = model.site(SITE)
    c = layer.config
    sae = sparsify.SparseCoder.load_from_disk(out / "sae")
    assert (sae.num_latents, sae.cfg.k) == (c.groups * c.num_codes, c.groups * c.k) == (64, 4)
    assert r["sizes"]["sae_latents"] == 64 and r["sizes"]["l0"] == 4
    for name in ("codebook", "codebook_fresh", "sae"):
        assert r["standard"][name]["l0"] == pytest.approx(4.0)
    for name in ("codebook", "sae"):
        assert r["training_cost"][name]["seconds"] > 0
    rows = {row["topic"]: row for row in r["steering"]["sae"]["rows"]}
    assert set(rows) == {"dragon", "flower"} and rows["dragon"]["samples"] == 4 * 2


def test_sae_standard_evaluation_against_naive_splice(run):
    """CE loss and FVU of the SAE spliced in by a plain pre-hook on o_proj."""
    d, cfg, out, tok, model, r = run
    sae = sparsify.SparseCoder.load_from_disk(out / "sae")
    _, eval_rows, _ = load_data(load_config(cfg).data, tok, 60)
    ids = torch.tensor(eval_rows["input_ids"])
    labels = torch.tensor(eval_rows["labels"])
    xs, ys = [], []

    def splice(_m, args):
        x = args[0]
        y = sae(x.reshape(-1, x.shape[-1])).sae_out.reshape(x.shape)
        xs.append(x.reshape(-1, x.shape[-1]))
        ys.append(y.reshape(-1, x.shape[-1]))
        return (y,)

    model.disable_codebooks()
    h = _dense(model).register_forward_pre_hook(splice)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        h.remove()
        model.enable_codebooks()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                         labels[:, 1:].reshape(-1), ignore_index=-100)
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    fvu = float((y - x).square().sum() / (x - x.mean(0)).square().sum())
    got = r["standard"]["sae"]
    assert got["ce_loss"] == pytest.approx(float(ce), rel=1e-4)
    assert got["fvu"] == pytest.approx(fvu, rel=1e-4)


def test_best_code_against_brute_force(run):
    """The reported best code of a topic: positives from characters, counts by hand."""
    d, cfg, out, tok, model, r = run
    _, _, texts = load_data(load_config(cfg).data, tok, 60)
    layer = model.site(SITE)
    c = layer.config
    rx = topic_regex("flower")
    fired, hits, positives = Counter(), Counter(), 0
    for text in texts:
        enc = tok(text, truncation=True, max_length=64, return_offsets_mapping=True)
        seen: list[torch.Tensor] = []
        h = _dense(model).register_forward_pre_hook(lambda _m, a, seen=seen: seen.append(a[0]))
        model.disable_codebooks()
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([enc["input_ids"]]))
        finally:
            h.remove()
            model.enable_codebooks()
        layer(seen[0])
        codes = layer.last_codes[0]  # (T, G, K)
        spans = [m.span() for m in rx.finditer(text)]
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            pos = any(s < me and ms < e for ms, me in spans) and s < e
            positives += pos
            for g in range(c.groups):
                for code in codes[t, g].tolist():
                    fired[g, code] += 1
                    hits[g, code] += pos
    best = max((hits[u] / fired[u], hits[u] / positives, -u[0], -u[1]) for u in fired
                if hits[u] / positives > 0.01)
    got = r["interpretability"]["topics"]["flower"]
    assert got["positives"] == positives
    assert (got["code"]["precision"], got["code"]["recall"]) == pytest.approx(best[:2])
    assert (got["code"]["group"], got["code"]["code"]) == (-best[2], -best[3])


def test_best_unit_ignores_silent_slots_and_low_recall():
    ids = np.array([[0, 1], [0, 2], [1, 2], [3, 0]])
    on = np.array([[True, False], [True, True], [True, True], [True, True]])
    pos = np.array([True, True, False, False])
    # unit 0 fires on tokens 0, 1, 3 (2 hits); unit 1 only counts on token 2 (0 hits);
    # unit 2: tokens 1, 2 (1 hit)
    b = best_unit(ids, on, pos, 4)
    assert b == {"unit": 0, "precision": 2 / 3, "recall": 1.0, "fired": 3, "hits": 2}
    assert best_unit(ids, on, pos, 4, min_recall=1.0) is None


def test_record_site_is_the_o_proj_input(run):
    d, cfg, out, tok, model, r = run
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    seen = []
    h = _dense(model).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    model.disable_codebooks()
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        h.remove()
        model.enable_codebooks()
    got = record_site(model, SITE, [{"input_ids": ids}])
    torch.testing.assert_close(got, seen[0].reshape(-1, seen[0].shape[-1]))
    assert model.enabled and not any(ly.bypass for ly in model.sites.values())


def test_sae_site_steering_against_naive_decode():
    torch.manual_seed(0)
    sae = sparsify.SparseCoder(8, sparsify.SaeConfig(num_latents=16, k=3))
    values = torch.rand(16) + 0.5
    site = SaeSite(sae, "s", steer_values=values)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(site(x), sae(x.reshape(-1, 8)).sae_out.reshape(x.shape))
        site.replace_code(7, positions=[1, 3])
        y = site(x)
    pre = F.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    want = torch.empty_like(x)
    for b in range(2):
        for t in range(5):
            a, i = pre[b, t].topk(3)
            acts = dict(zip(i.tolist(), a.tolist(), strict=True))
            if t in (1, 3):
                acts.pop(7, None)
                weakest = min(acts, key=acts.get) if len(acts) == 3 else None
                acts.pop(weakest, None)
                acts[7] = float(values[7])
            want[b, t] = sae.b_dec + sum(v * sae.W_dec[j] for j, v in acts.items())
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert site.last_codes[0, 1, 0, -1] == 7


def test_rerun_reuses_the_trained_dictionaries(run, capsys):
    d, cfg, out, tok, model, r = run
    capsys.readouterr()
    light = ARGS[:-7] + ["dragon", "--codes-per-topic", "1", "--samples-per-prompt", "1",
                         "--gen-tokens", "2"]  # the same training settings, less steering
    assert main(["compare", str(d / "cb"), str(cfg), "--out", str(out), *light]) == 0
    text = capsys.readouterr().out
    assert "reusing the SAE" in text and "reusing the codebook" in text
    again = json.loads((out / "report.json").read_text())
    assert again["training_cost"] == r["training_cost"]
    assert again["standard"]["sae"] == pytest.approx(r["standard"]["sae"])


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert err.startswith("error: ")
    return err


def test_bad_input(run, capsys, monkeypatch, tmp_path):
    d, cfg, out, tok, model, r = run
    base = ["compare", str(d / "cb"), str(cfg), "--out", str(tmp_path / "o")]
    err = _one_line_error(capsys, base + ["--site", "layers.5.attn_heads"])
    assert "no codebook at site 'layers.5.attn_heads'" in err
    small = tmp_path / "small"
    sparsify.SparseCoder(32, sparsify.SaeConfig(num_latents=48, k=4)).save_to_disk(small)
    err = _one_line_error(capsys, base + ["--site", SITE, "--sae", str(small)])
    assert "SAE sizes do not match" in err and "48 latents" in err
    monkeypatch.setitem(sys.modules, "sparsify", None)
    err = _one_line_error(capsys, base + ["--site", SITE])
    assert "codebook-features[sae]" in err
    assert re.search(r"not installed", err)
