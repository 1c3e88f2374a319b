"""``codebook-features train CONFIG [key=value ...]``: finetune any causal LM with codebooks.

The config is read and checked by :mod:`.config`; this module builds the datasets, trains
with :class:`~codebook_features.training.trainer.CodebookTrainer` (resuming an interrupted
run, leaving a finished one alone), evaluates and writes ``OUTPUT_DIR/final``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import CodebookError
from .config import STREAM_EVAL_ROWS, TrainConfig, _first_line, load_config, training_arguments
from .network import check_model_source, wandb_offline_unless_logged_in


def _model_positions(model_config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        v = getattr(model_config, name, None)
        if isinstance(v, int):
            return v
    return None


def build_datasets(cfg: TrainConfig, tokenizer: Any, seed: int) -> tuple[Any, Any]:
    """Packed training rows (a ``Dataset``, or an ``IterableDataset`` when streaming) and
    in-memory evaluation rows."""
    from ..data.text import load_text, pack, take_rows, token_rows

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
    from ..io import read_json
    from .trainer import last_complete_checkpoint

    final = Path(args.output_dir) / "final"
    if not (final / FINISHED_NAME).is_file() or not (final / "metrics.json").is_file():
        return None
    from ..model_config import CodebookModelConfig
    from .trainer import check_checkpoint_config

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
    from ..io import writable_dir

    # a read-only folder or a file in the way: one line before any work (nothing created)
    writable_dir(args.output_dir, create=False)
    from ..io import progress_bars

    with progress_bars(not args.disable_tqdm):
        return _run_training(cfg, args)


def _run_training(cfg: TrainConfig, args: Any) -> dict[str, Any]:
    from transformers import AutoConfig, default_data_collator

    from ..data.text import take_rows
    from ..evaluation import evaluate_codebooks
    from ..io import load_tokenizer, read_json, write_json
    from ..model import CodebookModel
    from ..model_config import CodebookModelConfig, load_base_model
    from .trainer import CodebookTrainer, kmeans_init_codebooks, last_complete_checkpoint

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


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML/JSON config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. training.max_steps=100 codebooks.k=4")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    metrics = run_training(cfg)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # torchrun: every process got here
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:  # printed once
        print(json.dumps(metrics, indent=1))
    return 0
