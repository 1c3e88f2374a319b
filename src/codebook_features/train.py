"""``codebook-features train CONFIG [key=value ...]``: finetune any causal LM with codebooks.

A config is a YAML (or JSON) file with four sections::

    model: EleutherAI/pythia-410m        # hub name or local folder
    data: {dataset: wikitext, config: wikitext-103-raw-v1, seq_len: 1024}
    codebooks: {placements: [attn_heads], num_codes: 10000, k: 8}
    training: {max_steps: 10000, learning_rate: 1e-4, codebook_learning_rate: 1e-3, ...}

``training`` takes any ``CodebookTrainingArguments`` field (Hugging Face ``TrainingArguments``
plus the codebook ones). Overrides on the command line use dotted keys:
``training.max_steps=100 codebooks.k=4``. Everything is checked before any work starts:
unknown keys, wrong types, an unreachable model, a missing dataset column, a sequence length
beyond the model's positions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import command
from .errors import CodebookError


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut."""

    dataset: str | None = None
    """Hugging Face dataset name (e.g. wikitext)."""
    config: str | None = None
    """Dataset config name (e.g. wikitext-103-raw-v1)."""
    files: list[str] | None = None
    """Local .txt / .jsonl / .parquet files instead of a hub dataset."""
    split: str = "train"
    eval_split: str | None = None
    """Split to evaluate on (none: hold out eval_fraction of the training rows)."""
    eval_fraction: float = 0.05
    text_column: str = "text"
    seq_len: int = 512
    max_train_rows: int | None = None
    """Use at most this many packed rows for training."""


@dataclass
class TrainConfig:
    """A whole training run."""

    model: str = ""
    tokenizer: str | None = None
    """Tokenizer name or folder (default: the model's)."""
    data: DataConfig = field(default_factory=DataConfig)
    codebooks: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    kmeans_init_batches: int = 0
    """k-means-initialise the codebooks from this many training batches (0: random codes)."""


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check ``value`` against the type of a field's default, converting CLI strings."""
    typ = type(default)
    if value is None or typ not in (bool, int, float):
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif not isinstance(value, bool):
        if isinstance(value, (int, float)) and (typ is float or isinstance(value, int)):
            return typ(value)
        if isinstance(value, str):
            try:
                return typ(value)
            except ValueError:
                pass
    article = "an" if typ is int else "a"
    raise CodebookError(f"{where} must be {article} {typ.__name__}, got {value!r}")


def _check_keys(given: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise CodebookError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    return {k: _coerce(v, fields[k].default, f"{where}.{k}") for k, v in given.items()}


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> TrainConfig:
    """Read a config file, apply ``section.key=value`` overrides, check every key and type."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CodebookError(f"config {p} not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise CodebookError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise CodebookError(f"config {p}: expected a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CodebookError(f"override {item!r}: expected section.key=value")
        parts = key.split(".")
        cur = raw
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
            if not isinstance(cur, dict):
                raise CodebookError(f"override {item!r}: {part} is not a section")
        cur[parts[-1]] = yaml.safe_load(value) if value else None
    top = _check_keys(raw, TrainConfig, "config")
    data = _check_keys(top.pop("data", None) or {}, DataConfig, "data")
    cfg = TrainConfig(**top, data=DataConfig(**data))
    if not cfg.model:
        raise CodebookError("config: model is required (a hub name or a local folder)")
    from .model import CodebookModelConfig
    from .training import CodebookTrainingArguments

    CodebookModelConfig.from_dict(dict(cfg.codebooks))  # unknown keys and bad values
    cfg.training = _check_keys(cfg.training, CodebookTrainingArguments, "training")
    return cfg


def _model_positions(model_config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        v = getattr(model_config, name, None)
        if isinstance(v, int):
            return v
    return None


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Check, load, train, evaluate and save; returns the final metrics."""
    from transformers import AutoConfig, AutoTokenizer, default_data_collator

    from .data.text import load_text, pack
    from .fsm import lm_metrics
    from .io import write_json
    from .model import CodebookModel, CodebookModelConfig, load_base_model
    from .training import (
        CodebookTrainer,
        CodebookTrainingArguments,
        kmeans_init_codebooks,
        last_complete_checkpoint,
    )

    try:
        model_config = AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CodebookError(f"cannot load model {cfg.model!r} (no network, or no such "
                            f"model/folder?): {first}") from None
    positions = _model_positions(model_config)
    if positions is not None and cfg.data.seq_len > positions:
        raise CodebookError(f"data.seq_len={cfg.data.seq_len} exceeds the model's "
                            f"{positions} positions; lower data.seq_len")
    d = cfg.data
    train_text = load_text(d.dataset, d.files, d.config, d.split, d.text_column)
    eval_text = (load_text(d.dataset, d.files, d.config, d.eval_split, d.text_column)
                 if d.eval_split else None)
    targs = dict(cfg.training)
    targs.setdefault("output_dir", "runs/train")
    targs.setdefault("report_to", [])
    args = CodebookTrainingArguments(**targs)

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    train_ds = pack(train_text, tokenizer, d.seq_len, d.text_column)
    if eval_text is not None:
        eval_ds = pack(eval_text, tokenizer, d.seq_len, d.text_column)
    else:
        n_eval = max(1, int(len(train_ds) * d.eval_fraction))
        split = train_ds.train_test_split(test_size=n_eval, seed=args.seed, shuffle=True)
        train_ds, eval_ds = split["train"], split["test"]
    if d.max_train_rows is not None:
        train_ds = train_ds.select(range(min(d.max_train_rows, len(train_ds))))
    if len(train_ds) == 0:
        raise CodebookError(f"no training rows of {d.seq_len} tokens: the data is too short; "
                            "lower data.seq_len or add text")

    base = load_base_model(cfg.model)
    model = CodebookModel(base, CodebookModelConfig.from_dict(dict(cfg.codebooks)))
    if cfg.kmeans_init_batches:
        bs = args.per_device_train_batch_size
        batches = [default_data_collator([train_ds[j] for j in range(i, min(i + bs,
                                                                          len(train_ds)))])
                   for i in range(0, min(len(train_ds), cfg.kmeans_init_batches * bs), bs)]
        kmeans_init_codebooks(model, batches, seed=args.seed)
    trainer = CodebookTrainer(model, args, train_dataset=train_ds, eval_dataset=eval_ds,
                              data_collator=default_data_collator, processing_class=tokenizer)
    last = last_complete_checkpoint(args.output_dir)  # an interrupted run resumes from here
    trainer.train(resume_from_checkpoint=last)
    model.eval()
    metrics = {"with_codebooks": lm_metrics(model.base_model, eval_ds).__dict__}
    with model.codebooks_disabled():
        metrics["without_codebooks"] = lm_metrics(model.base_model, eval_ds).__dict__
    out = Path(args.output_dir) / "final"
    model.save_codebooks(out, base_model_name=cfg.model)
    write_json(out / "metrics.json", metrics)
    return metrics


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML/JSON config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. training.max_steps=100 codebooks.k=4")


@command("train", "finetune a causal LM with codebooks from a config file", _options)
def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    metrics = run_training(cfg)
    print(json.dumps(metrics, indent=1))
    return 0
