"""The main job, ``codebook-features demo``: the paper's TokFSM experiment end to end (DESIGN §2).

1. Build a TokFSM and its tokenizer; train a GPT-NeoX-style model on it from scratch.
2. Finetune copies of it with codebooks: attention heads only (k=1), and attention + MLP at
   several k; every codebook is k-means initialised from the base model's activations.
3. Measure each model: LM loss, next-token accuracy, sampled state accuracy, first-transition
   accuracy.
4. Read the last layer's MLP codebook: each code's best state with precision and recall, the
   state codes, and the best neuron of the same layer thresholded to each code's recall.
5. Intervene: at a state boundary, replace state A's state codes by state B's and measure how
   much next-state probability moves to B's successors (and the JSD to B's behaviour).
6. Write ``report.json`` (every figure) and a self-contained ``report.html``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cli import command
from .errors import CodebookError
from .io import write_json


@dataclass
class DemoConfig:
    """Settings of the TokFSM demo (defaults: minutes on 2 CPU cores)."""

    out: str = "runs/demo"
    """Output folder (report.json, report.html, models)."""
    num_states: int = 40
    successors: int = 5
    states_per_sequence: int = 64
    seed: int = 0
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    mlp: int = 512
    batch: int = 32
    base_steps: int = 450
    base_lr: float = 3e-3
    finetune_steps: int = 150
    codebook_lr: float = 3e-3
    model_lr: float = 1e-3
    attn_codes: int = 500
    """Codes per attention-head codebook (per head)."""
    mlp_codes: int = 1000
    """Codes per MLP codebook."""
    ks: tuple[int, ...] = (1, 4, 16)
    """k of the attention + MLP variants."""
    eval_sequences: int = 100
    """Sampled sequences for state accuracy."""
    analysis_sequences: int = 400
    """Held-out sequences for the code and neuron statistics."""
    intervention_pairs: int = 200
    intervention_precision: float = 0.5
    """Precision (at state boundaries) above which a code counts as a state code when swapping."""
    threads: int = 0
    """torch threads (0: leave as is)."""
    variants: list[str] = field(default_factory=list)
    """Filled in: the names of the trained variants."""


PAPER = dict(num_states=100, successors=10, batch=64, base_steps=10_000, base_lr=1e-3,
             finetune_steps=5_000, attn_codes=2_000, mlp_codes=20_000, ks=(1, 4, 16, 128),
             eval_sequences=500)
"""The paper's setting (Table 1): 100 states, 10 successors; hours on a GPU."""


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_args(cls, out: Path, batch: int, seed: int, steps: int, lr: float, **kw: Any):
    """Trainer arguments of the demo jobs (``cls``: TrainingArguments or a subclass): no
    checkpoints, no reporting, CPU unless CUDA; ``kw`` adds or overrides settings."""
    settings: dict[str, Any] = dict(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(50, steps // 10), weight_decay=0.0, logging_steps=max(1, steps // 5),
        save_strategy="no", report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=False, log_level="warning")
    return cls(**{**settings, **kw})


def _train_args(cls, out: Path, cfg: DemoConfig, steps: int, lr: float, **kw: Any):
    return train_args(cls, out, cfg.batch, cfg.seed, steps, lr, **kw)


def _model_metrics(model: torch.nn.Module, fsm, eval_ds, cfg: DemoConfig) -> dict[str, float]:
    from . import fsm as fsm_metrics

    lm = fsm_metrics.lm_metrics(model, eval_ds, batch_size=64)
    return {
        "loss": round(lm.loss, 4),
        "lm_acc": round(lm.accuracy, 4),
        "state_acc": round(fsm_metrics.state_accuracy(model, fsm, cfg.eval_sequences,
                                                      seed=cfg.seed), 4),
        "first_transition_acc": round(fsm_metrics.first_transition_accuracy(
            model, fsm, exact=True), 4),
    }


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the whole experiment; returns the report (also written to ``cfg.out``)."""
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )
    from transformers.utils import logging as hf_logging

    from .data.tokfsm import TokFSM, TokFSMConfig, build_splits
    from .model import CodebookModel
    from .training import CodebookTrainer, CodebookTrainingArguments, kmeans_init_codebooks

    hf_logging.set_verbosity_error()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings: dict[str, float] = {}

    fsm = TokFSM(TokFSMConfig(num_states=cfg.num_states, successors=cfg.successors,
                              states_per_sequence=cfg.states_per_sequence, seed=cfg.seed))
    fsm.save(out / "fsm.json")
    tok = fsm.tokenizer()
    n_train = cfg.batch * max(cfg.base_steps, cfg.finetune_steps)
    splits = build_splits(fsm, n_train, max(cfg.analysis_sequences, 200), seed=cfg.seed)
    train_ds, eval_ds = splits["train"], splits["eval"]
    (out / "data").mkdir(exist_ok=True)
    for name, ds in splits.items():  # for `codebook-features train configs/tokfsm.yaml`
        tmp = out / "data" / f".{name}.parquet.tmp"
        ds.select_columns(["input_ids"]).to_parquet(str(tmp))
        os.replace(tmp, out / "data" / f"{name}.parquet")
    _log(f"{fsm!r}; {n_train} training sequences of {fsm.config.seq_len} tokens")

    # 1. Base model from scratch.
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    base_cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=cfg.hidden,
                             num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                             intermediate_size=cfg.mlp, max_position_embeddings=fsm.config.seq_len,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, rotary_pct=0.25)
    base = GPTNeoXForCausalLM(base_cfg)
    _log(f"training the base model ({sum(p.numel() for p in base.parameters()) / 1e6:.2f}M "
         f"parameters) for {cfg.base_steps} steps")
    Trainer(model=base, args=_train_args(TrainingArguments, out / "runs" / "base", cfg,
                                         cfg.base_steps, cfg.base_lr),
            train_dataset=train_ds, data_collator=default_data_collator).train()
    base.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    timings["base_train_s"] = time.time() - t0
    results: dict[str, dict[str, Any]] = {"base": _model_metrics(base, fsm, eval_ds, cfg)}
    _log(f"base: {results['base']}")

    # 2. Codebook variants, finetuned from the base model.
    variants = [("attn_k1", ["attn_heads"], 1)] + [
        (f"attn_mlp_k{k}", ["attn_heads", "mlp_out"], k) for k in cfg.ks]
    cfg.variants = [v[0] for v in variants]
    models: dict[str, CodebookModel] = {}
    kmeans_batches = [default_data_collator([train_ds[i] for i in range(j, j + cfg.batch)])
                      for j in range(0, 4 * cfg.batch, cfg.batch)]
    for name, placements, k in variants:
        t0 = time.time()
        cbm = CodebookModel(GPTNeoXForCausalLM.from_pretrained(out / "base"),
                            placements=placements, num_codes=cfg.attn_codes, k=k,
                            overrides={"mlp_out": {"num_codes": cfg.mlp_codes}})
        kmeans_init_codebooks(cbm, kmeans_batches, iters=10, seed=cfg.seed)
        _log(f"{name}: finetuning {len(cbm.sites)} codebooks ({', '.join(placements)}, k={k}) "
             f"for {cfg.finetune_steps} steps")
        args = _train_args(CodebookTrainingArguments, out / "runs" / name, cfg,
                           cfg.finetune_steps, cfg.model_lr,
                           codebook_learning_rate=cfg.codebook_lr,
                           dead_code_interval=max(10, cfg.finetune_steps // 5))
        trainer = CodebookTrainer(cbm, args, train_dataset=train_ds,
                                  data_collator=default_data_collator)
        trainer.train()
        cbm.eval()
        # The model weights were finetuned too: save them beside the codebooks.
        cbm.base_model.save_pretrained(out / name)
        cbm.save_codebooks(out / name, base_model_name=str(out / name))
        results[name] = _model_metrics(cbm.base_model, fsm, eval_ds, cfg)
        results[name]["codebook_mse"] = trainer.state.log_history[-2].get("codebook_mse")
        results[name]["dead_code_fraction"] = trainer.state.log_history[-2].get(
            "dead_code_fraction")
        timings[f"{name}_s"] = time.time() - t0
        _log(f"{name}: {results[name]}")
        models[name] = cbm

    # 3. State codes vs neurons, and interventions, on the attention + MLP k=1 model.
    t0 = time.time()
    analysis_model = models[f"attn_mlp_k{cfg.ks[0]}"]
    analysis = analyse_state_codes(analysis_model, fsm, eval_ds, cfg)
    timings["analysis_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start

    report = {
        "config": {**dataclasses.asdict(cfg), "fsm": fsm.to_dict()},
        "machine": {"cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "cores": os.cpu_count()},
        **results,
        **analysis,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    report["targets"] = check_targets(report, cfg)
    write_json(out / "report.json", report)
    from .report import write_demo_report

    write_demo_report(report, out / "report.html")
    _log(f"done in {timings['total_s']:.0f} s: {out / 'report.html'}")
    return report


@torch.no_grad()
def site_codes(cbm, ids: torch.Tensor, neuron_module: torch.nn.Module | None = None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """One pass over ``ids``: every site's codes as ``(positions, G, k)``, and the inputs of
    ``neuron_module`` (its neurons) as ``(positions, H)`` when given."""
    codes: dict[str, list[torch.Tensor]] = {n: [] for n in cbm.site_names}
    neurons: list[torch.Tensor] = []
    handle = (neuron_module.register_forward_pre_hook(
        lambda m, args: neurons.append(args[0].detach())) if neuron_module is not None else None)
    try:
        for i in range(0, len(ids), 64):
            cbm.base_model(input_ids=ids[i:i + 64])
            for n, layer in cbm.sites.items():
                codes[n].append(layer.last_codes)
    finally:
        if handle is not None:
            handle.remove()
    out = {n: torch.cat(c).reshape(-1, *c[0].shape[-2:]) for n, c in codes.items()}
    acts = torch.cat(neurons).reshape(len(ids) * ids.shape[1], -1) if neurons else None
    return out, acts


@torch.no_grad()
def analyse_state_codes(cbm, fsm, eval_ds, cfg: DemoConfig) -> dict[str, Any]:
    """State codes of the last layer's MLP codebook, the neuron baseline, interventions."""
    from . import fsm as fm
    from . import sites as sites_mod

    last = cfg.layers - 1
    site = f"layers.{last}.mlp_out"
    layer = cbm.site(site)
    ids = torch.tensor(eval_ds["input_ids"][: cfg.analysis_sequences])
    states = fsm.decode(ids)
    pos_states, _ = fsm.position_states(states)
    # Neurons of the same layer: the MLP's hidden activations (input of its down projection).
    hidden_site = sites_mod.find_sites(cbm.base_model, ["mlp_hidden"], [last])[0]
    all_codes, acts = site_codes(cbm, ids, cbm.base_model.get_submodule(hidden_site.module))
    codes = all_codes[site][:, 0]  # (positions, k): the MLP codebook has one group
    flat_states = pos_states.reshape(-1)
    stats = fm.code_state_precision(codes, flat_states, layer.config.num_codes,
                                    num_states=fsm.num_states)
    sc = stats.state_codes
    neuron_prec, _ = fm.neuron_precision_at_code_recall(acts, flat_states, stats.best_state[sc],
                                                        stats.recall[sc])
    code_prec = stats.precision[sc]
    state_codes = {
        "site": site,
        "count": int(sc.numel()),
        "states_covered": stats.states_covered(),
        "num_states": fsm.num_states,
        "mean_precision": round(float(code_prec.mean()), 4) if sc.numel() else None,
        "mean_recall": round(float(stats.recall[sc].mean()), 4) if sc.numel() else None,
        "precisions": [round(float(x), 4) for x in code_prec],
    }
    neuron_summary = {
        "layer": last,
        "count": int(acts.shape[1]),
        "mean_precision": round(float(neuron_prec.nanmean()), 4) if sc.numel() else None,
        "precisions": [round(float(x), 4) for x in neuron_prec],
    }
    intervention = intervene_states(cbm, fsm, ids, all_codes, cfg)
    return {"state_codes": state_codes, "neurons": neuron_summary, "intervention": intervention}


@torch.no_grad()
def digit_state_codes(cbm, fsm, ids: torch.Tensor, codes: dict[str, torch.Tensor],
                      precision_threshold: float = 0.9) -> dict[tuple[str, int, int], Any]:
    """State codes of every site, group and digit position of a state.

    ``codes``: every site's codes on ``ids`` (:func:`site_codes`). Returns
    ``(site, group, digit) -> CodeStateStats`` computed over the positions holding digit
    ``digit`` of a state (the last digit is where the next state is predicted).
    """
    from . import fsm as fm

    pos_states, digit = fsm.position_states(fsm.decode(ids))
    pos_states, digit = pos_states.reshape(-1), digit.reshape(-1)
    out = {}
    for n, c in codes.items():
        for d in range(fsm.digits):
            at = digit == d
            for g in range(c.shape[1]):
                out[(n, g, d)] = fm.code_state_precision(
                    c[at, g], pos_states[at], cbm.site(n).config.num_codes,
                    num_states=fsm.num_states, precision_threshold=precision_threshold,
                    min_activations=3)
    return out


@torch.no_grad()
def intervene_states(cbm, fsm, ids: torch.Tensor, codes: dict[str, torch.Tensor],
                     cfg: DemoConfig) -> dict[str, Any]:
    """Swap state A's state codes for state B's where A is written; measure the effect.

    For each (A, B) pair the prompt is a held-out sequence cut right after an occurrence of A.
    At each of A's digit positions, every site and group whose chosen codes include a state
    code of A for that digit (:func:`digit_state_codes`) has them replaced by that site's most
    frequent state code for B at the same digit. Pairs where nothing can be swapped are skipped.
    """
    from . import fsm as fm

    per_site = digit_state_codes(cbm, fsm, ids, codes, cfg.intervention_precision)
    top_code = {key: _top_code_per_state(st, fsm.num_states) for key, st in per_site.items()}
    a_codes = {key: [set(st.codes_for_state(a).tolist()) for a in range(fsm.num_states)]
               for key, st in per_site.items()}
    states = fsm.decode(ids)
    gen = torch.Generator().manual_seed(cfg.seed)
    befores, afters, pairs, swapped = [], [], [], []
    tries = 0
    while len(pairs) < cfg.intervention_pairs and tries < 20 * cfg.intervention_pairs:
        tries += 1
        row = int(torch.randint(len(ids), (1,), generator=gen))
        j = int(torch.randint(4, states.shape[1] - 1, (1,), generator=gen))
        a = int(states[row, j])
        b = int(torch.randint(fsm.num_states, (1,), generator=gen))
        if a < 0 or b == a or set(fsm.successors(a)) == set(fsm.successors(b)):
            continue
        prefix = ids[row, : 1 + fsm.digits * (j + 1)]
        end = prefix.shape[0] - fsm.digits  # position of A's first digit
        cbm.base_model(input_ids=prefix.unsqueeze(0))
        swaps, total = 0, 0
        for (n, g, d), top in top_code.items():
            layer = cbm.site(n)
            for slot, code in enumerate(layer.last_codes[0, end + d, g].tolist()):
                total += 1
                if code in a_codes[(n, g, d)][a] and top[b] >= 0:
                    layer.replace_code(int(top[b]), slot=slot, group=g, positions=[end + d])
                    swaps += 1
        if not swaps:
            cbm.clear_interventions()
            continue
        after = fm.next_state_probs(cbm.base_model, prefix, fsm)
        cbm.clear_interventions()
        befores.append(fm.next_state_probs(cbm.base_model, prefix, fsm))
        afters.append(after)
        pairs.append((a, b, row, j))
        swapped.append(swaps / total)
    if not pairs:
        return {"pairs": 0, "success": None, "note": "no state pairs with state codes found"}
    pb, pa = torch.stack(befores), torch.stack(afters)
    to_b = torch.stack([_mask(fsm.successors(b), fsm.num_states) for _, b, _, _ in pairs])
    to_a = torch.stack([_mask(fsm.successors(a), fsm.num_states) for a, _, _, _ in pairs])
    target = to_b.double() / to_b.sum(-1, keepdim=True)  # B's true next-state distribution
    mass_before, mass_after = fm.successor_mass(pb, to_b), fm.successor_mass(pa, to_b)
    mass_a_after = fm.successor_mass(pa, to_a)
    jsd_before, jsd_after = fm.js_divergence(pb, target), fm.js_divergence(pa, target)
    ex = int(mass_after.argsort()[len(pairs) // 2])  # a median example
    return {
        "pairs": len(pairs),
        "success": round(float(mass_after.mean()), 4),
        "median_success": round(float(mass_after.median()), 4),
        "mass_on_target_successors_before": round(float(mass_before.mean()), 4),
        "mass_on_source_successors_after": round(float(mass_a_after.mean()), 4),
        "jsd_before": round(float(jsd_before.mean()), 4),
        "jsd_after": round(float(jsd_after.mean()), 4),
        "share_of_codes_swapped": round(sum(swapped) / len(swapped), 4),
        "example": {"a": pairs[ex][0], "b": pairs[ex][1],
                    "a_successors": fsm.successors(pairs[ex][0]),
                    "b_successors": fsm.successors(pairs[ex][1]),
                    "before": [round(float(x), 4) for x in pb[ex]],
                    "after": [round(float(x), 4) for x in pa[ex]]},
    }


def _mask(successors, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[list(successors)] = True
    return m


def _top_code_per_state(stats, num_states: int) -> torch.Tensor:
    """For each state, its state code with the most activations (-1 if none)."""
    top = torch.full((num_states,), -1, dtype=torch.long)
    best = torch.full((num_states,), -1, dtype=torch.long)
    for code in stats.state_codes.tolist():
        s = int(stats.best_state[code])
        n = int(stats.activations[code])
        if n > best[s]:
            best[s], top[s] = n, code
    return top


def check_targets(report: dict[str, Any], cfg: DemoConfig) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was met."""
    def get(path: str):
        cur: Any = report
        for part in path.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        return cur

    base = get("base.state_acc")
    out = []

    def add(name: str, value, ok: bool | None) -> None:
        out.append({"target": name, "value": value, "met": ok})

    add("base state accuracy >= 0.90", base, base is not None and base >= 0.90)
    attn = get("attn_k1.state_acc")
    add("attention-only k=1 within 0.02 of the base", attn,
        None if attn is None or base is None else attn >= base - 0.02)
    k_accs = [get(f"attn_mlp_k{k}.state_acc") for k in cfg.ks]
    k1 = k_accs[0]
    add("attention+MLP k=1 clearly lower than the base (by > 0.02)", k1,
        None if k1 is None or base is None else k1 < base - 0.02)
    add("attention+MLP recovers as k grows", k_accs,
        None if None in k_accs else k_accs[-1] > k_accs[0])
    sp, npr = get("state_codes.mean_precision"), get("neurons.mean_precision")
    add("state codes' mean precision >= 0.90", sp, sp is not None and sp >= 0.90)
    add("state codes >= 0.20 above the best neurons", [sp, npr],
        None if sp is None or npr is None or math.isnan(npr) else sp - npr >= 0.20)
    succ = get("intervention.success")
    add("interventions move >= 80% of next-state probability to the target's successors",
        succ, succ is not None and succ >= 0.80)
    return out


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's setting (100 states, 10 successors, C up to 20k): a GPU job")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds, no targets)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override any DemoConfig field, e.g. --set base_steps=600 ks=1,8")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig(out=args.out)
    if args.paper:
        cfg = dataclasses.replace(cfg, **PAPER)
    if args.quick:
        cfg = dataclasses.replace(cfg, num_states=12, successors=3, states_per_sequence=16,
                                  hidden=32, layers=2, heads=2, mlp=64, batch=16, base_steps=20,
                                  finetune_steps=10, attn_codes=64, mlp_codes=64, ks=(1, 2),
                                  eval_sequences=10, analysis_sequences=64,
                                  intervention_pairs=10)
    return apply_overrides(cfg, args.set, frozen=("variants",))


def apply_overrides(cfg: Any, items: list[str], frozen: tuple[str, ...] = ()) -> Any:
    """``cfg`` (a dataclass) with ``KEY=VALUE`` settings applied; a tuple field takes
    comma-separated values of its elements' type."""
    fields = {f.name for f in dataclasses.fields(cfg)} - set(frozen)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise CodebookError(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                                f"{sorted(fields)}")
        current = getattr(cfg, key)
        try:
            if isinstance(current, tuple):
                kind = type(current[0]) if current else str
                parsed: Any = tuple(kind(v) for v in value.split(",") if v)
            elif isinstance(current, bool):
                parsed = value.lower() in ("1", "true", "yes")
            else:
                parsed = type(current)(value)
        except ValueError:
            raise CodebookError(f"--set {item!r}: {key} needs a {type(current).__name__}"
                                ) from None
        cfg = dataclasses.replace(cfg, **{key: parsed})
    return cfg


@command("demo", "the TokFSM experiment end to end: train, snap, read, intervene, report",
         _options)
def _demo(args: argparse.Namespace) -> int:
    report = run_demo(config_from_args(args))
    print(json.dumps({k: report[k] for k in ("base", *report["config"]["variants"])}, indent=1))
    for t in report["targets"]:
        flag = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        print(f"  [{flag}] {t['target']}: {t['value']}")
    return 0
