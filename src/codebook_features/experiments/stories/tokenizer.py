"""The stories as LM data: a tokenizer, token rows and a tiny model that learns them.

:func:`train_story_tokenizer` (byte-level BPE as a ``PreTrainedTokenizerFast``),
:func:`pack_stories` (fixed-length LM blocks) or :func:`story_rows` (one story per row: no
attention across stories, topics stay apart), :func:`build_story_dataset` (a
``datasets.Dataset``) and :func:`tiny_story_model_config` (a 1-layer GPT-NeoX or Llama config
that learns the corpus in minutes on a CPU).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ...errors import CodebookError
from .corpus import StoryConfig, _texts, generate_stories
from .topics import EOS_TOKEN


# --------------------------------------------------------------------------- tokenizer
def train_story_tokenizer(texts: Iterable[str | Mapping[str, Any]], vocab_size: int = 1024,
                          model_max_length: int = 512):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a
    ``transformers.PreTrainedTokenizerFast``.

    ``<|endoftext|>`` (id 0) is BOS, EOS, padding and unknown token. Encoding adds BOS in
    front (``add_special_tokens=False`` to leave it out), never EOS. Deterministic given the
    texts; saves with ``save_pretrained`` and loads with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = _texts(texts)
    if not texts:
        raise CodebookError("train_story_tokenizer: no texts; pass the generated stories")
    if not 300 <= int(vocab_size) <= 65536:
        raise CodebookError(f"train_story_tokenizer(vocab_size={vocab_size}): needs 300..65536 "
                            "(256 bytes, the special token and some merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size), special_tokens=[EOS_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(sorted(texts), trainer=trainer)
    bos_id = tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS_TOKEN} $A", pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B",
        special_tokens=[(EOS_TOKEN, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN, model_max_length=model_max_length)


def pack_stories(tokenizer: Any, stories: Iterable[str | Mapping[str, Any]], seq_len: int = 128,
                 drop_last: bool = True) -> torch.Tensor:
    """Token blocks for LM training: every story is ``<|endoftext|> story``, the stories are
    concatenated in order and cut into ``(n, seq_len)`` rows (a short tail is dropped, or
    padded with the EOS id if ``drop_last`` is False)."""
    if seq_len < 2:
        raise CodebookError(f"pack_stories(seq_len={seq_len}): must be >= 2")
    texts = _texts(stories)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.append(eos)
        ids.extend(row)
    n = len(ids) // seq_len
    if not drop_last and len(ids) % seq_len:
        ids.extend([eos] * (seq_len - len(ids) % seq_len))
        n += 1
    if n == 0:
        raise CodebookError(f"pack_stories: {len(ids)} tokens do not fill one block of "
                            f"{seq_len}; pass more stories or a shorter seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def story_rows(tokenizer: Any, stories: Iterable[str | Mapping[str, Any]],
               max_len: int = 128) -> dict[str, torch.Tensor]:
    """One story per row, for LM training without attention across stories: each row is
    ``<|endoftext|> story <|endoftext|>`` cut to ``max_len`` and padded with the EOS id to the
    longest row. Returns ``input_ids``, ``attention_mask`` (0 on padding) and ``labels``
    (-100 on padding; the closing EOS is a label, so the model learns where stories end)."""
    if max_len < 2:
        raise CodebookError(f"story_rows(max_len={max_len}): must be >= 2")
    texts = _texts(stories)
    if not texts:
        raise CodebookError("story_rows: no stories; pass at least one")
    eos = tokenizer.eos_token_id
    rows = [([eos] + r + [eos])[:max_len]
            for r in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), eos, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100)}


def build_story_dataset(stories: Sequence[Mapping[str, Any]] | StoryConfig | None = None,
                        tokenizer: Any = None, seq_len: int | None = None,
                        packed: bool = True):
    """A ``datasets.Dataset`` of stories.

    Without ``seq_len``: one row per story, columns ``text`` and ``topic`` (and
    ``input_ids``, BOS first, if a ``tokenizer`` is given). With ``seq_len`` (needs the
    tokenizer): LM training rows of equal length, either packed blocks from
    :func:`pack_stories` (columns ``input_ids`` and ``labels``, a copy: causal LMs shift
    labels themselves) or, with ``packed=False``, one story per row from :func:`story_rows`
    (``input_ids``, ``attention_mask``, ``labels``).
    """
    from datasets import Dataset

    if stories is None or isinstance(stories, StoryConfig):
        stories = generate_stories(stories)
    if not stories:
        raise CodebookError("build_story_dataset: no stories; pass at least one")
    if seq_len is not None:
        if tokenizer is None:
            raise CodebookError("build_story_dataset(seq_len=...) needs a tokenizer; pass "
                                "tokenizer=train_story_tokenizer(...)")
        if not packed:
            return Dataset.from_dict({k: v.tolist() for k, v in
                                      story_rows(tokenizer, stories, seq_len).items()})
        ids = pack_stories(tokenizer, stories, seq_len).tolist()
        return Dataset.from_dict({"input_ids": ids, "labels": [list(r) for r in ids]})
    cols: dict[str, list] = {"text": _texts(stories),
                             "topic": [str(s.get("topic", "")) for s in stories]}
    if tokenizer is not None:
        cols["input_ids"] = tokenizer(cols["text"])["input_ids"]
    return Dataset.from_dict(cols)


# --------------------------------------------------------------------------- model
def tiny_story_model_config(tokenizer: Any, arch: str = "gpt_neox", hidden_size: int = 128,
                            num_layers: int = 1, num_heads: int = 4,
                            intermediate_size: int | None = None,
                            max_position_embeddings: int = 512, **kwargs: Any):
    """A small causal-LM config for the story corpus (default: GPT-NeoX, 1 layer, hidden 128,
    4 heads, MLP 4x hidden), with the tokenizer's vocabulary and special token ids.
    ``arch`` is ``"gpt_neox"`` or ``"llama"``; extra keyword arguments go to the config."""
    import transformers as T

    if hidden_size % num_heads:
        raise CodebookError(f"tiny_story_model_config: hidden_size={hidden_size} is not a "
                            f"multiple of num_heads={num_heads}; change one of them")
    inter = intermediate_size or 4 * hidden_size
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    common = {"hidden_size": hidden_size, "num_hidden_layers": num_layers,
              "num_attention_heads": num_heads, "intermediate_size": inter,
              "max_position_embeddings": max_position_embeddings, **ids}
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(**{**common, **kwargs})
    if arch == "llama":
        return T.LlamaConfig(**{**common, "num_key_value_heads": num_heads,
                                "tie_word_embeddings": True, **kwargs})
    raise CodebookError(f"tiny_story_model_config(arch={arch!r}): use 'gpt_neox' or 'llama'")
