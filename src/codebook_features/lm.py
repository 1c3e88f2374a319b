"""Causal-LM plumbing for any model: its device and logits, cached sampling, loss and accuracy.

Everything here works with any causal LM called as ``model(input_ids)`` that returns either
an object with ``.logits`` (every Hugging Face model, a codebook-wrapped model) or a plain
logits tensor of shape (batch, seq, vocab). Used by the evaluation and by both experiments.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import CodebookError

__all__ = ["LMMetrics", "lm_metrics", "model_device", "sample_tokens"]


# ---------------------------------------------------------------------------- model plumbing
def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for parameter-less models)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _logits(out: Any) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise CodebookError("the model must return logits of shape (batch, seq, vocab) or an "
                            "object with .logits; pass a causal language model")
    return logits


def _cache_kwarg(model: Any) -> str | None:
    """The forward argument that takes a KV cache: ``cache`` (transformers >= 5.x),
    ``past_key_values`` (older), or None when the forward takes neither by name."""
    fwd = getattr(model, "forward", None)
    try:
        params = inspect.signature(fwd).parameters if fwd is not None else {}
    except (TypeError, ValueError):
        params = {}
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _default_cache_kwarg() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class _eval_mode:
    """Context: model in eval mode, no gradients; restores the training flag."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = bool(getattr(self.model, "training", False))
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        if self.was_training and hasattr(self.model, "train"):
            self.model.train()


def _as_id_rows(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) as (N, T) LongTensors from a Dataset, dict, tensor or lists."""
    labels = None
    if hasattr(data, "column_names"):  # datasets.Dataset
        ids = data["input_ids"]
        if "labels" in data.column_names:
            labels = data["labels"]
    elif isinstance(data, dict):
        ids, labels = data["input_ids"], data.get("labels")
    else:
        ids = data
    try:
        ids_t = torch.as_tensor(ids if isinstance(ids, torch.Tensor) else list(ids),
                                dtype=torch.long)
        labels_t = ids_t if labels is None else torch.as_tensor(
            labels if isinstance(labels, torch.Tensor) else list(labels), dtype=torch.long)
    except (ValueError, TypeError) as e:
        raise CodebookError(f"input_ids must be equal-length rows of token ids ({e}); "
                            "pad or truncate the sequences") from None
    if ids_t.dim() == 1:
        ids_t, labels_t = ids_t[None], labels_t.reshape(1, -1)
    if ids_t.dim() != 2 or labels_t.shape != ids_t.shape:
        raise CodebookError(f"input_ids {tuple(ids_t.shape)} / labels {tuple(labels_t.shape)}: "
                            "need matching (N, T) token-id rows")
    return ids_t, labels_t


# ---------------------------------------------------------------------------- LM metrics
@dataclass
class LMMetrics:
    """Next-token loss (mean cross-entropy, nats) and argmax accuracy over scored tokens."""

    loss: float
    accuracy: float
    tokens: int


def lm_metrics(model: Any, data: Any, batch_size: int = 32,
               device: torch.device | str | None = None) -> LMMetrics:
    """LM loss and next-token accuracy of ``model`` on ``data``.

    ``data``: a ``datasets.Dataset``/dict with ``input_ids`` (and optional ``labels``), or an
    (N, T) tensor / list of rows. Position ``t`` predicts ``labels[t + 1]`` (the usual causal
    shift); labels equal to -100 are skipped. Loss and accuracy are averaged over all scored
    tokens of all sequences.
    """
    ids, labels = _as_id_rows(data)
    if ids.shape[1] < 2:
        raise CodebookError("lm_metrics needs sequences of at least 2 tokens")
    device = torch.device(device) if device is not None else model_device(model)
    total_loss, correct, count = 0.0, 0, 0
    with _eval_mode(model):
        for i in range(0, len(ids), batch_size):
            x = ids[i:i + batch_size].to(device)
            y = labels[i:i + batch_size, 1:].to(device)
            logits = _logits(model(x))[:, :-1].float()
            mask = y != -100
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 ignore_index=-100, reduction="sum")
            total_loss += float(ce)
            correct += int(((logits.argmax(-1) == y) & mask).sum())
            count += int(mask.sum())
    if count == 0:
        raise CodebookError("lm_metrics: every label is -100, nothing to score")
    return LMMetrics(loss=total_loss / count, accuracy=correct / count, tokens=count)


# ---------------------------------------------------------------------------- sampling
def _draw(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def sample_tokens(model: Any, n: int, length: int, prompt: torch.Tensor | int,
                  batch_size: int = 100, temperature: float = 1.0, seed: int = 0,
                  use_cache: bool | None = None) -> torch.Tensor:
    """Sample ``length`` tokens after ``prompt`` for ``n`` sequences; returns (n, P + length).

    ``prompt``: (P,) token ids shared by all sequences, (n, P) one per sequence, or one id
    (e.g. the tokenizer's BOS) to start every sequence from.
    Sampling is from ``softmax(logits / temperature)`` (``temperature=0``: greedy) with a
    CPU generator seeded by ``seed``, so results are deterministic given the seed and batch
    size. Uses the KV cache when the model's forward names a ``cache`` or ``past_key_values``
    argument (``use_cache=None``), else recomputes the whole prefix each step; force either
    way with ``use_cache``. (Wrappers with ``**kwargs`` forwards need ``use_cache=True``.)
    """
    if n < 1 or length < 0:
        raise CodebookError(f"sample_tokens(n={n}, length={length}): need n >= 1, length >= 0")
    if temperature < 0:
        raise CodebookError(f"temperature={temperature}: must be >= 0")
    prompt = torch.as_tensor(prompt, dtype=torch.long)
    if prompt.dim() == 0:
        prompt = prompt[None]
    if prompt.dim() == 1:
        prompt = prompt.expand(n, -1)
    if prompt.shape[0] != n or prompt.shape[1] < 1:
        raise CodebookError(f"prompt of shape {tuple(prompt.shape)} does not fit n={n}; "
                            "pass (P,) or (n, P) token ids with P >= 1")
    cache_kw = _cache_kwarg(model)
    if use_cache is None:
        use_cache = cache_kw is not None
    if use_cache and cache_kw is None:
        cache_kw = _default_cache_kwarg()
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    with _eval_mode(model):
        for i in range(0, n, batch_size):
            seqs = prompt[i:i + batch_size].to(device)
            past, step_in = None, seqs
            for _ in range(length):
                if use_cache:
                    out = model(step_in, **{cache_kw: past}, use_cache=True)
                    past = _returned_cache(out)
                else:
                    out = model(seqs)
                nxt = _draw(_logits(out)[:, -1], temperature, gen).to(device)
                seqs = torch.cat([seqs, nxt[:, None]], dim=1)
                step_in = nxt[:, None]
            chunks.append(seqs.cpu())
    return torch.cat(chunks)
