"""CodebookTrainer: optimizer groups, dead codes, logs, and resuming from a checkpoint."""

from __future__ import annotations

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
