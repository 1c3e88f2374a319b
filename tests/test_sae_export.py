"""Codebook sites exported in SAELens' on-disk format: read back by a naive loader written here
(SAELens itself cannot be installed beside the project's pins: see sae_export's docstring), the
same codes and outputs as the codebook layer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import tiny_model

from codebook_features.cli import main
from codebook_features.model import CodebookModel
from codebook_features.sae_export import CodebookSAE, export_site


def _naive_load(folder):
    cfg = json.loads((folder / "cfg.json").read_text())
    with safe_open(str(folder / "sae_weights.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k).double() for k in f.keys()}  # noqa: SIM118
    return cfg, tensors


def _naive_encode(cfg, t, x):
    """LayerNorm by its formula, scores, top-k per group, slot weights: (N, d_sae)."""
    x = x.double()
    if cfg["layernorm"] is not None:
        g = cfg["groups"] if cfg["layernorm"] == "group" else 1
        parts = []
        for p in x.chunk(g, dim=-1):
            mu = p.mean(-1, keepdim=True)
            var = ((p - mu) ** 2).mean(-1, keepdim=True)
            parts.append((p - mu) / torch.sqrt(var + cfg["layernorm_eps"]))
        x = torch.cat(parts, -1) * t["ln_weight"] + t["ln_bias"]
    scores = x @ t["W_enc"] + t["b_enc"]
    acts = torch.zeros_like(scores)
    n = cfg["num_codes"]
    for row in range(x.shape[0]):
        for g in range(cfg["groups"]):
            s = scores[row, g * n:(g + 1) * n]
            for c in sorted(range(n), key=lambda c: -float(s[c]))[:cfg["k"]]:
                acts[row, g * n + c] = cfg["slot_weight"]
    return acts


@pytest.mark.parametrize("settings", [
    dict(),  # cosine, mean, per-group LayerNorm
    dict(similarity="euclidean", combine="sum", layernorm_scope="site"),
    dict(similarity="inner", layernorm=False),
])
def test_round_trip_gives_the_codes_and_outputs(tmp_path, settings):
    model = CodebookModel(tiny_model("gpt_neox"), placements=["attn_heads", "mlp_out"],
                          num_codes=16, k=2, **settings).eval()
    torch.manual_seed(1)
    for layer in model.sites.values():  # not the identity affine
        if layer.ln is not None:
            layer.ln.weight.data.uniform_(0.5, 1.5)
            layer.ln.bias.data.normal_(0, 0.1)
    for site in ("layers.0.attn_heads", "layers.1.mlp_out"):
        layer = model.site(site)
        folder = export_site(model, site, tmp_path / site)
        cfg, t = _naive_load(folder)
        c = layer.config
        assert (cfg["d_in"], cfg["d_sae"], cfg["architecture"]) == \
            (c.dim, c.groups * c.num_codes, "codebook")
        assert tuple(t["W_enc"].shape) == (c.dim, cfg["d_sae"])
        assert tuple(t["W_dec"].shape) == (cfg["d_sae"], c.dim)
        x = torch.randn(40, c.dim)
        with torch.no_grad():
            y = layer(x)
        codes = layer.last_codes  # (N, G, k)
        acts = _naive_encode(cfg, t, x)
        want = torch.zeros_like(acts, dtype=torch.bool)
        flat = codes + torch.arange(c.groups).view(1, -1, 1) * c.num_codes
        want.scatter_(1, flat.reshape(len(x), -1), True)
        assert torch.equal(acts != 0, want)
        torch.testing.assert_close((acts @ t["W_dec"] + t["b_dec"]).float(), y,
                                   atol=1e-5, rtol=1e-5)
        sae = CodebookSAE.load_from_disk(folder)
        torch.testing.assert_close(sae.encode(x).double(), acts)
        torch.testing.assert_close(sae(x), y, atol=1e-5, rtol=1e-5)


def test_export_command_and_metadata(tmp_path, capsys):
    base = tiny_model("gpt_neox")
    base.save_pretrained(tmp_path / "base")
    model = CodebookModel(base, placements=["attn_heads"], num_codes=8, k=1)
    model.save_codebooks(tmp_path / "cb", base_model_name=str(tmp_path / "base"))
    assert main(["export-sae", str(tmp_path / "cb"), str(tmp_path / "out")]) == 0
    cfg = json.loads((tmp_path / "out" / "layers_1_attn_heads" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.attn.hook_z"
    assert cfg["reshape_activations"] == "hook_z"
    assert cfg["metadata"]["model_name"] == str(tmp_path / "base")
    capsys.readouterr()
    assert main(["export-sae", str(tmp_path / "cb"), str(tmp_path / "o2"),
                 "--site", "layers.7.mlp_out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no codebook at site 'layers.7.mlp_out'")
    assert not (tmp_path / "o2" / "sites.json").exists()
