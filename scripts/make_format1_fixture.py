"""Write tests/fixtures/format1: codebooks saved in format 1 (whole-width LayerNorm, lambda as a
per-element mean) by the library as it was before format 2, with the logits and gradients that
version computed, so that a test can check old saves still behave exactly as before.

Run with the source of a format-1 release first on the path, e.g. commit 9fd2ccc:
    git worktree add /tmp/oldsrc 9fd2ccc
    PYTHONPATH=/tmp/oldsrc/src .venv/bin/python scripts/make_format1_fixture.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import save_file

from codebook_features import CodebookModel
from codebook_features.model import FORMAT_VERSION

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "format1"


def main() -> None:
    assert FORMAT_VERSION == 1, "run with a format-1 version of the library on PYTHONPATH"
    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=64)
    base = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model = CodebookModel(base, placements=["attn_heads", "mlp_out"], num_codes=24, k=2,
                          mse_coeff=0.5)
    with torch.no_grad():
        for layer in model.sites.values():
            layer.ln.weight.uniform_(0.5, 1.5)
            layer.ln.bias.uniform_(-0.3, 0.3)
    OUT.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(OUT / "base")
    model.save_codebooks(OUT / "codebooks", base_model_name="base")
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    tensors = {"input_ids": ids, "logits": logits, "loss": loss.detach()}
    for name, layer in model.sites.items():
        tensors[f"grad.{name}.codebook"] = layer.codebook.grad
        tensors[f"grad.{name}.ln.weight"] = layer.ln.weight.grad
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "reference.safetensors"))
    (OUT / "README.md").write_text("Written by scripts/make_format1_fixture.py.\n")
    print(json.dumps({"sites": model.site_names, "loss": float(loss)}))


if __name__ == "__main__":
    main()
