"""Every placement of every architecture family hooks the activation the paper means.

The module names here are written by hand from each ``transformers`` model's own module
tree, not imported from ``sites.py``; the test captures the activation with hooks of its
own and compares it with what the codebook layer receives (read) and with what the model
then computes with (write). Independently of module names, the captured tensors must also
fit together the way the architecture says: the attention output projection applied to
``attn_heads`` gives ``attn_out``, the MLP's down projection applied to ``mlp_hidden`` gives
``mlp_out``, and ``residual`` of layer 0 is the model's own ``hidden_states[1]``.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from tiny_models import CONFIGS, HEADS, HIDDEN, LAYERS, tokens
from torch import nn

from codebook_features.model import CodebookModel
from codebook_features.sites import FAMILIES, PLACEMENTS

# (blocks, attention module, its output projection, MLP output module, MLP down projection),
# the last four relative to one block. OPT has no MLP module: its MLP output is fc2's.
NAMES = {
    "gpt2": ("transformer.h", "attn", "attn.c_proj", "mlp", "mlp.c_proj"),
    "gpt_neo": ("transformer.h", "attn", "attn.attention.out_proj", "mlp", "mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "attention", "attention.dense", "mlp",
                 "mlp.dense_4h_to_h"),
    "llama": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"),
    "mistral": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"),
    "qwen2": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"),
    "qwen3": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"),
    "gemma": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"),
    "gemma2": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"),
    "phi": ("model.layers", "self_attn", "self_attn.dense", "mlp", "mlp.fc2"),
    "opt": ("model.decoder.layers", "self_attn", "self_attn.out_proj", "fc2", "fc2"),
    "stablelm": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"),
}

_LLAMA_LIKE = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
               "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
               "vocab_size": 100, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
EXTRA = {  # families of the site table that tests/tiny_models.py does not build
    "qwen3": lambda: T.Qwen3Config(**{**_LLAMA_LIKE, "head_dim": 8}),
    "gemma2": lambda: T.Gemma2Config(**{**_LLAMA_LIKE, "head_dim": 12,
                                        "num_key_value_heads": 1}),
}


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = (EXTRA.get(arch) or CONFIGS[arch])()
    return T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def where(arch: str, placement: str, i: int) -> tuple[str, str]:
    """(module path, "in" or "out"): the activation of ``placement`` at layer ``i``."""
    blocks, attn, attn_proj, mlp, mlp_proj = NAMES[arch]
    block = f"{blocks}.{i}"
    return {"attn_heads": (f"{block}.{attn_proj}", "in"),
            "attn_out": (f"{block}.{attn}", "out"),
            "mlp_out": (f"{block}.{mlp}", "out"),
            "mlp_hidden": (f"{block}.{mlp_proj}", "in"),
            "residual": (block, "out")}[placement]


def flat(x: torch.Tensor) -> torch.Tensor:
    """Tokens as rows: OPT's MLP sees ``(batch * seq, d)``, the codebook ``(batch, seq, d)``."""
    return x.reshape(-1, x.shape[-1])


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def capture(model: nn.Module, arch: str) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Hooks of the test's own on every site's module; site name -> captured tensors."""
    got: dict[str, list[torch.Tensor]] = {}
    handles = []
    for placement in PLACEMENTS:
        for i in range(LAYERS):
            path, kind = where(arch, placement, i)
            mod = model.get_submodule(path)
            seen = got.setdefault(f"layers.{i}.{placement}", [])
            if kind == "in":
                def pre(m, args, kwargs, seen=seen):
                    seen.append((args[0] if args else kwargs["hidden_states"]).detach())
                handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(m, args, out, seen=seen):
                    seen.append(_first(out).detach())
                handles.append(mod.register_forward_hook(post))
    return got, handles


def test_every_family_of_the_site_table_is_covered():
    assert set(FAMILIES) <= set(NAMES)
    assert set(NAMES) - set(FAMILIES) == {"stablelm"}  # found by generic discovery


@pytest.mark.parametrize("arch", sorted(NAMES))
def test_hooked_activation_is_the_papers(arch: str) -> None:
    ids = tokens(2, 8)
    base = build(arch)
    model = CodebookModel(base, placements=list(PLACEMENTS), num_codes=16, k=2)
    assert set(model.site_names) == {f"layers.{i}.{p}" for p in PLACEMENTS
                                     for i in range(LAYERS)}
    heads = base.config.num_attention_heads
    for name, layer in model.sites.items():
        assert layer.config.groups == (heads if name.endswith("attn_heads") else 1), name

    # Read: with every codebook bypassed (output = input), each layer receives exactly the
    # tensor at the test's own hook.
    for layer in model.sites.values():
        layer.recorded, layer.bypass = [], True
    ours, handles = capture(base, arch)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    for name, layer in model.sites.items():
        assert len(layer.recorded) == 1 and len(ours[name]) == 1, name
        assert layer.recorded[0].shape[:2] == (2, 8), name
        assert torch.equal(flat(layer.recorded[0]), flat(ours[name][0])), name

    # The captured tensors are what the architecture says they are.
    blocks, _, attn_proj, _, mlp_proj = NAMES[arch]
    for i in range(LAYERS):
        block = base.get_submodule(f"{blocks}.{i}")
        a = {p: ours[f"layers.{i}.{p}"][0] for p in PLACEMENTS}
        with torch.no_grad():
            torch.testing.assert_close(block.get_submodule(attn_proj)(a["attn_heads"]),
                                       a["attn_out"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(block.get_submodule(mlp_proj)(a["mlp_hidden"]),
                                       a["mlp_out"], rtol=1e-5, atol=1e-6)
    assert a["attn_heads"].shape[-1] == heads * base.config.to_dict().get(
        "head_dim", base.config.hidden_size // heads)
    torch.testing.assert_close(ours["layers.0.residual"][0], out.hidden_states[1])
    for h in handles:
        h.remove()

    # Write: with the codebooks on, the model computes on from the codebook's output, at the
    # same point (the test's hooks run after the model's own).
    outs: dict[str, list[torch.Tensor]] = {}
    for name, layer in model.sites.items():
        layer.recorded, layer.bypass = None, False
        outs[name] = []
        layer.register_forward_hook(lambda m, a, y, s=outs[name]: s.append(y.detach()))
    ours, handles = capture(base, arch)
    with torch.no_grad():
        model(input_ids=ids)
    for name in model.site_names:
        assert len(outs[name]) == 1 and len(ours[name]) == 1, name
        assert torch.equal(flat(ours[name][0]), flat(outs[name][0])), name
    for h in handles:
        h.remove()


def test_transformer_lens_sites_are_the_hf_models_activations(tmp_path) -> None:
    """A TransformerLens bridge over tiny GPT-2: each site (a TransformerLens hook point)
    receives the activation the test's own hooks capture on the plain Hugging Face model."""
    tl = pytest.importorskip("transformer_lens")
    if not hasattr(tl, "TransformerBridge"):
        pytest.skip("TransformerLens < 4: no TransformerBridge")
    ids = tokens(2, 8)
    hf = build("gpt2")
    ours, handles = capture(hf, "gpt2")
    with torch.no_grad():
        hf(input_ids=ids)
    for h in handles:
        h.remove()
    hf.save_pretrained(tmp_path)
    net = tl.TransformerBridge.boot_transformers(str(tmp_path), hf_model=build("gpt2"),
                                                 tokenizer=None)
    model = CodebookModel(net, placements=list(PLACEMENTS), num_codes=16, k=2)
    assert model.site_specs["layers.1.attn_heads"].module == "blocks.1.attn.hook_z"
    for layer in model.sites.values():
        layer.recorded, layer.bypass = [], True
    with torch.no_grad():
        model(ids)
    for name, layer in model.sites.items():
        assert len(layer.recorded) == 1, name
        torch.testing.assert_close(flat(layer.recorded[0]), flat(ours[name][0]), rtol=1e-5,
                                   atol=1e-6, msg=name)
