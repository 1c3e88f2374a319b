"""Tiny randomly initialised causal LMs of several architectures, built from configs.

Nothing is downloaded: every model comes from ``AutoModelForCausalLM.from_config``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as T
from torch import nn

VOCAB = 100
HIDDEN = 32
LAYERS = 2
HEADS = 4

_COMMON = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _configs() -> dict[str, Callable[[], T.PretrainedConfig]]:
    h, n, a = HIDDEN, LAYERS, HEADS
    llama_like = {"hidden_size": h, "num_hidden_layers": n, "num_attention_heads": a,
                  "num_key_value_heads": 2, "intermediate_size": 64,
                  "max_position_embeddings": 64, **_COMMON}
    return {
        "gpt2": lambda: T.GPT2Config(n_embd=h, n_layer=n, n_head=a, n_positions=64, **_COMMON),
        "gpt_neo": lambda: T.GPTNeoConfig(
            hidden_size=h, num_layers=n, num_heads=a, max_position_embeddings=64,
            attention_types=[[["global", "local"], 1]], window_size=8, **_COMMON),
        "gpt_neox": lambda: T.GPTNeoXConfig(
            hidden_size=h, num_hidden_layers=n, num_attention_heads=a, intermediate_size=64,
            max_position_embeddings=64, **_COMMON),
        "llama": lambda: T.LlamaConfig(**llama_like),
        "mistral": lambda: T.MistralConfig(**llama_like),
        "qwen2": lambda: T.Qwen2Config(**llama_like),
        "phi": lambda: T.PhiConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
                                   intermediate_size=64, max_position_embeddings=64, **_COMMON),
        # Gemma: head_dim * heads (48) differs from the hidden size (32).
        "gemma": lambda: T.GemmaConfig(**{**llama_like, "head_dim": 12,
                                          "num_key_value_heads": 1}),
        "opt": lambda: T.OPTConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
                                   ffn_dim=64, word_embed_proj_dim=h,
                                   max_position_embeddings=64, **_COMMON),
        # Not in the family table: found by generic discovery.
        "stablelm": lambda: T.StableLmConfig(**{**llama_like, "num_key_value_heads": a}),
    }


CONFIGS = _configs()
ARCHITECTURES = list(CONFIGS)


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    """A tiny random causal LM of ``arch`` in eval mode (dropout off), float32."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation="eager")
    return model.eval()


def tiny_unsupported(seed: int = 0) -> nn.Module:
    """A tiny causal LM without attention (Mamba): attention placements do not exist."""
    torch.manual_seed(seed)
    cfg = T.MambaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, state_size=4,
                        expand=2, **_COMMON)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def tokens(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def story_workload(folder, num_stories: int, seed: int, positions: int):
    """A generated story corpus, its BPE tokenizer and a tiny random GPT-NeoX saved (with the
    tokenizer) to ``folder / "model"``; returns (corpus path, tokenizer, model)."""
    from codebook_features.experiments.stories import (
        generate_stories,
        tiny_story_model_config,
        train_story_tokenizer,
        write_corpus,
    )

    stories = generate_stories(num_stories=num_stories, seed=seed)
    corpus = write_corpus(folder / "stories.txt", stories)
    tok = train_story_tokenizer([s["text"] for s in stories], vocab_size=300)
    torch.manual_seed(0)
    model = T.GPTNeoXForCausalLM(tiny_story_model_config(
        tok, hidden_size=32, num_heads=2, max_position_embeddings=positions))
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return corpus, tok, model


def story_codebooks(folder, num_stories: int, seed: int):
    """:func:`story_workload` (256 positions) plus attention-head and MLP-output codebooks
    (32 codes, k=2) saved to ``folder / "cb"`` on the saved base; returns (corpus path,
    tokenizer, codebook model in eval mode)."""
    from codebook_features.model import CodebookModel

    corpus, tok, base = story_workload(folder, num_stories=num_stories, seed=seed, positions=256)
    model = CodebookModel(base, placements=["attn_heads", "mlp_out"], num_codes=32, k=2).eval()
    model.save_codebooks(folder / "cb", base_model_name=str(folder / "model"))
    return corpus, tok, model


def assert_same_index(a, b) -> None:
    """Two code-index folders hold the same meta and the same tables and arrays."""
    import numpy as np
    import pyarrow.parquet as pq

    from codebook_features.analysis.index import META_NAME
    from codebook_features.io import read_json

    meta = read_json(a / META_NAME)
    assert read_json(b / META_NAME) == meta
    for shard in meta["shards"]:
        for f in shard["files"].values():
            if f.endswith(".npy"):
                np.testing.assert_array_equal(np.load(a / f), np.load(b / f))
            else:
                assert pq.read_table(a / f).equals(pq.read_table(b / f)), f
