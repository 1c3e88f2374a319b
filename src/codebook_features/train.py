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
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import command
from .errors import CodebookError


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
    from .model import CodebookModelConfig
    from .training import CodebookTrainingArguments

    # types first ("k: two" must be an integer), then unknown keys and bad values
    known = {f.name: f for f in dataclasses.fields(CodebookModelConfig)}
    cfg.codebooks = {k: _coerce(v, _scalar_type(known[k]), f"codebooks.{k}") if k in known
                     else v for k, v in dict(cfg.codebooks).items()}
    CodebookModelConfig.from_dict(dict(cfg.codebooks))
    cfg.training = _check_keys(cfg.training, CodebookTrainingArguments, "training")
    return cfg


def _model_positions(model_config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        v = getattr(model_config, name, None)
        if isinstance(v, int):
            return v
    return None


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

    from .training import CodebookTrainingArguments

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


def wandb_offline_unless_logged_in(args: Any) -> str | None:
    """With ``report_to`` wandb and no credentials (no ``WANDB_API_KEY``, no netrc entry for
    the wandb host) nor ``WANDB_MODE``, set ``WANDB_MODE=offline`` so that a run without
    network neither hangs nor fails; runs go to ``WANDB_DIR`` (default: the output dir).
    Returns the mode set, or None when nothing was changed."""
    import netrc
    from urllib.parse import urlparse

    if "wandb" not in args.report_to:
        return None
    os.environ.setdefault("WANDB_DIR", str(Path(args.output_dir).resolve()))
    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc().authenticators(host or "api.wandb.ai"):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    os.environ["WANDB_MODE"] = "offline"
    print(f"wandb: not logged in, logging offline to {os.environ['WANDB_DIR']}/wandb "
          "(wandb sync uploads it later)", file=sys.stderr)
    return "offline"


def build_datasets(cfg: TrainConfig, tokenizer: Any, seed: int) -> tuple[Any, Any]:
    """Packed training rows (a ``Dataset``, or an ``IterableDataset`` when streaming) and
    in-memory evaluation rows."""
    from .data.text import load_text, pack, take_rows, token_rows

    d = cfg.data
    if d.shuffle_buffer and not d.streaming:
        raise CodebookError("data.shuffle_buffer is for data.streaming (in memory, the "
                            "trainer shuffles every epoch)")

    def packed(split: str) -> Any:
        text = load_text(d.dataset, d.files, d.config, split, d.text_column, d.streaming)
        if d.text_column == "input_ids":  # pre-tokenised rows
            return token_rows(text, d.seq_len)
        return pack(text, tokenizer, d.seq_len, d.text_column)

    train_ds = packed(d.split)
    n_eval = d.max_eval_rows if d.max_eval_rows or not d.streaming else STREAM_EVAL_ROWS
    if d.eval_split:
        eval_ds = take_rows(packed(d.eval_split), n_eval)
    elif d.streaming:  # hold out the stream's first rows
        eval_ds, train_ds = take_rows(train_ds, n_eval), train_ds.skip(n_eval)
    else:
        if len(train_ds) < 2:
            raise CodebookError(f"{len(train_ds)} row(s) of {d.seq_len} tokens: too few to "
                                "train and evaluate; lower data.seq_len or add text")
        n_held = max(1, int(len(train_ds) * d.eval_fraction))
        split = train_ds.train_test_split(test_size=n_held, seed=seed, shuffle=True)
        train_ds, eval_ds = split["train"], take_rows(split["test"], n_eval)
    if d.max_train_rows is not None:
        train_ds = (train_ds.take(d.max_train_rows) if d.streaming
                    else take_rows(train_ds, d.max_train_rows))
    empty = (next(iter(train_ds.take(1)), None) is None) if d.streaming else len(train_ds) == 0
    if empty or len(eval_ds) == 0:
        raise CodebookError(f"no {'training' if empty else 'evaluation'} rows of {d.seq_len} "
                            "tokens: the data is too short; lower data.seq_len or add text")
    if d.streaming and d.shuffle_buffer:
        train_ds = train_ds.shuffle(seed=seed, buffer_size=d.shuffle_buffer)
    return train_ds, eval_ds


HUB_PROBE_TIMEOUT = 3.0
"""Seconds the one request that checks the hub is reachable may take."""


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, through any configured proxy) answers one
    request within ``timeout`` seconds: any HTTP status counts; no retries."""
    import threading

    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return False
    answered: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout, follow_redirects=False)
            answered.append(True)
        except Exception:  # noqa: BLE001 (any failure means unreachable)
            answered.append(False)

    # A thread bounds the name lookup too, which the request's timeout does not cover.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(answered and answered[0])


def check_model_source(name: str, what: str = "model") -> None:
    """Fail fast, with one line, when ``name`` can be loaded neither from a local folder, nor
    from the Hugging Face cache, nor from a reachable hub; with a cached model and no hub,
    switch the process to offline mode so that no later load retries the network."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(name).expanduser()
    if path.exists() or constants.is_offline_mode():
        return  # a folder, or cache-only loads that fail at once
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if looks_local:
        raise CodebookError(f"cannot load {what} {name!r}: no such folder")
    cached = False
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 (a name the hub would reject: let the load say why)
        return
    if hub_reachable():
        return
    if not cached:
        raise CodebookError(f"cannot load {what} {name!r}: not a local folder, not in the "
                            f"Hugging Face cache ({constants.HF_HUB_CACHE}), and the hub "
                            f"({constants.ENDPOINT}) is unreachable (no network?); download it "
                            "where there is network, or give a local folder")
    _go_offline()


def _go_offline() -> None:
    """Hub and datasets loads from the cache only, for the rest of this process."""
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    print("hub unreachable: loading models and datasets from the Hugging Face cache only",
          file=sys.stderr)


FINISHED_NAME = "finished.json"
"""Written into ``OUTPUT_DIR/final`` last, once the final folder is complete: the steps
trained and the target the run was given."""


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def finished_run(args: Any, cfg_codebooks: dict[str, Any]) -> dict[str, Any] | None:
    """The final metrics of a run already finished in ``args.output_dir`` to at least the
    target ``args`` set (``max_steps``, or with -1 ``num_train_epochs``), else None. A finished
    run whose target was lower is continued from its last checkpoint (None, with a line that
    says so); without a checkpoint to continue from, or with other codebook settings
    (``cfg_codebooks``) than the run's, a CodebookError."""
    from .io import read_json
    from .training import last_complete_checkpoint

    final = Path(args.output_dir) / "final"
    if not (final / FINISHED_NAME).is_file() or not (final / "metrics.json").is_file():
        return None
    from .model import CodebookModelConfig
    from .training import check_checkpoint_config

    check_checkpoint_config(final, CodebookModelConfig.from_dict(dict(cfg_codebooks)),
                            "the finished run there was trained")
    done = read_json(final / FINISHED_NAME)
    step = int(done.get("global_step", 0))
    if args.max_steps > 0:
        reached = step >= args.max_steps
        target = f"max_steps={args.max_steps}"
    else:
        reached = (done.get("max_steps", -1) <= 0
                   and float(done.get("num_train_epochs", 0)) >= args.num_train_epochs)
        target = f"num_train_epochs={args.num_train_epochs:g}"
    if reached:
        _say(f"train: {args.output_dir} already holds a finished run ({step} steps, "
             f"{final}); nothing to do (raise training.max_steps to train it further, or "
             "pass a new training.output_dir)")
        return read_json(final / "metrics.json")
    last = last_complete_checkpoint(args.output_dir)
    if last is None:
        raise CodebookError(f"{args.output_dir}: the finished run there ({step} steps) left no "
                            f"checkpoint to continue from to {target}; pass a new "
                            "training.output_dir")
    _say(f"train: continuing the finished run in {args.output_dir} ({step} steps) to {target}")
    return None


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Check, load, train, evaluate and save; returns the final metrics. Progress bars show
    unless ``training.disable_tqdm`` (which hides every one of them).

    A run already finished in the output folder is left alone (its metrics are returned); one
    interrupted, or finished to a lower ``max_steps``, continues from its last checkpoint."""
    args = training_arguments(cfg)
    done = finished_run(args, cfg.codebooks)
    if done is not None:
        return done
    from .io import writable_dir

    # a read-only folder or a file in the way: one line before any work (nothing created)
    writable_dir(args.output_dir, create=False)
    from .io import progress_bars

    with progress_bars(not args.disable_tqdm):
        return _run_training(cfg, args)


def _run_training(cfg: TrainConfig, args: Any) -> dict[str, Any]:
    from transformers import AutoConfig, default_data_collator

    from .data.text import take_rows
    from .evaluate import evaluate_codebooks
    from .io import load_tokenizer, read_json, write_json
    from .model import CodebookModel, CodebookModelConfig, load_base_model
    from .training import CodebookTrainer, kmeans_init_codebooks, last_complete_checkpoint

    check_model_source(cfg.model)
    if cfg.tokenizer and cfg.tokenizer != cfg.model:
        check_model_source(cfg.tokenizer, "tokenizer")
    try:
        model_config = AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        raise CodebookError(f"cannot load model {cfg.model!r} (no network, or no such "
                            f"model/folder?): {_first_line(e)}") from None
    positions = _model_positions(model_config)
    if positions is not None and cfg.data.seq_len > positions:
        raise CodebookError(f"data.seq_len={cfg.data.seq_len} exceeds the model's "
                            f"{positions} positions; lower data.seq_len")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    train_ds, eval_ds = build_datasets(cfg, tokenizer, args.seed)

    base = load_base_model(cfg.model)
    model = CodebookModel(base, CodebookModelConfig.from_dict(dict(cfg.codebooks)))
    args.device  # noqa: B018 (under torchrun, sets up the process group k-means broadcasts in)
    if cfg.kmeans_init_batches:
        bs = args.per_device_train_batch_size
        rows = take_rows(train_ds, cfg.kmeans_init_batches * bs)
        batches = [default_data_collator([rows[j] for j in range(i, min(i + bs, len(rows)))])
                   for i in range(0, len(rows), bs)]
        kmeans_init_codebooks(model, batches, seed=args.seed)
    wandb_offline_unless_logged_in(args)
    trainer = CodebookTrainer(model, args, train_dataset=train_ds, eval_dataset=eval_ds,
                              data_collator=default_data_collator, processing_class=tokenizer)
    last = last_complete_checkpoint(args.output_dir)  # an interrupted run resumes from here
    step = 0
    if last is not None:
        step = int(read_json(Path(last) / "trainer_state.json").get("global_step", 0))
    if last is not None and 0 < args.max_steps <= step:
        # Trained to the end, stopped before final/ was complete: the last checkpoint is the
        # trained model (resuming the Trainer there would train a step past max_steps).
        from transformers import TrainerState

        _say(f"train: {last} is the end of training (step {step}); writing the final folder")
        trainer._load_from_checkpoint(last)
        trainer.state = TrainerState.load_from_json(str(Path(last) / "trainer_state.json"))
    else:
        if last is not None:
            _say(f"train: resuming from {last} (step {step})")
        trainer.train(resume_from_checkpoint=last)
    out = Path(args.output_dir) / "final"
    # Several processes (torchrun) hold the same model: the main one evaluates and writes the
    # final folder; the others wait for it and return its metrics.
    if trainer.is_world_process_zero():
        metrics = evaluate_codebooks(model, eval_ds, batch_size=args.per_device_eval_batch_size)
        if args.freeze_model:  # the base weights are the original ones
            model.save_codebooks(out, base_model_name=cfg.model)
        else:  # finetuned with the codebooks: the base weights are saved beside them
            model.base_model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            model.save_codebooks(out, base_model_name=".")  # moves with the folder
        write_json(out / "metrics.json", metrics)
        write_json(out / FINISHED_NAME, {  # last: marks the run finished
            "global_step": trainer.state.global_step, "max_steps": args.max_steps,
            "num_train_epochs": args.num_train_epochs})
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        metrics = read_json(out / "metrics.json")
    return metrics


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML/JSON config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. training.max_steps=100 codebooks.k=4")


@command("train", "finetune a causal LM with codebooks from a config file", _options)
def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    metrics = run_training(cfg)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # torchrun: every process got here
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:  # printed once
        print(json.dumps(metrics, indent=1))
    return 0
