"""Parity with the authors' own package (PyPI codebook-features 0.1.2), through fixtures that
their code wrote (scripts/authors/make_fixtures.py): their checkpoints load with the same codes
on every token and the same logits, and a CodebookModel on the same weights reproduces their
training loss and gradients with the paper's lambda."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from codebook_features import CodebookModel
from codebook_features.errors import CodebookError

FIXTURES = Path(__file__).parent / "fixtures" / "authors"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())

# The test's own reading of their module layout: (family, module path in a layer) -> their
# codebook_at, and their codebook_at -> our placement (DESIGN section 2b).
THEIR_MODULES = {("gpt_neox", "attention."): ("attn_preproj", "attn"), ("gpt_neox", "mlp."): "mlp",
                 ("gpt_neox", "mlp.act."): "mlp_mid", ("gpt_neox", ""): "transformer_block",
                 ("gpt2", "attn."): ("attn_preproj", "attn"), ("gpt2", "mlp."): "mlp",
                 ("gpt2", "mlp.act."): "mlp_mid", ("gpt2", ""): "transformer_block",
                 ("gpt_neo", "attn.attention."): ("attn_preproj", "attn"),
                 ("gpt_neo", "mlp."): "mlp", ("gpt_neo", "mlp.act."): "mlp_mid",
                 ("gpt_neo", ""): "transformer_block"}
OURS = {"attn_preproj": "attn_heads", "attn": "attn_out", "mlp": "mlp_out",
        "mlp_mid": "mlp_hidden", "transformer_block": "residual"}


def _base(case: str) -> torch.nn.Module:
    cfg = json.loads((FIXTURES / case / "base_config.json").read_text())
    return T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(**cfg),
                                              attn_implementation="eager")


def _load(case: str) -> tuple[CodebookModel, dict[str, torch.Tensor], dict]:
    model = CodebookModel.from_pretrained(FIXTURES / case / "checkpoint", base_model=_base(case))
    ref = load_file(FIXTURES / case / "reference.safetensors")
    their = json.loads((FIXTURES / case / "checkpoint" / "config.json").read_text())
    return model, ref, their


def _site(model: CodebookModel, their: dict, key: str) -> tuple[str, int]:
    """Our site and group of their codes key ``layer{i}_{at}[_gcb{g}]``."""
    m = re.fullmatch(r"layer(\d+)_(.+?)(?:_gcb(\d+))?", key)
    return f"layers.{m.group(1)}.{OURS[m.group(2)]}", int(m.group(3) or 0)


@pytest.mark.parametrize("case", CASES)
def test_their_checkpoint_gives_their_codes_and_logits(case):
    model, ref, their = _load(case)
    assert not model.training
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)
    codes = model.codes()
    keys = [k for k in ref if k.startswith("codes.")]
    assert len(keys) == sum(layer.config.groups for layer in model.sites.values())
    for key in keys:
        site, group = _site(model, their, key[len("codes."):])
        ours = codes[site][:, :, group]
        # the same codes on every token (their top-k order is by score, as ours)
        assert torch.equal(ours.sort(-1).values, ref[key].sort(-1).values), key


def _their_param(model: CodebookModel, name: str) -> torch.Tensor | None:
    """Our gradient for their parameter ``name`` (None when it is not a codebook's)."""
    name = name.removeprefix("model.").replace("module_layer.", "")
    if "codebook_layer." not in name:
        params = dict(model.base_model.named_parameters())
        return params.get(name, params.get(name.replace("embed_out.", "lm_head."))).grad
    family = model.base_model.config.model_type
    m = re.fullmatch(r"(?:gpt_neox\.layers|transformer\.h)\.(\d+)\.(.*)codebook_layer\.(.+)",
                     name)
    layer, where, rest = int(m.group(1)), m.group(2), m.group(3)
    at = THEIR_MODULES[(family, where)]
    placements = {OURS[a] for a in ((at,) if isinstance(at, str) else at)}
    site = next(s for s in model.sites if s.startswith(f"layers.{layer}.")
                and s.split(".")[-1] in placements)
    cb = model.site(site)
    g_match = re.fullmatch(r"codebook\.(\d+)\.(.+)", rest)
    g, leaf = (int(g_match.group(1)), g_match.group(2)) if g_match else (0, rest)
    dg = cb.config.group_dim
    if leaf == "codebook.weight":
        return cb.codebook.grad[g]
    return getattr(cb.ln, leaf.split(".")[1]).grad[g * dg:(g + 1) * dg] if g_match else \
        getattr(cb.ln, leaf.split(".")[1]).grad


@pytest.mark.parametrize("case", CASES)
def test_training_loss_and_gradients_match_theirs(case):
    """Their training-mode loss and the gradients it gives: every codebook, every codebook
    LayerNorm (through the straight-through and commitment terms), the input embedding."""
    model, ref, their = _load(case)
    model.train()
    loss = model(input_ids=ref["input_ids"], labels=ref["input_ids"]).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref["loss"], rtol=1e-6, atol=1e-6)
    grads = [k for k in ref if k.startswith("grad.")]
    assert any("codebook.weight" in k for k in grads) and any("ln.weight" in k for k in grads)
    for key in grads:
        ours = _their_param(model, key[len("grad."):])
        assert ours is not None, key
        # float rounding, relative to the gradient's scale (the commitment term makes some
        # thousands)
        scale = max(1.0, float(ref[key].abs().max()))
        torch.testing.assert_close(ours, ref[key], rtol=1e-4, atol=2e-6 * scale, msg=key)


def test_lambda_is_the_papers():
    """mse_coeff = 1 is their aeloss: a model whose codebooks get the reconstruction term at
    a per-element mean (the old meaning) gives other codebook gradients."""
    model, ref, _ = _load("neox_heads_mlp_k1")
    for layer in model.sites.values():
        assert layer.config.mse_coeff == 1.0 and layer.config.mse_reduction == "sum"
        layer.config.mse_reduction = "mean"
    model.train()
    model(input_ids=ref["input_ids"], labels=ref["input_ids"]).loss.backward()
    key = "grad.model.gpt_neox.layers.0.mlp.codebook_layer.codebook.weight"
    assert not torch.allclose(_their_param(model, key[5:]), ref[key], rtol=1e-3, atol=1e-5)


def test_settings_map_of_their_losses():
    from codebook_features.authors import loss_settings

    assert loss_settings("base")["mse_coeff"] == 0.0
    assert loss_settings("aeloss") == {"mse_reduction": "sum", "mse_coeff": 1.0}
    assert loss_settings("fullaeloss")["commitment_coeff"] == 0.25
    assert loss_settings("fullaeloss-0.5")["commitment_coeff"] == 0.5
    assert loss_settings("vqvae-0.1") == {"mse_reduction": "sum", "mse_coeff": 1.0,
                                          "commitment_coeff": 0.1, "codes_lm_grad": False}
    with pytest.raises(CodebookError, match="no counterpart"):
        loss_settings("contrastive")


def _copy(case: str, tmp_path: Path) -> Path:
    dst = tmp_path / case
    shutil.copytree(FIXTURES / case / "checkpoint", dst)
    return dst


def test_their_checkpoint_loads_by_hub_id_offline(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache (laid out here), offline."""
    import huggingface_hub.constants as C

    cache = tmp_path / "hub"
    snap = cache / "models--taufeeque--TokFSM_k1_codebook_model" / "snapshots" / ("a" * 40)
    shutil.copytree(FIXTURES / "neox_heads_mlp_k1" / "checkpoint", snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = CodebookModel.from_pretrained("taufeeque/TokFSM_k1_codebook_model",
                                          base_model=_base("neox_heads_mlp_k1"))
    ref = load_file(FIXTURES / "neox_heads_mlp_k1" / "reference.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ref["input_ids"]).logits, ref["logits"],
                                   rtol=0, atol=1e-5)
    with pytest.raises(CodebookError, match="not in the hub cache while offline"):
        CodebookModel.from_pretrained("taufeeque/not_cached_here")


@pytest.mark.parametrize("damage, match", [
    ("truncate", "truncated or corrupt"),
    ("pickle", "truncated or corrupt|more than tensors"),
    ("no_weights", "no model.safetensors or pytorch_model.bin"),
    ("qkv", "no counterpart here.*qkv"),
    ("neither", "neither codebooks saved by this library"),
])
def test_bad_checkpoints_give_one_line(tmp_path, damage, match):
    src = _copy("neox_heads_mlp_k1", tmp_path)
    weights = src / "pytorch_model.bin"
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "pickle":  # a pickle that would run code when loaded without weights_only
        import pickle

        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))

        weights.write_bytes(pickle.dumps(Evil()))
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "qkv":
        cfg = json.loads((src / "config.json").read_text())
        cfg["codebook_at"] = ["qkv", "mlp"]
        (src / "config.json").write_text(json.dumps(cfg))
    elif damage == "neither":
        (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CodebookError, match=match) as e:
        CodebookModel.from_pretrained(src, base_model=_base("neox_heads_mlp_k1"))
    assert "\n" not in str(e.value)


def test_safetensors_checkpoint_truncated(tmp_path):
    src = _copy("neox_heads_mlp_k4", tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CodebookError, match="truncated or corrupt"):
        CodebookModel.from_pretrained(src, base_model=_base("neox_heads_mlp_k4"))


@pytest.mark.parametrize("change, match", [
    ({"num_hidden_layers": 3}, "does not fit the checkpoint"),
    ({"hidden_size": 48}, "has shape"),
])
def test_base_model_that_does_not_fit(change, match):
    cfg = json.loads((FIXTURES / "neox_heads_mlp_k1" / "base_config.json").read_text())
    base = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(**{**cfg, **change}))
    with pytest.raises(CodebookError, match=match):
        CodebookModel.from_pretrained(FIXTURES / "neox_heads_mlp_k1" / "checkpoint",
                                      base_model=base)


def test_unsupported_family_and_missing_base(tmp_path):
    from tiny_models import tiny_model

    with pytest.raises(CodebookError, match="GPT-2, GPT-Neo and GPT-NeoX"):
        CodebookModel.from_pretrained(FIXTURES / "neox_heads_mlp_k1" / "checkpoint",
                                      base_model=tiny_model("llama"))
    with pytest.raises(CodebookError, match="does not name its base model"):
        CodebookModel.from_pretrained(_copy("neox_heads_mlp_k1", tmp_path))


def test_convert_writes_our_format_and_reopens(tmp_path):
    """`convert` writes codebooks plus the finetuned base; the folder opens alone and gives
    their logits and codes; a second run is refused and writes nothing."""
    from codebook_features.cli import main
    from codebook_features.convert import convert

    base_dir = tmp_path / "base"
    _base("gpt2_heads_mlp_k4").save_pretrained(base_dir)
    out = tmp_path / "out"
    assert main(["convert", str(FIXTURES / "gpt2_heads_mlp_k4" / "checkpoint"), str(out),
                 "--base", str(base_dir)]) == 0
    assert {"config.json", "model.safetensors", "codebook_model.json",
            "codebooks.safetensors"} <= {p.name for p in out.iterdir()}
    model = CodebookModel.from_pretrained(out).eval()
    ref = load_file(FIXTURES / "gpt2_heads_mlp_k4" / "reference.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ref["input_ids"]).logits, ref["logits"],
                                   rtol=0, atol=1e-5)
    with pytest.raises(CodebookError, match="already holds converted codebooks"):
        convert(FIXTURES / "gpt2_heads_mlp_k4" / "checkpoint", out, base=str(base_dir))
    bad = tmp_path / "bad"
    with pytest.raises(CodebookError, match="does not fit the checkpoint"):
        convert(FIXTURES / "neox_heads_mlp_k1" / "checkpoint", bad,
                base=T.AutoConfig.for_model(**{**json.loads(
                    (FIXTURES / "neox_heads_mlp_k1" / "base_config.json").read_text()),
                    "num_hidden_layers": 1}))
    assert not bad.exists() and not list(tmp_path.glob(".bad.*"))


def test_readme_released_model_block(tmp_path, monkeypatch):
    """The README's example that opens a released model by hub id runs offline: each id it
    names is laid out in a hub cache with a fixture their code wrote, whose base config stands
    in for the released model's."""
    import huggingface_hub.constants as C
    from test_readme import BLOCKS, run_block

    from codebook_features import authors

    blocks = [b for b in BLOCKS if "taufeeque/" in b]
    assert blocks
    cache = tmp_path / "hub"
    for repo in sorted({m for b in blocks for m in re.findall(r'"(taufeeque/[\w.-]+)"', b)}):
        snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("b" * 40)
        shutil.copytree(FIXTURES / "neox_heads_mlp_k1" / "checkpoint", snap)
        (snap.parents[1] / "refs").mkdir()
        (snap.parents[1] / "refs" / "main").write_text("b" * 40)
        monkeypatch.setitem(authors.RELEASED_BASES, repo, json.loads(
            (FIXTURES / "neox_heads_mlp_k1" / "base_config.json").read_text()))
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for block in blocks:
        run_block(block, tmp_path, monkeypatch)
