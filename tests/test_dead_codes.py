"""Dead codes at their boundaries: a code is dead exactly when ``dead_code_window`` steps have
passed since it last fired, and the trainer replaces exactly the dead codes at exactly the
optimizer steps ``dead_code_interval, 2 * dead_code_interval, ...`` (before the last step),
also with gradient accumulation and across a resume from a checkpoint.

The expectation is computed here from scratch (:func:`expected_replacements`): which codes
fired at each optimizer step (read from every training forward), a clock per code, and the
schedule; it is compared with the codebook rows that actually changed between an optimizer
update and the next training forward. ``tests/test_ddp.py`` applies the same check to two
processes.
"""

from __future__ import annotations

import torch
from test_training import args, make_data, make_model
from transformers import TrainerCallback, default_data_collator

from codebook_features import CodebookLayer
from codebook_features.model import CodebookModel
from codebook_features.training import CodebookTrainer

WINDOW = 2  # make_model's dead_code_window


# ------------------------------------------------------------------- one layer, by hand
def _one_hot_layer(window: int) -> CodebookLayer:
    """Four codes along the axes; an input ``e_j`` fires code j and only j."""
    layer = CodebookLayer(dim=4, num_codes=4, k=1, similarity="inner", layernorm=False,
                          dead_code_window=window).train()
    with torch.no_grad():
        layer.codebook.copy_(torch.eye(4).unsqueeze(0))
    return layer


def _fire(layer: CodebookLayer, code: int) -> None:
    layer(torch.eye(4)[code].repeat(3, 1))
    assert layer.last_codes.flatten().tolist() == [code] * 3


def test_dead_exactly_when_the_window_is_reached():
    w = 5
    layer = _one_hot_layer(w)
    _fire(layer, 1)  # step 1: code 1
    for step in range(2, w + 3):  # then code 0 at every step
        _fire(layer, 0)
        assert int(layer.step) == step
        dead = layer.dead_codes()[0].tolist()
        # code 1 last fired at step 1, codes 2 and 3 never (their clock starts at step 0)
        assert dead == [False, step - 1 >= w, step >= w, step >= w], step
    # the boundary itself, both sides: window - 1 steps is alive, window steps is dead
    layer.last_fired[0, 1] = layer.step - (w - 1)
    layer.last_fired[0, 2] = layer.step - w
    assert layer.dead_codes()[0, 1:3].tolist() == [False, True]
    assert layer.stats().dead_codes == 2 and layer.stats().dead_fraction == 0.5


def test_replacement_takes_exactly_the_dead_codes_and_restarts_their_clock():
    w = 3
    layer = _one_hot_layer(w)
    _fire(layer, 1)
    _fire(layer, 0)
    _fire(layer, 0)  # step 3: codes 2, 3 dead (3 steps), code 1 not (2 steps)
    before = layer.codebook.detach().clone()
    assert layer.replace_dead_codes(generator=torch.Generator().manual_seed(0)) == 2
    changed = (layer.codebook.detach() != before).any(-1)[0].tolist()
    assert changed == [False, False, True, True]
    assert layer.last_fired[0].tolist() == [3, 1, 3, 3]
    # replacements are recent inputs (e_0 here) plus noise of 1% of their spread
    rows = layer.codebook.detach()[0, 2:]
    assert float((rows - torch.eye(4)[0]).abs().max()) < 0.1
    assert layer.dead_codes()[0].tolist() == [False, False, False, False]
    layer(torch.eye(4)[0].repeat(3, 1))  # step 4 (fires code 0 or a copy): code 1 at 3 steps
    assert layer.dead_codes()[0].tolist() == [False, True, False, False]


# ------------------------------------------------------------- the trainer, recorded
class Recorder(TrainerCallback):
    """Per optimizer step: the codes each site fired in the step's training forwards (the
    union over micro-batches), and the codebook rows that changed after the optimizer's
    update and before the next training forward (or the end of training)."""

    def __init__(self, model: CodebookModel) -> None:
        self.model = model
        self.fired: dict[int, dict[str, torch.Tensor]] = {}
        self.replaced: dict[int, dict[str, torch.Tensor]] = {}
        self._step = 0
        self._snap: tuple[int, dict[str, torch.Tensor]] | None = None
        model.base_model.register_forward_pre_hook(self._on_forward)
        for name, layer in model.sites.items():
            layer.register_forward_hook(self._on_layer(name))

    def _books(self) -> dict[str, torch.Tensor]:
        return {n: layer.codebook.detach().clone() for n, layer in self.model.sites.items()}

    def _compare(self) -> None:
        if self._snap is not None:
            step, old = self._snap
            now = self._books()
            self.replaced[step] = {n: (now[n] != old[n]).any(-1) for n in old}
            self._snap = None

    def _on_forward(self, module, args) -> None:
        if module.training:
            self._compare()

    def _on_layer(self, name: str):
        def hook(layer: CodebookLayer, args, out) -> None:
            if not layer.training:
                return
            g, c = layer.config.groups, layer.config.num_codes
            mask = self.fired.setdefault(self._step, {}).setdefault(
                name, torch.zeros(g, c, dtype=torch.bool))
            codes = layer.last_codes.reshape(-1, g, layer.last_codes.shape[-1])
            for gi in range(g):
                mask[gi, codes[:, gi].reshape(-1)] = True
        return hook

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step + 1
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._snap = (state.global_step + 1, self._books())
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._compare()
        return control


def expected_replacements(fired: dict[int, dict[str, torch.Tensor]], window: int,
                          interval: int, max_steps: int
                          ) -> tuple[dict[int, dict[str, torch.Tensor]], int, int]:
    """The dead codes replaced at each optimizer step, from the codes that fired: a code's
    clock is the last step it fired or was replaced (0 at the start); at steps ``interval,
    2 * interval, ... < max_steps`` every code whose clock is ``window`` or more steps behind
    is replaced. Also returns how many codes sat exactly at the window (replaced) and one
    step short of it (kept) at replacement steps: the cases an off-by-one would change."""
    sites = list(fired[1])
    clock = {n: torch.zeros_like(fired[1][n], dtype=torch.long) for n in sites}
    want: dict[int, dict[str, torch.Tensor]] = {}
    at, short = 0, 0
    for step in range(1, max_steps + 1):
        for n in sites:
            clock[n][fired[step][n]] = step
        due = step % interval == 0 and step < max_steps
        want[step] = {}
        for n in sites:
            age = step - clock[n]
            dead = age >= window if due else torch.zeros_like(age, dtype=torch.bool)
            if due:
                at += int((age == window).sum())
                short += int((age == window - 1).sum())
            clock[n][dead] = step
            want[step][n] = dead
    return want, at, short


def check_replacements(fired, replaced, max_steps: int, interval: int,
                       window: int = WINDOW) -> int:
    """Every step's observed replacements equal the expected ones; returns the total."""
    want, at, short = expected_replacements(fired, window, interval, max_steps)
    assert at > 0 and short > 0, "no code at the window's boundary: the check would be blind"
    assert sorted(replaced) == list(range(1, max_steps + 1))
    total = 0
    for step in range(1, max_steps + 1):
        for n, dead in want[step].items():
            got = replaced[step][n]
            assert torch.equal(got, dead), (
                f"step {step}, {n}: replaced {got.nonzero().tolist()}, "
                f"dead {dead.nonzero().tolist()}")
            total += int(dead.sum())
    assert total > 0
    return total


def _train(out, callbacks=(), resume: str | None = None, **kw) -> tuple[CodebookTrainer,
                                                                          Recorder]:
    model = make_model(seed=123 if resume else 0)
    rec = Recorder(model)
    trainer = CodebookTrainer(model, args(out, **kw), train_dataset=make_data(),
                              data_collator=default_data_collator,
                              callbacks=[*callbacks])
    trainer.add_callback(rec)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec


def test_trainer_replaces_the_dead_codes_at_exactly_the_scheduled_steps(tmp_path):
    """Steps 3 and 6, not 9: the last step is a multiple of the interval, and replacing then
    would leave untrained codes in the final codebooks."""
    trainer, rec = _train(tmp_path, max_steps=9, dead_code_interval=3)
    total = check_replacements(rec.fired, rec.replaced, max_steps=9, interval=3)
    assert trainer._replaced == total


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    """Two micro-batches per optimizer step: the clock and the schedule count optimizer
    steps, and a code fired in either micro-batch fired at that step."""
    trainer, rec = _train(tmp_path, max_steps=7, dead_code_interval=3,
                          per_device_train_batch_size=4, gradient_accumulation_steps=2)
    total = check_replacements(rec.fired, rec.replaced, max_steps=7, interval=3)
    assert trainer._replaced == total
    for layer in trainer.codebook_model.sites.values():
        assert int(layer.step) == 7


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resumed_run_replaces_from_the_whole_history(tmp_path):
    """Stopped at step 4 (a checkpoint) and resumed in a fresh model: the replacements of
    step 6 follow from which codes fired before and after the checkpoint."""
    kw = dict(max_steps=7, dead_code_interval=3, save_strategy="steps", save_steps=4)
    _, first = _train(tmp_path, callbacks=[StopAt(4)], **kw)
    assert sorted(first.fired) == [1, 2, 3, 4]
    _, second = _train(tmp_path, resume=str(tmp_path / "checkpoint-4"), **kw)
    assert sorted(second.fired) == [5, 6, 7]
    check_replacements({**first.fired, **second.fired}, {**first.replaced, **second.replaced},
                       max_steps=7, interval=3)
