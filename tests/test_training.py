"""CodebookTrainer: optimizer groups, dead codes, logs, and resuming from a checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, TrainerCallback, default_data_collator

from codebook_features.model import CodebookModel
from codebook_features.training import (
    CodebookTrainer,
    CodebookTrainingArguments,
    kmeans_init_codebooks,
)


def make_model(seed: int = 0) -> CodebookModel:
    torch.manual_seed(seed)
    base = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64,
                                            max_position_embeddings=32))
    return CodebookModel(base, placements=["attn_heads", "mlp_out"], num_codes=32, k=2,
                         dead_code_window=2)


def make_data(n: int = 96) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(32, (n, 16), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def args(out, **kw) -> CodebookTrainingArguments:
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=8,
                learning_rate=1e-3, codebook_learning_rate=1e-2, dead_code_interval=2,
                report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=2,
                save_strategy="no", seed=0, data_seed=0)
    base.update(kw)
    return CodebookTrainingArguments(**base)


def state(model: CodebookModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_optimizer_groups_and_frozen_model(tmp_path):
    model = make_model()
    trainer = CodebookTrainer(model, args(tmp_path, freeze_model=True),
                              train_dataset=make_data(), data_collator=default_data_collator)
    opt = trainer.create_optimizer()
    assert [g["lr"] for g in opt.param_groups] == [1e-2]
    assert {id(p) for p in opt.param_groups[0]["params"]} == {
        id(p) for p in model.codebook_parameters()}
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    trainer.train()
    for k, v in model.base_model.state_dict().items():
        assert torch.equal(v, before[k]), k  # frozen
    logs = [h for h in trainer.state.log_history if "codebook_mse" in h]
    assert logs and all(h["codebook_mse"] > 0 for h in logs)
    assert "dead_code_fraction" in logs[-1] and "codes_replaced" in logs[-1]


def test_two_learning_rates(tmp_path):
    trainer = CodebookTrainer(make_model(), args(tmp_path), train_dataset=make_data(),
                              data_collator=default_data_collator)
    lrs = sorted({g["lr"] for g in trainer.create_optimizer().param_groups})
    assert lrs == [1e-3, 1e-2]


def test_kmeans_init_uses_base_activations():
    model = make_model()
    data = make_data()
    batch = default_data_collator([data[i] for i in range(64)])
    kmeans_init_codebooks(model, [batch], iters=5)
    model.eval()
    with torch.no_grad():
        model(**batch)
    mse_kmeans = float(model.codebook_loss())
    fresh = make_model()
    with torch.no_grad():
        fresh(**batch)
    assert mse_kmeans < 0.7 * float(fresh.codebook_loss())
    assert all(not layer.bypass and layer.recorded is None for layer in model.sites.values())


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resume_matches_uninterrupted_run(tmp_path):
    data = make_data()
    full = make_model()
    t_full = CodebookTrainer(full, args(tmp_path / "full"), train_dataset=data,
                             data_collator=default_data_collator)
    t_full.train()
    assert t_full._replaced > 0  # dead-code replacement is part of what must resume exactly

    first = make_model()
    t = CodebookTrainer(first, args(tmp_path / "cut", save_strategy="steps", save_steps=3),
                        train_dataset=data, data_collator=default_data_collator,
                        callbacks=[StopAt(3)])
    t.train()
    ckpt = tmp_path / "cut" / "checkpoint-3"
    assert (ckpt / "codebooks.safetensors").is_file() and (ckpt / "model.safetensors").is_file()

    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    CodebookTrainer(resumed, args(tmp_path / "cut", save_strategy="steps", save_steps=3),
                    train_dataset=data, data_collator=default_data_collator
                    ).train(resume_from_checkpoint=str(ckpt))
    want, got = state(full), state(resumed)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


class RecordLR(TrainerCallback):
    """The learning rate of every optimizer group used by each update."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        return control


def test_warmup_stable_decay_schedule_moves_both_learning_rates(tmp_path):
    rec = RecordLR()
    targs = args(tmp_path, max_steps=10, warmup_steps=3, dead_code_interval=0,
                 lr_scheduler_type="warmup_stable_decay",
                 lr_scheduler_kwargs={"num_decay_steps": 4, "decay_type": "linear"})
    trainer = CodebookTrainer(make_model(), targs, train_dataset=make_data(),
                              data_collator=default_data_collator, callbacks=[rec])
    trainer.train()

    def factor(step: int) -> float:  # linear warmup over 3, stable for 3, linear decay over 4
        if step < 3:
            return step / 3
        return 1.0 if step < 6 else (10 - step) / 4

    # Groups: codebooks (1e-2), then model weights with and without weight decay (1e-3).
    want = [[1e-2 * factor(s), 1e-3 * factor(s), 1e-3 * factor(s)] for s in range(10)]
    assert len(rec.lrs) == 10
    for s, (got, exp) in enumerate(zip(rec.lrs, want, strict=True)):
        assert got == pytest.approx(exp, rel=1e-9, abs=1e-15), f"step {s}"


def test_evaluate_matches_naive_loss_accuracy_and_code_usage(tmp_path):
    import torch.nn.functional as F

    model = make_model()
    data = make_data()
    eval_ds = make_data(40).select(range(24, 40))  # rows not trained on
    trainer = CodebookTrainer(model, args(tmp_path, max_steps=2), train_dataset=data,
                              eval_dataset=eval_ds, data_collator=default_data_collator)
    trainer.train()
    before = state(model)
    recent = {n: layer._recent.clone() for n, layer in model.sites.items()}
    model.train()
    metrics = trainer.evaluate()

    # Evaluation leaves the model as it was: mode, parameters, statistics, dead-code rows.
    assert model.training
    after = state(model)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    for n, layer in model.sites.items():
        assert torch.equal(layer._recent, recent[n]), n

    ids = torch.tensor(eval_ds["input_ids"])
    model.eval()

    def naive() -> tuple[float, float]:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        y = ids[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return float(loss), float((logits.argmax(-1) == y).float().mean())

    loss, acc = naive()
    used = {n: torch.zeros(layer.config.groups, layer.config.num_codes, dtype=torch.bool)
            for n, layer in model.sites.items()}
    for n, layer in model.sites.items():
        codes = layer.last_codes.reshape(-1, layer.config.groups, layer.config.k)
        for g in range(layer.config.groups):
            used[n][g, codes[:, g].unique()] = True
        assert metrics[f"eval_{n}/mse"] == pytest.approx(float(layer.last_mse), rel=1e-4)
        assert metrics[f"eval_{n}/dead_fraction"] == pytest.approx(
            1 - used[n].float().mean().item())
    with model.codebooks_disabled():
        loss0, acc0 = naive()
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx(acc)
    assert metrics["eval_without_codebooks_loss"] == pytest.approx(loss0, rel=1e-5)
    assert metrics["eval_without_codebooks_accuracy"] == pytest.approx(acc0)
    assert abs(loss - loss0) > 1e-4  # the two variants really differ
    logged = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert logged and logged[-1]["eval_without_codebooks_loss"] == metrics[
        "eval_without_codebooks_loss"]


BF16_LOSS_RTOL = 2e-3
"""bf16 keeps 8 significant bits (relative step 2**-8 = 0.4%); on these models the loss under
bf16 autocast differed from float32 by at most 9.2e-5 relative, codebook gradients by 3.1%
(norm)."""


def test_bf16_autocast_step_is_finite_and_close_to_float32():
    data = make_data()
    batch = default_data_collator([data[i] for i in range(32)])
    model = make_model()
    model.train()
    out = model(**batch)
    out.loss.backward()
    loss32 = float(out.loss.detach())
    grads32 = [p.grad.clone() for p in model.codebook_parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert float(out.loss.detach()) == pytest.approx(loss32, rel=BF16_LOSS_RTOL)
    for p, g32 in zip(model.codebook_parameters(), grads32, strict=True):
        assert p.dtype == torch.float32 and p.grad is not None
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        assert float((p.grad - g32).norm() / g32.norm()) < 0.1


def test_bf16_training_on_cpu_tracks_float32(tmp_path):
    runs = {}
    for bf16 in (False, True):
        model = make_model()
        trainer = CodebookTrainer(model, args(tmp_path / str(bf16), bf16=bf16, max_steps=8),
                                  train_dataset=make_data(), data_collator=default_data_collator)
        trainer.train()
        runs[bf16] = [h for h in trainer.state.log_history if "loss" in h]
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert [h["step"] for h in runs[True]] == [2, 4, 6, 8]
    for h32, h16 in zip(runs[False], runs[True], strict=True):
        assert math.isfinite(h16["loss"]) and h16["codebook_mse"] > 0
        assert h16["loss"] == pytest.approx(h32["loss"], rel=1e-2)
        assert h16["codebook_mse"] == pytest.approx(h32["codebook_mse"], rel=0.1)


def test_codebook_search_ignores_autocast():
    """Under bf16 autocast the codes are those of a float32 search (a bf16 similarity matmul
    changed about 9% of them before the search stopped following autocast)."""
    model = make_model()
    layer = next(iter(model.sites.values()))
    a = torch.randn(512, layer.config.dim, generator=torch.Generator().manual_seed(0))
    x = layer.normalize(a).reshape(-1, layer.config.groups, layer.config.group_dim)
    want = layer.search(x).codes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer.search(x).codes
    assert torch.equal(got, want)


def _accumulation_run(tmp_path, batch: int, accumulation: int) -> CodebookTrainer:
    model = make_model().double()  # float64: only the order of gradient sums differs
    trainer = CodebookTrainer(
        model, args(tmp_path / f"ga{accumulation}", max_steps=6, per_device_train_batch_size=batch,
                    gradient_accumulation_steps=accumulation, dead_code_interval=2),
        train_dataset=make_data(), data_collator=default_data_collator)
    trainer.train()
    return trainer


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    """Accumulating 2 batches of 8 trains what one batch of 16 does: the same weights,
    codebooks and statistics (an optimizer step counts once for the dead-code clock, a code
    that fired in any micro-batch fired in that step, replacements draw from the whole batch,
    and the MSE gradient is the whole batch's mean)."""
    one = _accumulation_run(tmp_path, 16, 1)
    two = _accumulation_run(tmp_path, 8, 2)
    assert one._replaced > 0 and two._replaced == one._replaced
    want, got = state(one.codebook_model), state(two.codebook_model)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9,
                                   msg=lambda m, k=k: f"{k}: {m}")
    for name, layer in one.codebook_model.sites.items():
        assert int(layer.step) == 6, name  # one per optimizer step
        torch.testing.assert_close(two.codebook_model.site(name)._recent, layer._recent)
    logs = [[h["codebook_mse"] for h in t.state.log_history if "codebook_mse" in h]
            for t in (one, two)]
    assert logs[1] == pytest.approx(logs[0], rel=1e-9)


def _checkpoints(out) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir())


@pytest.mark.parametrize("crash_in", ["codebooks", "rng_state", "trainer_state"])
def test_crash_inside_a_checkpoint_save_leaves_no_checkpoint_folder(tmp_path, monkeypatch,
                                                                    crash_in):
    """A save that dies part-way (after the codebooks, before the RNG state, or while writing
    the trainer state, the last file) leaves no ``checkpoint-6`` folder: only a hidden staging
    folder, which neither Hugging Face's ``get_last_checkpoint`` nor ours picks up. Resuming
    from the last checkpoint ends exactly like the uninterrupted run, and the next save
    deletes the half-written staging folder."""
    from transformers import Trainer
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import get_last_checkpoint

    from codebook_features.training import last_complete_checkpoint

    data = make_data()
    full = make_model()
    CodebookTrainer(full, args(tmp_path / "full"), train_dataset=data,
                    data_collator=default_data_collator).train()

    class Crash(Exception):
        pass

    def crashing(real, write_first: bool):
        def f(self, path, *a, **kw):
            if "checkpoint-6" not in str(path):
                return real(self, path, *a, **kw)
            if write_first:
                real(self, path, *a, **kw)
            if crash_in == "trainer_state":  # half a JSON file, then the crash
                Path(path).write_text('{"best_metric": 0.5, "log_his')
            raise Crash(crash_in)
        return f

    target = {"codebooks": (CodebookModel, "save_codebooks", True),
              "rng_state": (Trainer, "_save_rng_state", False),
              "trainer_state": (TrainerState, "save_to_json", False)}[crash_in]
    cut_args = dict(save_strategy="steps", save_steps=3)
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(target[0], target[1], crashing(getattr(target[0], target[1]), target[2]))
        with pytest.raises(Crash):
            CodebookTrainer(make_model(), args(out, **cut_args), train_dataset=data,
                            data_collator=default_data_collator).train()
    assert _checkpoints(out) == [".tmp-checkpoint-6", "checkpoint-3"]
    staged = out / ".tmp-checkpoint-6" / "checkpoint-6"
    assert (staged / "codebooks.safetensors").is_file()  # the crash was mid-checkpoint
    ckpt = out / "checkpoint-3"
    assert get_last_checkpoint(str(out)) == str(ckpt) == last_complete_checkpoint(out)
    assert {"model.safetensors", "codebooks.safetensors", "codebook_model.json", "optimizer.pt",
            "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {
        p.name for p in ckpt.iterdir()}

    resumed = make_model(seed=123)
    CodebookTrainer(resumed, args(out, **cut_args), train_dataset=data,
                    data_collator=default_data_collator
                    ).train(resume_from_checkpoint=get_last_checkpoint(str(out)))
    assert _checkpoints(out) == ["checkpoint-3", "checkpoint-6"]  # staging folder gone
    want, got = state(full), state(resumed)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_atomic_checkpoints_keep_rotation_best_checkpoint_and_resave(tmp_path):
    """``save_total_limit`` rotation and the best checkpoint work with checkpoints renamed into
    place: two folders stay (the newest and the best), every one complete, no staging folder
    left, and no saved state names a staging path. Saving a step again replaces its folder."""
    import json

    from codebook_features.training import last_complete_checkpoint

    out = tmp_path / "run"
    t = CodebookTrainer(make_model(), args(out, save_strategy="steps", save_steps=1,
                                           save_total_limit=2, eval_strategy="steps",
                                           eval_steps=1, metric_for_best_model="loss",
                                           greater_is_better=False),
                        train_dataset=make_data(), eval_dataset=make_data(16),
                        data_collator=default_data_collator)
    t.train()
    best = t.state.best_model_checkpoint
    assert best is not None and ".tmp-" not in best and (out / Path(best).name).is_dir()
    kept = _checkpoints(out)
    assert len(kept) == 2 and "checkpoint-6" in kept and Path(best).name in kept, kept
    for name in kept:
        files = {p.name for p in (out / name).iterdir()}
        assert {"model.safetensors", "codebooks.safetensors", "codebook_model.json",
                "optimizer.pt", "trainer_state.json"} <= files, name
        saved = json.loads((out / name / "trainer_state.json").read_text())
        assert ".tmp-" not in json.dumps(saved), name
    saved = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert saved["best_model_checkpoint"] == best
    assert last_complete_checkpoint(out) == str(out / "checkpoint-6")
    before = (out / "checkpoint-6" / "codebooks.safetensors").stat().st_ino
    t._save_checkpoint(t.model, trial=None)  # the same step again: replaced whole
    assert _checkpoints(out) == kept
    assert (out / "checkpoint-6" / "codebooks.safetensors").stat().st_ino != before
