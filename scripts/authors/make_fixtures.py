"""Write test fixtures with the authors' own code (PyPI ``codebook-features`` 0.1.2).

Run inside the authors' venv (it has our import name, so it lives apart):

    bash scripts/authors/setup.sh
    .venv-authors/bin/python scripts/authors/make_fixtures.py [--out tests/fixtures/authors]

For each case it builds a tiny GPT-2, GPT-Neo or GPT-NeoX model from a config (seeded, dropout
off), wraps it with the authors' codebooks (their ``wrap_codebook``), gives every LayerNorm
and codebook random weights, and writes into ``OUT/CASE/``:

- ``checkpoint/``: their ``save_pretrained`` folder (``config.json`` + ``pytorch_model.bin``,
  or ``model.safetensors`` for the cases marked so), the format of their released models;
- ``base_config.json``: the base model's config (their folder has none);
- ``reference.safetensors``: ``input_ids``; eval-mode ``logits`` and the codes of every
  codebook (``codes.<their key>``, ``(batch, seq, k)``); the training-mode LM ``loss`` and the
  gradients it gives (``grad.<parameter name>``: every codebook and codebook LayerNorm, the
  input embedding).

The files are small and committed; the default test suite reads them without this venv.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from codebook_features import models

VOCAB, HIDDEN, LAYERS, HEADS, INNER, CODES, SEQ, BATCH = 64, 32, 2, 4, 64, 24, 12, 3

BASES = {
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INNER, max_position_embeddings=64,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, hidden_dropout=0.0,
        attention_dropout=0.0),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INNER,
        n_positions=64, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neo": lambda: transformers.GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
        intermediate_size=INNER, max_position_embeddings=64,
        attention_types=[[["global", "local"], LAYERS // 2]], window_size=8,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, resid_dropout=0.0, embed_dropout=0.0,
        attention_dropout=0.0),
}

# name: (base, codebook config, save as safetensors). The paper's main placement (grouped
# per-head + MLP, real LayerNorms) at k = 1 and 4 for each family; ungrouped codebooks at
# the other placements, with the other losses and similarities.
CASES = {
    "neox_heads_mlp_k1": ("gpt_neox", dict(codebook_at=["attn_preproj", "mlp"],
                                           codebook_type=["group", "vanilla"],
                                           num_codebooks=[-1, 1], k_codebook=[1, 1],
                                           loss="aeloss"), False),
    "neox_heads_mlp_k4": ("gpt_neox", dict(codebook_at=["attn_preproj", "mlp"],
                                           codebook_type=["group", "vanilla"],
                                           num_codebooks=[-1, 1], k_codebook=[4, 4],
                                           loss="aeloss"), True),
    "gpt2_heads_mlp_k1": ("gpt2", dict(codebook_at=["attn_preproj", "mlp"],
                                       codebook_type=["group", "vanilla"],
                                       num_codebooks=[-1, 1], k_codebook=[1, 1],
                                       loss="aeloss"), False),
    "gpt2_heads_mlp_k4": ("gpt2", dict(codebook_at=["attn_preproj", "mlp"],
                                       codebook_type=["group", "vanilla"],
                                       num_codebooks=[-1, 1], k_codebook=[4, 4],
                                       loss="aeloss"), False),
    "neo_heads_k2": ("gpt_neo", dict(codebook_at=["attn_preproj"], codebook_type=["group"],
                                     num_codebooks=[-1], k_codebook=[2], loss="aeloss"),
                     False),
    "neox_other_full": ("gpt_neox", dict(codebook_at=["attn", "mlp_mid", "transformer_block"],
                                         codebook_type="vanilla", num_codebooks=1,
                                         k_codebook=2, loss="fullaeloss-0.5"), False),
    "gpt2_other_vqvae": ("gpt2", dict(codebook_at=["attn", "mlp_mid", "transformer_block"],
                                      codebook_type="vanilla", num_codebooks=1, k_codebook=1,
                                      loss="vqvae", similarity_metric="euclidean"), False),
    "neo_mlp_base": ("gpt_neo", dict(codebook_at=["mlp"], codebook_type="vanilla",
                                     num_codebooks=1, k_codebook=3, loss="base",
                                     layers_to_snap=[-1]), False),
}


def build(case: str, seed: int = 0):
    base_name, cb_args, _ = CASES[case]
    torch.manual_seed(seed)
    base_cfg = BASES[base_name]()
    base = transformers.AutoModelForCausalLM.from_config(base_cfg)
    args = {"num_codes": CODES, "layers_to_snap": "all", "similarity_metric": "inner_product",
            **cb_args}
    cb_model = models.wrap_codebook(base, config=models.CodebookModelConfig(**args))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in cb_model.named_parameters():
            if "codebook_layer" in name and name.endswith(("ln.weight", "ln.bias")):
                # real LayerNorms: affine far from the identity
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "weight" in name
                                                                    else 0.0))
    return base_cfg, cb_model


def record(case: str, out: Path) -> None:
    base_cfg, cb_model = build(case)
    _, _, as_safetensors = CASES[case]
    folder = out / case
    if folder.exists():
        shutil.rmtree(folder)
    ckpt = folder / "checkpoint"
    cb_model.save_pretrained(ckpt, safe_serialization=as_safetensors)
    (folder / "base_config.json").write_text(json.dumps(base_cfg.to_dict(), indent=2,
                                                        sort_keys=True) + "\n")
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    tensors = {"input_ids": ids}

    codes: dict[str, torch.Tensor] = {}
    cb_model.set_hook_fn(lambda key, ids_: codes.__setitem__(key, torch.from_numpy(ids_)))
    cb_model.eval()
    with torch.no_grad():
        tensors["logits"] = cb_model(input_ids=ids).logits
    tensors.update({f"codes.{k}": v for k, v in codes.items()})

    cb_model.set_hook_fn(None)
    cb_model.train()
    cb_model.zero_grad()
    loss = cb_model(input_ids=ids, labels=ids).loss
    loss.backward()
    tensors["loss"] = loss.detach()
    for name, p in cb_model.named_parameters():
        if p.grad is not None and ("codebook_layer" in name or "embed" in name
                                   or name.endswith("wte.weight")):
            tensors[f"grad.{name}"] = p.grad.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(folder / "reference.safetensors"),
              metadata={"made_by": f"codebook-features 0.1.2 / transformers "
                                   f"{transformers.__version__} / torch {torch.__version__}",
                        "case": case})
    print(f"{case}: {len(codes)} codebooks, loss {float(loss):.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/authors")
    parser.add_argument("cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    for case in args.cases:
        record(case, Path(args.out))


if __name__ == "__main__":
    main()
