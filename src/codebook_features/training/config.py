"""The train command's config: a YAML (or JSON) file read into pydantic dataclasses, checked
up front.

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

Keys and types are checked by pydantic: :class:`DataConfig` and :class:`TrainConfig` are
pydantic dataclasses, and the ``codebooks`` and ``training`` sections are checked against
the fields of ``CodebookModelConfig`` and ``CodebookTrainingArguments``. Numbers and booleans
are taken as YAML writes them (an integer is no boolean, ``"5"`` is no number); each problem
is reported as one line naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, StrictBool, StrictFloat, StrictInt, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from typing_extensions import TypedDict

from ..errors import CodebookError

_SECTION = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
"""Unknown keys are refused; a number given for a text field (``split: 2023``) is its text."""


@dataclass(config=_SECTION)
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
    eval_fraction: StrictFloat = 0.05
    text_column: str = "text"
    """Column of text to tokenise and pack; ``input_ids`` takes pre-tokenised rows of
    seq_len ids as they are (e.g. the TokFSM demo's data/train.parquet)."""
    seq_len: StrictInt = 512
    max_train_rows: StrictInt | None = None
    """Use at most this many packed rows for training."""
    max_eval_rows: StrictInt | None = None
    """Evaluate on at most this many packed rows (default: all; with streaming 256)."""
    streaming: StrictBool = False
    """Read the text lazily (corpora larger than memory) and pack it on the fly; needs
    training.max_steps. Rows come in corpus order unless shuffle_buffer is set."""
    shuffle_buffer: StrictInt = 0
    """With streaming: shuffle the packed rows through a buffer of this many rows (0: off)."""


@dataclass(config=_SECTION)
class TrainConfig:
    """A whole training run."""

    model: str = ""
    tokenizer: str | None = None
    """Tokenizer name or folder (default: the model's)."""
    data: DataConfig = field(default_factory=DataConfig)
    codebooks: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    kmeans_init_batches: StrictInt = 0
    """k-means-initialise the codebooks from this many training batches (0: random codes)."""


_STRICT = {bool: StrictBool, int: StrictInt, float: StrictFloat}
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false",
          "string": "text", "list": "a list", "dict": "a section (a mapping of keys)",
          "dataclass": "a section (a mapping of keys)"}


def _scalar_type(hint: Any, default: Any) -> type | None:
    """``bool``, ``int`` or ``float`` when a field holds one (or None), from its type hint
    (``float | None``, ``Optional[int]``) or else its default's type; None otherwise."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    named = [a for a in (typing.get_args(hint) if union else (hint,)) if a is not type(None)]
    if len(named) == 1 and named[0] in _STRICT:
        return named[0]
    return type(default) if type(default) in _STRICT else None


@functools.cache
def _keys_of(cls: type) -> TypeAdapter:
    """A checker of a section given as the keyword arguments of dataclass ``cls``: unknown
    keys are refused, the bool, int and float fields (or None) must hold one, the rest pass
    as they are (``cls`` checks them)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not resolve: the defaults decide
        hints = {}
    keys = {}
    for f in dataclasses.fields(cls):
        if f.init:
            typ = _scalar_type(hints.get(f.name), f.default)
            keys[f.name] = _STRICT[typ] | None if typ else Any
    section = TypedDict(f"{cls.__name__}Keys", keys, total=False)  # type: ignore[misc]
    section.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
    return TypeAdapter(section)


_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")
_SECTIONS = ("data", "codebooks", "training")


def _where(section: str, loc: tuple[str | int, ...]) -> str:
    """The dotted name of a key: ``data.seq_len``, ``config.kmeans_init_batches``,
    ``data.files[0]``."""
    top = [] if section == "config" and loc[0] in _SECTIONS else [section]
    return ".".join([*top, *(str(p) for p in loc if not isinstance(p, int))]) + "".join(
        f"[{p}]" for p in loc if isinstance(p, int))


def _one_line(e: ValidationError, section: str, known: list[str]) -> CodebookError:
    """The first problem pydantic found, as one line naming the key, section by section (the
    config's own keys, then its data section's): unknown keys first (all of them at once),
    then a wrong type."""
    errors = e.errors()
    data = [x for x in errors if section == "config" and x["loc"][0] == "data"
            and len(x["loc"]) > 1]
    for name, mine, fields in (
            (section, [x for x in errors if x not in data], known),
            ("data", data, [f.name for f in dataclasses.fields(DataConfig)])):
        unknown = sorted(str(x["loc"][-1]) for x in mine if x["type"] in _UNKNOWN)
        if unknown:
            return CodebookError(f"{name}: unknown key(s) {unknown}; known: {sorted(fields)}")
        if mine:
            x = mine[0]
            where, kind = _where(section, x["loc"]), _KINDS.get(x["type"].split("_")[0])
            if kind is None:
                return CodebookError(f"{where}: {x['msg'][0].lower()}{x['msg'][1:]}, got "
                                     f"{x['input']!r}")
            return CodebookError(f"{where} must be {kind}, got {x['input']!r}")
    return CodebookError(f"{section}: {_first_line(e)}")  # pragma: no cover - none found


def _check_keys(given: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    """``given`` with every key known to dataclass ``cls`` and every bool, int and float
    field holding one (a CodebookError naming the first key that does not)."""
    try:
        checked = _keys_of(cls).validate_python(given)
    except ValidationError as e:
        raise _one_line(e, where, [f.name for f in dataclasses.fields(cls) if f.init]) \
            from None
    return {k: checked[k] for k in given}  # in the order given


def _yaml_load(text: str) -> Any:
    """YAML with the 1.2 booleans: only true/false, so ``save_strategy: no`` stays "no"; and
    the 1.2 floats without a dot, so ``1e-4`` is a number, not the text "1e-4"."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
        for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                 re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
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
    for section in _SECTIONS:  # an empty section: its defaults
        if section in raw and raw[section] is None:
            raw[section] = {}
    try:
        cfg = TypeAdapter(TrainConfig).validate_python(raw)
    except ValidationError as e:
        raise _one_line(e, "config", [f.name for f in dataclasses.fields(TrainConfig)]) \
            from None
    if not cfg.model:
        raise CodebookError("config: model is required (a hub name or a local folder)")
    from ..model_config import CodebookModelConfig
    from .trainer import CodebookTrainingArguments

    # types first ("k: two" must be an integer), then unknown keys and bad values
    known = {f.name for f in dataclasses.fields(CodebookModelConfig)}
    typed = _check_keys({k: v for k, v in cfg.codebooks.items() if k in known},
                        CodebookModelConfig, "codebooks")
    cfg.codebooks = {k: typed.get(k, v) for k, v in cfg.codebooks.items()}
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
