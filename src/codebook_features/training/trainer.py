"""Training codebook models with the Hugging Face ``Trainer``.

``CodebookTrainer`` adds what codebooks need to a stock Trainer: separate learning rates for
codebooks and model weights (or a frozen model), one learning-rate schedule for both, dead-code
replacement kept identical on every process, codebook metrics in the logs, evaluation with and
without codebooks, and checkpoints that hold the base weights (``save_pretrained``) and the
codebooks with their statistics (``save_codebooks``), so that an interrupted run resumes where
it stopped. Checkpoints are written atomically: into a hidden staging folder, renamed to
``checkpoint-N`` once complete."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..model import CodebookModel


@dataclass
class CodebookTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the codebook settings."""

    codebook_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the codebooks (default: learning_rate)."})
    freeze_model: bool = field(
        default=False, metadata={"help": "Train the codebooks only; the base model stays fixed."})
    dead_code_interval: int = field(
        default=100, metadata={"help": "Replace dead codes every this many optimizer steps "
                                       "(0: never)."})
    ddp_broadcast_buffers: bool | None = field(
        default=False, metadata={"help": "Keep off: each process keeps its own codebook usage "
                                         "statistics, which are combined when dead codes are "
                                         "replaced (broadcasting would drop them)."})
    dead_code_noise: float = field(
        default=0.01, metadata={"help": "Noise (relative to the inputs' std) added to "
                                        "replacement codes."})


def _dist() -> Any | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


@torch.no_grad()
def replace_dead_codes(model: CodebookModel, seed: int, noise: float = 0.01) -> int:
    """Replace every site's dead codes, the same way on every process; returns how many.

    With several processes, they first agree on which codes are dead (latest firing step,
    max-reduced) and gather every process's recent inputs in rank order, so each process draws
    the same replacements from the same global batch as a single process would.
    """
    dist = _dist()
    total = 0
    for i, layer in enumerate(model.sites.values()):
        inputs = layer._recent
        if dist is not None:
            dist.all_reduce(layer.last_fired, op=dist.ReduceOp.MAX)
            inputs = _gather_rows(dist, inputs, layer.codebook.device)
        if inputs is None:
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(layer.step) * 101 + i)
        total += layer.replace_dead_codes(inputs=inputs, noise=noise, generator=gen)
    return total


def _gather_rows(dist: Any, rows: torch.Tensor | None, device: torch.device
                 ) -> torch.Tensor | None:
    """Concatenate every process's ``rows`` in rank order (None if any process has none)."""
    n = torch.tensor([-1 if rows is None else rows.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    if any(int(s) < 0 for s in sizes):
        return None
    size = max(int(s) for s in sizes)
    padded = torch.zeros(size, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])


@torch.no_grad()
def kmeans_init_codebooks(model: CodebookModel, batches: Iterable[dict[str, Any]],
                          iters: int = 20, seed: int = 0) -> None:
    """Initialise every site's codebook by k-means on the base model's activations there.

    Runs ``batches`` (model inputs) with every codebook bypassed, so each site sees the
    activations of the model without codebooks, then k-means per site and group.
    """
    layers = list(model.sites.values())
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.recorded, layer.bypass = [], True
    try:
        for batch in batches:
            model(**batch)
        for i, layer in enumerate(layers):
            acts = torch.cat([r.reshape(-1, layer.config.dim) for r in layer.recorded])
            layer.kmeans_init(acts, iters=iters, seed=seed + 7919 * i)
            dist = _dist()
            if dist is not None:  # every process starts from rank 0's codes
                dist.broadcast(layer.codebook.data, src=0)
    finally:
        for layer in layers:
            layer.recorded, layer.bypass = None, False
        model.train(was_training)


def _tokens(batch: Any) -> int:
    """Token positions in a collated batch (what each codebook sees), 0 when unknown."""
    if isinstance(batch, dict):
        for key in ("input_ids", "inputs_embeds", "labels"):
            v = batch.get(key)
            if isinstance(v, torch.Tensor) and v.dim() >= 2:
                return int(v.shape[0] * v.shape[1])
    return 0


STAGING_PREFIX = ".tmp-"
"""A checkpoint is written into ``OUTPUT_DIR/.tmp-checkpoint-N/checkpoint-N`` and renamed to
``OUTPUT_DIR/checkpoint-N`` once complete (a hidden name that neither Hugging Face's
``get_last_checkpoint`` nor its checkpoint rotation matches)."""


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file under ``root``, and the folders, to the disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


def _move_into_place(src: str, dst: str) -> None:
    """Rename the complete folder ``src`` to ``dst``; an existing ``dst`` (the same step saved
    again) is first moved aside, then deleted. Either name is always a whole checkpoint."""
    import shutil

    if not os.path.exists(dst):
        os.rename(src, dst)
        return
    parent, name = os.path.split(dst)
    old = os.path.join(parent, f"{STAGING_PREFIX}old-{name}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose save finished, or None.

    ``CodebookTrainer`` writes checkpoints atomically (a staging folder renamed into place), so
    every ``checkpoint-N`` it leaves is complete. As a second guard (folders written otherwise:
    older versions, Hugging Face's JIT checkpoints, a file system without atomic renames), a
    checkpoint counts as complete only when its trainer state (written last by the Trainer)
    parses and its codebook config (written last by ``save_codebooks``) exists.
    """
    import json
    import re

    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if (path / "codebook_model.json").is_file():
            return str(path)
    return None


RUNTIME_SETTINGS = ("chunk_mib", "search_backend", "check_finite")
"""Codebook settings that change how codes are found, not which: free to change on resume."""


def check_checkpoint_config(checkpoint: str | os.PathLike, model: Any,
                            what: str = "the run to resume was started") -> None:
    """Raise a CodebookError naming the first codebook setting (``num_codes``, ``placements``,
    ...) in which ``model`` (a CodebookModel, or its CodebookModelConfig) differs from the
    checkpoint (or saved codebooks folder) it is to resume from."""
    from ..errors import CodebookError
    from ..io import read_json
    from ..model_config import CONFIG_NAME, CodebookModelConfig

    meta = read_json(Path(checkpoint) / CONFIG_NAME)
    raw = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(raw, dict):
        raise CodebookError(f"{checkpoint}: {CONFIG_NAME} holds no codebook config; the "
                            "checkpoint is corrupt, delete it to resume from an earlier one")
    build = getattr(CodebookModelConfig, "from_saved", CodebookModelConfig.from_dict)
    now = (model.codebook_config if isinstance(model, CodebookModel) else model).to_dict()
    saved = build(raw).to_dict()
    for key in sorted(set(saved) | set(now)):
        if key not in RUNTIME_SETTINGS and saved.get(key) != now.get(key):
            raise CodebookError(
                f"{checkpoint}: {what} with codebooks.{key}="
                f"{saved.get(key)!r}, the config now has {now.get(key)!r}; set codebooks.{key} "
                "back to resume it, or pass a new training.output_dir to start over")


class DeadCodeCallback(TrainerCallback):
    """Calls :func:`replace_dead_codes` every ``dead_code_interval`` optimizer steps."""

    def __init__(self, trainer: CodebookTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        every = getattr(args, "dead_code_interval", 0)
        if every and state.global_step % every == 0 and state.global_step < state.max_steps:
            n = replace_dead_codes(self.trainer.codebook_model, args.seed, args.dead_code_noise)
            self.trainer._replaced += n
        return control


class CodebookTrainer(Trainer):
    """A ``Trainer`` for a :class:`CodebookModel`.

    The loss is the LM loss alone: each codebook's backward already adds the gradient of
    ``lambda * MSE`` to its codes. Logs add ``codebook_mse`` (the summed site MSE averaged
    since the last log), ``dead_code_fraction`` and ``codes_replaced``. With gradient
    accumulation, the micro-batches of an optimizer step train and count as one batch.
    """

    def __init__(self, model: CodebookModel, args: TrainingArguments, **kwargs: Any) -> None:
        if not isinstance(model, CodebookModel):
            raise TypeError("CodebookTrainer needs a CodebookModel")
        if getattr(args, "freeze_model", False):
            model.freeze_base()
        super().__init__(model=model, args=args, **kwargs)
        self.codebook_model = model
        self._mse_sum: torch.Tensor | float = 0.0  # stays on the device: no per-step sync
        self._mse_n = 0
        self._replaced = 0
        # Gradient accumulation: the tokens of each micro-batch of the coming optimizer step
        # (from get_batch_samples), the next one's index, and the share of the step's MSE
        # gradient the current micro-batch carries.
        self._micro_tokens: list[int] | None = None
        self._micro_index = 0
        self._mse_share = 1.0
        self._step_start: list[int] = []
        self._recent_parts: list[list[torch.Tensor]] = []
        self.add_callback(DeadCodeCallback(self))

    # The model's forward takes **kwargs: read the dataset columns off the base model.
    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            import inspect

            params = inspect.signature(self.codebook_model.base_model.forward).parameters
            self._signature_columns = list(params) + ["label", "label_ids", "labels"]

    def create_optimizer(self, model: nn.Module | None = None):
        if self.optimizer is not None:
            return self.optimizer
        m = self.codebook_model
        args = self.args
        decay = set(self.get_decay_parameter_names(m.base_model))
        base = [(n, p) for n, p in m.base_model.named_parameters() if p.requires_grad]
        cb_lr = getattr(args, "codebook_learning_rate", None) or args.learning_rate
        groups = [
            {"params": [p for p in m.codebook_parameters() if p.requires_grad],
             "weight_decay": 0.0, "lr": cb_lr},
            {"params": [p for n, p in base if n in decay], "weight_decay": args.weight_decay,
             "lr": args.learning_rate},
            {"params": [p for n, p in base if n not in decay], "weight_decay": 0.0,
             "lr": args.learning_rate},
        ]
        groups = [g for g in groups if g["params"]]
        cls, kwargs = self.get_optimizer_cls_and_kwargs(args, m)
        kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
        self.optimizer = cls(groups, lr=args.learning_rate, **kwargs)
        return self.optimizer

    # Gradient accumulation: the micro-batches of one optimizer step act as one batch. Each
    # layer's backward adds the gradient of its micro-batch's mean MSE, so a micro-batch's
    # coefficient is scaled by its share of the step's tokens (the LM loss is already scaled by
    # num_items_in_batch); the statistics count the step once (the dead-code clock advances
    # by one, a code that fired in any micro-batch fired at that step) and the dead-code
    # replacements draw from every micro-batch's inputs.
    def get_batch_samples(self, *args: Any, **kwargs: Any):
        batches, num_items = super().get_batch_samples(*args, **kwargs)
        self._micro_tokens = [_tokens(b) for b in batches]
        self._micro_index = 0
        return batches, num_items

    def training_step(self, model, inputs, *args: Any, **kwargs: Any):
        plan, j = self._micro_tokens, self._micro_index
        if plan is None or len(plan) < 2 or j >= len(plan) or not all(plan):
            return super().training_step(model, inputs, *args, **kwargs)
        self._micro_index += 1
        layers = list(self.codebook_model.sites.values())
        if j == 0:
            self._step_start = [int(layer.step) for layer in layers]
            self._recent_parts = [[] for _ in layers]
        self._mse_share = plan[j] / sum(plan)
        try:
            loss = super().training_step(model, inputs, *args, **kwargs)
        finally:
            self._mse_share = 1.0
        self._fold_micro_batch_stats(layers)
        return loss

    @torch.no_grad()
    def _fold_micro_batch_stats(self, layers: list[Any]) -> None:
        from ..codebook import RECENT_ROWS

        for layer, start, parts in zip(layers, self._step_start, self._recent_parts,
                                       strict=True):
            if int(layer.step) == start:  # no statistics this micro-batch (bypassed, ...)
                continue
            layer.step.fill_(start + 1)
            layer.last_fired.clamp_(max=start + 1)
            if layer._recent is not None:
                parts.append(layer._recent)
                rows = torch.cat(parts) if len(parts) > 1 else parts[0]
                layer._recent = rows[:: max(1, -(-rows.shape[0] // RECENT_ROWS))]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        share = self._mse_share if model.training else 1.0
        configs = {id(layer.config): layer.config
                   for layer in self.codebook_model.sites.values()}.values()
        coeffs = [c.mse_coeff for c in configs]
        if share != 1.0:  # captured by each layer's forward for its backward
            for c in configs:
                c.mse_coeff = c.mse_coeff * share
        try:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        finally:
            for c, coeff in zip(configs, coeffs, strict=True):
                c.mse_coeff = coeff
        if model.training and self.codebook_model.enabled:
            self._mse_sum = self._mse_sum + self.codebook_model.codebook_loss()
            self._mse_n += 1
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._mse_n and "loss" in logs:
            logs["codebook_mse"] = round(float(self._mse_sum) / self._mse_n, 6)
            dead = [float(layer.dead_codes().float().mean())
                    for layer in self.codebook_model.sites.values()]
            logs["dead_code_fraction"] = round(sum(dead) / max(len(dead), 1), 4)
            logs["codes_replaced"] = self._replaced
            self._mse_sum = 0.0
            self._mse_n = 0
        super().log(logs, start_time)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Loss, accuracy and perplexity with and without codebooks, and every site's MSE,
        FVU, dead fraction and usage entropy (:func:`~codebook_features.evaluation.
        evaluate_codebooks`), logged as ``eval_loss``, ``eval_without_codebooks_loss``,
        ``eval_<site>/fvu``, ..., and the standard evaluation's ``all`` row (CE loss recovered,
        KL, explained variance, L0, alive: ``eval_standard/all/...``; per site alone in
        ``codebook-features eval``). The evaluation set is an in-memory dataset of packed
        rows."""
        from ..evaluation import evaluate_codebooks, flat_metrics

        ds = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(ds, dict):
            metrics: dict[str, float] = {}
            for name, part in ds.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        if ds is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        self._memory_tracker.start()
        start = time.time()
        result = evaluate_codebooks(self.codebook_model, ds, per_site=False,
                                    batch_size=self.args.per_device_eval_batch_size)
        metrics = flat_metrics(result, metric_key_prefix)
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control,
                                                         metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    # Checkpoints are atomic: written into a staging folder beside the final one (every
    # process's files, e.g. each rank's RNG state), flushed to disk, then renamed into place.
    # A run killed mid-save leaves only the staging folder, which resume never picks up and
    # the next save deletes. Rotation (save_total_limit) runs once the new one is in place.
    _staging_dir: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        import shutil

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f"{STAGING_PREFIX}{name}")
        written, target = os.path.join(staging, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(run_dir):  # killed saves' leftovers
            for leftover in Path(run_dir).glob(f"{STAGING_PREFIX}*{PREFIX_CHECKPOINT_DIR}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        if self.state.best_model_checkpoint == written:  # the best one is this one
            self.state.best_model_checkpoint = target
            if self.args.should_save:
                self.state.save_to_json(os.path.join(written, "trainer_state.json"))
        self.accelerator.wait_for_everyone()  # every process has written its files
        if self.args.should_save:
            self._finish_checkpoint(written, target, staging)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint,
                               use_mtime=True)
        self.accelerator.wait_for_everyone()
        if self.args.local_process_index == 0 and os.path.isdir(written):
            # a node whose disk is not the saving process's: its processes' RNG states
            self._finish_checkpoint(written, target, staging)

    @staticmethod
    def _finish_checkpoint(written: str, target: str, staging: str) -> None:
        import shutil

        from ..io import fault_point

        _fsync_tree(written)
        fault_point("checkpoint-staged")  # complete, not yet in place
        _move_into_place(written, target)
        shutil.rmtree(staging, ignore_errors=True)
        _fsync(os.path.dirname(target))
        fault_point("checkpoint")

    # Checkpoints: base weights with save_pretrained, codebooks (with statistics) beside them.
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.codebook_model.base_model.save_pretrained(output_dir)
        self.codebook_model.save_codebooks(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None
                              ) -> None:
        check_checkpoint_config(resume_from_checkpoint, self.codebook_model)
        loaded = CodebookModel.from_pretrained(resume_from_checkpoint,
                                               base_model=resume_from_checkpoint)
        target = self.codebook_model
        target.base_model.load_state_dict(loaded.base_model.state_dict())
        for name, layer in target.sites.items():
            layer.load_state_dict(loaded.site(name).state_dict())
