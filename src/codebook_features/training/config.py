"""The train command's config: a YAML (or JSON) file read into dataclasses, checked up front.

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

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CodebookError


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut."""

    dataset: str | None = None
    """Hugging Face dataset name (e.g. wikitext), or a local dataset folder (data files or a
    README with configs, as ``datasets.load_dataset`` reads; or a ``save_to_disk`` folder)."""
    config: str | None = None
    """Dataset config name (e.g. wikitext-103-raw-v1)."""
    files: list[str] | None = None
    """Local .txt / .jsonl / .parquet files instead of a hub dataset."""
    split: str = "train"
    eval_split: str | None = None
    """Split to evaluate on (none: hold out eval_fraction of the training rows, or with
    streaming the first max_eval_rows rows)."""
    eval_fraction: float = 0.05
    text_column: str = "text"
    """Column of text to tokenise and pack; ``input_ids`` takes pre-tokenised rows of
    seq_len ids as they are (e.g. the TokFSM demo's data/train.parquet)."""
    seq_len: int = 512
    max_train_rows: int | None = None
    """Use at most this many packed rows for training."""
    max_eval_rows: int | None = None
    """Evaluate on at most this many packed rows (default: all; with streaming 256)."""
    streaming: bool = False
    """Read the text lazily (corpora larger than memory) and pack it on the fly; needs
    training.max_steps. Rows come in corpus order unless shuffle_buffer is set."""
    shuffle_buffer: int = 0
    """With streaming: shuffle the packed rows through a buffer of this many rows (0: off)."""


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


_SCALARS = {"bool": bool, "int": int, "float": float}


def _scalar_type(f: dataclasses.Field) -> type | None:
    """``bool``, ``int`` or ``float`` when the field holds one (or None), from its annotation
    (``float | None``, ``Optional[int]``) or else its default's type; None otherwise."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", None) or str(f.type)
    t = re.sub(r"^(typing\.)?Optional\[(.*)\]$", r"\2", t.strip())
    names = {p.strip() for p in t.split("|")} - {"None"}
    if len(names) == 1 and (name := names.pop()) in _SCALARS:
        return _SCALARS[name]
    return type(f.default) if type(f.default) in (bool, int, float) else None


def _coerce(value: Any, typ: type | None, where: str) -> Any:
    """Check ``value`` against a field's scalar type, converting CLI strings."""
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
    kind = {int: "an integer", float: "a number", bool: "true or false"}[typ]
    raise CodebookError(f"{where} must be {kind}, got {value!r}")


def _check_keys(given: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise CodebookError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    return {k: _coerce(v, _scalar_type(fields[k]), f"{where}.{k}") for k, v in given.items()}


def _yaml_load(text: str) -> Any:
    """YAML with the 1.2 booleans: only true/false, so ``save_strategy: no`` stays "no"."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
        for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                 re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> TrainConfig:
    """Read a config file, apply ``section.key=value`` overrides, check every key and type."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CodebookError(f"config {p} not found")
    try:
        raw = _yaml_load(p.read_text()) or {}
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
        cur[parts[-1]] = _yaml_load(value) if value else None
    top = _check_keys(raw, TrainConfig, "config")
    data = _check_keys(top.pop("data", None) or {}, DataConfig, "data")
    cfg = TrainConfig(**top, data=DataConfig(**data))
    if not cfg.model:
        raise CodebookError("config: model is required (a hub name or a local folder)")
    from ..model_config import CodebookModelConfig
    from .trainer import CodebookTrainingArguments

    # types first ("k: two" must be an integer), then unknown keys and bad values
    known = {f.name: f for f in dataclasses.fields(CodebookModelConfig)}
    cfg.codebooks = {k: _coerce(v, _scalar_type(known[k]), f"codebooks.{k}") if k in known
                     else v for k, v in dict(cfg.codebooks).items()}
    CodebookModelConfig.from_dict(dict(cfg.codebooks))
    cfg.training = _check_keys(cfg.training, CodebookTrainingArguments, "training")
    return cfg


STREAM_EVAL_ROWS = 256
"""Evaluation rows read from a stream when data.max_eval_rows is not set."""

_AT_LEAST = {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1,
             "gradient_accumulation_steps": 1, "learning_rate": 0.0,
             "codebook_learning_rate": 0.0, "weight_decay": 0.0, "dead_code_interval": 0,
             "dead_code_noise": 0.0}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def training_arguments(cfg: TrainConfig) -> Any:
    """The run's ``CodebookTrainingArguments``: the CLI's defaults (TensorBoard logs, progress
    bars) under the config's values, every value checked with a one-line error."""
    import torch
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    from transformers.optimization import get_scheduler

    from .trainer import CodebookTrainingArguments

    targs = dict(cfg.training)
    targs.setdefault("output_dir", "runs/train")
    targs.setdefault("report_to", ["tensorboard"])
    targs.setdefault("disable_tqdm", False)
    try:
        args = CodebookTrainingArguments(**targs)
    except (ValueError, TypeError) as e:
        raise CodebookError(f"training: {_first_line(e)}") from None
    for name, low in _AT_LEAST.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise CodebookError(f"training.{name}={value}: must be at least {low}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise CodebookError(f"training.max_steps={args.max_steps}: give a positive number of "
                            "steps (or -1 to train num_train_epochs)")
    for what in ("eval", "save"):
        strategy, steps = getattr(args, f"{what}_strategy"), getattr(args, f"{what}_steps")
        if strategy == "steps" and steps is not None and steps <= 0:
            raise CodebookError(f"training.{what}_steps={steps}: must be positive with "
                                f"{what}_strategy=steps")
    if cfg.data.streaming and args.max_steps < 0:
        raise CodebookError("data.streaming needs training.max_steps: a stream has no length "
                            "to count epochs by")
    if args.fp16 and args.device.type == "cpu":
        raise CodebookError("training.fp16 needs a GPU (this run is on the CPU); use "
                            "training.bf16=true instead")
    unknown = sorted(set(args.report_to) - set(INTEGRATION_TO_CALLBACK))
    if unknown:
        raise CodebookError(f"training.report_to: unknown {unknown}; known: "
                            f"{sorted(INTEGRATION_TO_CALLBACK)}")
    missing = sorted(set(args.report_to) - set(get_available_reporting_integrations()))
    if missing:
        extra = " (pip install 'codebook-features[wandb]')" if "wandb" in missing else ""
        raise CodebookError(f"training.report_to: {missing} not installed{extra}")
    steps = args.max_steps if args.max_steps > 0 else 1000
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        get_scheduler(args.lr_scheduler_type, probe,
                      num_warmup_steps=args.get_warmup_steps(steps), num_training_steps=steps,
                      scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
    except (TypeError, ValueError) as e:
        kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        raise CodebookError(f"training.lr_scheduler_type={kind} with "
                            f"lr_scheduler_kwargs={args.lr_scheduler_kwargs or {}}: "
                            f"{_first_line(e)}") from None
    return args
