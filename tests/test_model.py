"""CodebookModel and sites on tiny random Hugging Face models of every supported family."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model, tiny_unsupported, tokens

from codebook_features import CodebookError, CodebookLayer
from codebook_features.io import read_safetensors
from codebook_features.model import CONFIG_NAME, WEIGHTS_NAME, CodebookModel, CodebookModelConfig
from codebook_features.sites import PLACEMENTS, find_sites

ALL = list(PLACEMENTS)


def _build(arch: str, **kw) -> tuple[torch.nn.Module, CodebookModel]:
    base = tiny_model(arch)
    kw = {"placements": ALL, "num_codes": 16, "k": 2, **kw}
    return base, CodebookModel(base, **kw)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture(arch: str) -> None:
    ids = tokens(2, 8)
    base = tiny_model(arch)
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    model = CodebookModel(base, placements=ALL, num_codes=16, k=2)
    assert len(model.site_names) == len(ALL) * 2

    # Disabled: exactly the base model.
    with torch.no_grad(), model.codebooks_disabled():
        assert torch.equal(model(input_ids=ids).logits, ref)

    # Enabled: same shapes, other logits, codes at every site.
    model.train()
    out = model(input_ids=ids).logits
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    codes = model.codes()
    assert set(codes) == set(model.site_names)
    heads = base.config.num_attention_heads
    for name, c in codes.items():
        groups = heads if name.endswith("attn_heads") else 1
        assert c.shape == (2, 8, groups, 2) and c.dtype == torch.long, name
        assert int(c.min()) >= 0 and int(c.max()) < 16

    # Gradients reach every codebook and the base weights.
    out.logsumexp(-1).mean().backward()
    for name, layer in model.sites.items():
        assert layer.codebook.grad is not None and layer.codebook.grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.base_parameters())

    # Logging loss: detached, positive, the sum of lambda * MSE.
    loss = model.codebook_loss()
    want = sum(layer.config.mse_coeff * float(layer.last_mse) for layer in model.sites.values())
    assert not loss.requires_grad and float(loss) == pytest.approx(want, rel=1e-6) and want > 0

    # Generation with the codebooks on; codes then come from the last (one-token) step.
    model.eval()
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, 11)
    assert model.codes()[f"layers.0.{ALL[0]}"].shape[:2] == (2, 1)

    # Removing the hooks gives back the untouched base model.
    with torch.no_grad():
        assert torch.equal(model.remove_hooks()(input_ids=ids).logits, ref)


def test_frozen_base_gets_no_gradients() -> None:
    _, model = _build("gpt_neox", placements=["attn_heads"])
    model.freeze_base()
    model(input_ids=tokens()).logits.sum().backward()
    assert all(p.grad is None for p in model.base_parameters())
    assert all(p.grad is not None for p in model.codebook_parameters() if p.requires_grad)
    model.unfreeze_base()
    assert all(p.requires_grad for p in model.base_parameters())


def test_layer_subset_and_groups() -> None:
    base = tiny_model("llama")
    model = CodebookModel(base, placements="mlp_hidden", layers=[-1], num_codes=8, groups=4,
                          overrides={"mlp_hidden": {"k": 3}})
    assert model.site_names == ["layers.1.mlp_hidden"]
    layer = model.site("layers.1.mlp_hidden")
    assert isinstance(layer, CodebookLayer)
    assert (layer.config.dim, layer.config.groups, layer.config.k) == (64, 4, 3)
    model(input_ids=tokens())
    assert model.codes()["layers.1.mlp_hidden"].shape == (2, 8, 4, 3)


def test_interventions_through_sites() -> None:
    ids = tokens(1, 6)
    _, model = _build("gpt2", placements=["attn_heads"])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        layer = model.site("layers.0.attn_heads")
        layer.replace_code(5, slot=0, group=1)
        steered = model(input_ids=ids).logits
        assert (model.codes()["layers.0.attn_heads"][..., 1, 0] == 5).all()
        assert not torch.allclose(steered, ref)
        model.clear_interventions()
        assert torch.equal(model(input_ids=ids).logits, ref)
        layer.bypass = True  # one site bypassed, the other still snaps
        part = model(input_ids=ids).logits
        assert not torch.equal(part, ref)
        model.clear_interventions()


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "opt"])
def test_save_load_roundtrip(arch: str, tmp_path) -> None:
    ids = tokens()
    base, model = _build(arch, overrides={"layers.1.residual": {"k": 1}})
    model.train()
    model(input_ids=ids).logits.sum().backward()  # move statistics off their initial values
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    base.save_pretrained(tmp_path / "base")
    model.save_codebooks(tmp_path / "cb", base_model_name=str(tmp_path / "base"))
    meta = json.loads((tmp_path / "cb" / CONFIG_NAME).read_text())
    assert meta["base_model"]["model_type"] == arch
    saved = read_safetensors(tmp_path / "cb" / WEIGHTS_NAME)  # the codebooks alone
    assert all(any(k.startswith(f"{s}.") for s in model.site_names) for k in saved)

    loaded = CodebookModel.from_pretrained(tmp_path / "cb")  # base from the recorded folder
    assert loaded.site("layers.1.residual").config.k == 1
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)
    for name in model.site_names:
        a, b = model.site(name).state_dict(), loaded.site(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)

    again = CodebookModel.from_pretrained(tmp_path / "cb", base_model=tiny_model(arch))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ref)


def test_load_refuses_mismatched_base(tmp_path) -> None:
    _, model = _build("gpt_neox", placements=["attn_heads"])
    model.save_codebooks(tmp_path / "cb")
    with pytest.raises(CodebookError, match="model type gpt_neox"):
        CodebookModel.from_pretrained(tmp_path / "cb", base_model=tiny_model("llama"))
    with pytest.raises(CodebookError, match="no base model name was recorded"):
        CodebookModel.from_pretrained(tmp_path / "cb")
    with pytest.raises(CodebookError, match="not found"):
        CodebookModel.from_pretrained(tmp_path / "cb", base_model=str(tmp_path / "nope"))
    with pytest.raises(CodebookError, match="cannot load base model 'no-such-org/no-such"):
        CodebookModel.from_pretrained(tmp_path / "cb", base_model="no-such-org/no-such-model",
                                      local_files_only=True)
    (tmp_path / "cb" / CONFIG_NAME).write_text("{")
    with pytest.raises(CodebookError, match="not valid JSON"):
        CodebookModel.from_pretrained(tmp_path / "cb", base_model=tiny_model("gpt_neox"))


@pytest.mark.parametrize("kwargs, match", [
    ({"placements": ["attn_head"]}, "unknown placement 'attn_head'"),
    ({"placements": []}, "no placements"),
    ({"layers": [2]}, "layer 2 out of range"),
    ({"layers": [-3]}, "layer -3 out of range"),
    ({"num_codes": 4, "k": 5}, "k=5 must be between 1 and num_codes=4"),
    ({"groups": 3}, "groups=3 do not divide"),
    ({"similarity": "l1"}, "unknown similarity"),
    ({"overrides": {"attn_heads": {"kk": 1}}}, "unknown codebook setting"),
])
def test_bad_input(kwargs, match) -> None:
    kw = {"placements": ["attn_heads"], "num_codes": 8, **kwargs}
    with pytest.raises(CodebookError, match=match) as err:
        CodebookModel(tiny_model("gpt2"), **kw)
    assert "\n" not in str(err.value)


def test_bad_use() -> None:
    _, model = _build("gpt2", placements=["attn_out"])
    with pytest.raises(CodebookError, match="no codes yet"):
        model.codes()
    with pytest.raises(CodebookError, match="no codebook loss yet"):
        model.codebook_loss()
    with pytest.raises(CodebookError, match="no codebook at site 'layers.0.attn_heads'"):
        model.site("layers.0.attn_heads")
    with pytest.raises(CodebookError, match="unknown codebook model config keys"):
        CodebookModelConfig.from_dict({"placement": ["attn_out"]})


def test_unsupported_model() -> None:
    mamba = tiny_unsupported()
    with pytest.raises(CodebookError) as err:
        CodebookModel(mamba, placements=["attn_heads", "mlp_out", "residual"], num_codes=8)
    msg = str(err.value)
    assert msg.startswith("mamba:") and "attn_heads" in msg and "mlp_out" in msg
    assert "residual" not in msg.split(";")[0] and "\n" not in msg
    # The block output exists in any model with a list of blocks.
    model = CodebookModel(mamba, placements=["residual"], num_codes=8)
    model(input_ids=tokens())
    assert model.codes()["layers.0.residual"].shape == (2, 8, 1, 1)


def test_unsupported_module_without_blocks() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(CodebookError, match="Sequential: could not find attn_heads"):
        find_sites(net, ["attn_heads"])


def test_transformer_lens() -> None:
    """TransformerLens (optional): HookedTransformer (< 4.0) or TransformerBridge (>= 4.0)."""
    tl = pytest.importorskip("transformer_lens")
    ids = tokens(2, 8)
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        import tempfile

        hf = tiny_model("gpt2")
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            net = tl.TransformerBridge.boot_transformers(d, hf_model=hf, tokenizer=None)
    else:
        cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4,
                                      d_mlp=64, d_vocab=100, act_fn="gelu")
        net = HookedTransformer(cfg).eval()
    with torch.no_grad():
        ref = net(ids)
    model = CodebookModel(net, placements=ALL, num_codes=16, k=2)
    assert model.site_specs["layers.0.attn_heads"].module == "blocks.0.attn.hook_z"
    out = model(ids)
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    assert model.codes()["layers.1.attn_heads"].shape == (2, 8, 4, 2)
    with torch.no_grad(), model.codebooks_disabled():
        assert torch.equal(model(ids), ref)


def test_format1_codebooks_behave_as_before():
    """Codebooks saved before format 2 (whole-width LayerNorm, lambda as a per-element mean)
    give the logits and gradients that version computed (tests/fixtures/format1, written by
    scripts/make_format1_fixture.py with that version's code)."""
    from pathlib import Path

    from safetensors.torch import load_file

    fx = Path(__file__).parent / "fixtures" / "format1"
    model = CodebookModel.from_pretrained(fx / "codebooks", base_model=fx / "base",
                                          attn_implementation="eager")
    for layer in model.sites.values():
        assert (layer.config.layernorm_scope, layer.config.mse_reduction) == ("site", "mean")
    ref = load_file(fx / "reference.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ref["input_ids"]).logits, ref["logits"],
                                   rtol=0, atol=1e-6)
    model.train()
    model(input_ids=ref["input_ids"], labels=ref["input_ids"]).loss.backward()
    for name, layer in model.sites.items():
        torch.testing.assert_close(layer.codebook.grad, ref[f"grad.{name}.codebook"])
        torch.testing.assert_close(layer.ln.weight.grad, ref[f"grad.{name}.ln.weight"])
    # saved again, it is format 2 and still the same model
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model.save_codebooks(d, base_model_name=str(fx / "base"))
        again = CodebookModel.from_pretrained(d, attn_implementation="eager").eval()
        assert all(layer.config.layernorm_scope == "site" for layer in again.sites.values())
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ref["input_ids"]).logits, ref["logits"],
                                       rtol=0, atol=1e-6)
