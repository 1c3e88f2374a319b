"""``codebook-features stories``: the natural-language path end to end, on generated stories.

1. Generate the topic-story corpus (:mod:`.corpus`) and train its BPE tokenizer.
2. Train a tiny GPT-NeoX on it from scratch (Hugging Face ``Trainer``; one story per row).
3. Add attention-head codebooks, k-means initialise them, finetune (``CodebookTrainer``).
4. Evaluate with and without codebooks (the paper's Table 2 rows) and the standard
   sparse-autoencoder evaluation (CE loss recovered, KL, explained variance, L0, alive codes;
   the code density plot ``code_density.png``).
5. Index the held-out stories' codes (for ``search`` and ``browse``).
6. Find each topic's codes (codes firing on the largest share of that topic's stories' tokens)
   and run the paper's topic-steering evaluation (Table 3): how often generations from short
   prompts mention the topic, steered against unsteered.
7. Write ``report.json``, ``table.md`` and the model (``DIR/model``: weights, tokenizer,
   codebooks, ``eval_metrics.json`` and the model card: ready for ``codebook-features push``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import CodebookError
from ...io import write_json, write_text
from ..settings import prepare_run


@dataclass
class StoryDemoConfig:
    """Settings of the story job (defaults: a few minutes on 2 CPU cores)."""

    out: str = "runs/stories"
    num_stories: int = 20000
    eval_stories: int = 500
    vocab: int = 1024
    seq_len: int = 128
    hidden: int = 128
    layers: int = 1
    heads: int = 4
    batch: int = 16
    base_steps: int = 600
    base_lr: float = 1e-2
    finetune_steps: int = 200
    model_lr: float = 1e-3
    codebook_lr: float = 1e-2
    num_codes: int = 512
    """Codes per attention head."""
    k: int = 8
    topics: tuple[str, ...] = ("dragon", "flower", "fire", "baby", "princess")
    codes_per_topic: int = 8
    """Codes forced on when steering towards a topic (the best-ranked ones). With k=8, 8 codes
    written over the weakest slots keep the stories fluent; 16 raise the mention rate to
    about 95% but overwrite whole heads and the text degrades."""
    steer_mode: str = "replace"
    samples_per_prompt: int = 16
    gen_tokens: int = 64
    seed: int = 0
    threads: int = 0
    """torch threads (0: leave as is)."""


QUICK = dict(num_stories=600, eval_stories=60, vocab=400, seq_len=64, hidden=32, heads=2,
             batch=8, base_steps=30, finetune_steps=10, num_codes=32, k=2, codes_per_topic=2,
             topics=("dragon", "flower"), samples_per_prompt=2, gen_tokens=16)
"""A seconds-long smoke run (figures meaningless)."""


def _log(msg: str) -> None:
    print(f"[stories {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _rows_dataset(tok: Any, stories: list[dict[str, Any]], seq_len: int):
    from datasets import Dataset

    from . import story_rows

    rows = story_rows(tok, stories, seq_len)
    return Dataset.from_dict({k: v.tolist() for k, v in rows.items()})


def _args(cls, out: Path, cfg: StoryDemoConfig, steps: int, lr: float, **kw: Any):
    from ..settings import train_args

    return train_args(cls, out, cfg.batch, cfg.seed, steps, lr,
                      lr_scheduler_type="warmup_stable_decay",
                      lr_scheduler_kwargs={"num_decay_steps": max(1, steps // 5)},
                      warmup_steps=max(1, steps // 20), weight_decay=0.01, adam_beta2=0.95,
                      max_grad_norm=1.0, **kw)


def run_stories(cfg: StoryDemoConfig) -> dict[str, Any]:
    """Run the whole story job; returns the report (also written to ``cfg.out``)."""
    from ...io import quiet_transformers

    with quiet_transformers(bars=True):  # transformers' warnings are not the report
        return _run_stories(cfg)


def _run_stories(cfg: StoryDemoConfig) -> dict[str, Any]:
    import transformers as T

    from ...analysis import build_index
    from ...evaluation import evaluate_codebooks, format_table
    from ...lm import lm_metrics
    from ...model import CodebookModel
    from ...modelcard import refresh_model_card
    from ...report import write_code_density_plot
    from ...steering import (
        DEFAULT_PROMPTS,
        format_steering_table,
        rank_topic_codes,
        topic_steering_eval,
    )
    from ...training import CodebookTrainer, CodebookTrainingArguments, kmeans_init_codebooks
    from . import (
        StoryConfig,
        generate_stories,
        tiny_story_model_config,
        train_story_tokenizer,
        write_corpus,
    )

    out = prepare_run(cfg.out, cfg.threads)  # unwritable: one line before any work
    t_start = time.time()
    timings: dict[str, float] = {}

    train_stories = generate_stories(StoryConfig(num_stories=cfg.num_stories, seed=cfg.seed))
    eval_stories = generate_stories(StoryConfig(num_stories=cfg.eval_stories,
                                                seed=cfg.seed + 1))
    write_corpus(out / "stories.txt", train_stories)
    tok = train_story_tokenizer(train_stories, cfg.vocab, model_max_length=cfg.seq_len)
    train_ds = _rows_dataset(tok, train_stories, cfg.seq_len)
    eval_ds = _rows_dataset(tok, eval_stories, cfg.seq_len)
    _log(f"{len(train_stories)} stories ({sum(map(sum, train_ds['attention_mask']))} tokens), "
         f"vocabulary {len(tok)}")

    # 1. Base model from scratch.
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    base = T.GPTNeoXForCausalLM(tiny_story_model_config(
        tok, hidden_size=cfg.hidden, num_layers=cfg.layers, num_heads=cfg.heads,
        max_position_embeddings=max(cfg.seq_len, cfg.gen_tokens + 16)))
    _log(f"training the base model ({sum(p.numel() for p in base.parameters()) / 1e6:.2f}M "
         f"parameters) for {cfg.base_steps} steps")
    T.Trainer(model=base, args=_args(T.TrainingArguments, out / "runs" / "base", cfg,
                                     cfg.base_steps, cfg.base_lr),
              train_dataset=train_ds, data_collator=T.default_data_collator).train()
    base.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    timings["base_train_s"] = time.time() - t0
    lm = lm_metrics(base.eval(), eval_ds, batch_size=cfg.batch)
    base_row = {"loss": lm.loss, "accuracy": lm.accuracy, "perplexity": math.exp(lm.loss)}

    # 2. Codebooks on every attention head, finetuned with the model.
    t0 = time.time()
    cbm = CodebookModel(T.GPTNeoXForCausalLM.from_pretrained(out / "base"),
                        placements=["attn_heads"], num_codes=cfg.num_codes, k=cfg.k)
    kmeans_batches = [T.default_data_collator([train_ds[i] for i in range(j, j + cfg.batch)])
                      for j in range(0, 8 * cfg.batch, cfg.batch)]
    kmeans_init_codebooks(cbm, kmeans_batches, iters=10, seed=cfg.seed)
    _log(f"finetuning {len(cbm.sites)} codebook site(s) ({cfg.num_codes} codes per head, "
         f"k={cfg.k}) for {cfg.finetune_steps} steps")
    args = _args(CodebookTrainingArguments, out / "runs" / "codebooks", cfg,
                 cfg.finetune_steps, cfg.model_lr, codebook_learning_rate=cfg.codebook_lr,
                 dead_code_interval=max(10, cfg.finetune_steps // 5))
    CodebookTrainer(cbm, args, train_dataset=train_ds,
                    data_collator=T.default_data_collator).train()
    cbm.eval()
    model_dir = out / "model"
    cbm.base_model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cbm.save_codebooks(model_dir, base_model_name=".")  # the base is saved beside them
    timings["finetune_s"] = time.time() - t0

    # 3. Table 2 rows.
    t0 = time.time()
    metrics = evaluate_codebooks(cbm, eval_ds, batch_size=cfg.batch)
    metrics["base_model"] = base_row
    table = format_table(metrics).replace(
        "|---|---|---|---|\n", "|---|---|---|---|\n| Base model (before codebooks) | "
        f"{base_row['loss']:.3f} | {100 * base_row['accuracy']:.2f} | "
        f"{base_row['perplexity']:.2f} |\n", 1)
    _log("evaluation (Without codebooks: the finetuned weights, codebooks bypassed):\n"
         + table)
    write_json(model_dir / "eval_metrics.json", metrics)
    refresh_model_card(model_dir)  # the model card shows the evaluation
    write_code_density_plot(metrics["code_density"], out / "code_density.png")
    timings["eval_s"] = time.time() - t0

    # 4. Index of the held-out stories, for search and browse.
    t0 = time.time()
    eval_texts = [s["text"] for s in eval_stories]
    build_index(cbm, tok, eval_texts, out / "index", batch_size=cfg.batch)
    timings["index_s"] = time.time() - t0

    # 5. Topic codes and steering.
    t0 = time.time()
    labels = [s["topic"] for s in eval_stories]
    ranked = rank_topic_codes(cbm, tok, eval_texts, labels, top=cfg.codes_per_topic,
                              max_length=cfg.seq_len)
    missing = [t for t in cfg.topics if t not in ranked]
    if missing:
        raise CodebookError(f"no held-out stories about {missing}; raise eval_stories")
    steer = {t: [c.steer_code for c in ranked[t]] for t in cfg.topics}
    rows, samples = topic_steering_eval(
        cbm, tok, steer, prompts=DEFAULT_PROMPTS, samples_per_prompt=cfg.samples_per_prompt,
        max_new_tokens=cfg.gen_tokens, mode=cfg.steer_mode, seed=cfg.seed)
    steering_table = format_steering_table(rows)
    _log("topic steering:\n" + steering_table)
    timings["steering_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start

    report = {
        "config": dataclasses.asdict(cfg),
        "eval": metrics,
        "topic_codes": {t: [dataclasses.asdict(c) for c in ranked[t]] for t in cfg.topics},
        "steering": [r.to_dict() for r in rows],
        "samples": {k: {p: v[:2] for p, v in d.items()} for k, d in samples.items()},
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    write_json(out / "report.json", report)
    write_text(out / "table.md", f"{table}\n\n![code density](code_density.png)\n\n"
               f"{steering_table}\n")
    _log(f"done in {timings['total_s']:.0f} s: {out / 'report.json'}; browse the codes with "
         f"`codebook-features browse {out / 'index'} --model {model_dir}`")
    return report


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/stories", help="output folder (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set base_steps=300 topics=dragon,fire")


def config_from_args(args: argparse.Namespace) -> StoryDemoConfig:
    from ..settings import apply_overrides

    cfg = StoryDemoConfig(out=args.out)
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    return apply_overrides(cfg, args.set)


def run(args: argparse.Namespace) -> int:
    report = run_stories(config_from_args(args))
    print(json.dumps({"eval": {k: report["eval"][k] for k in ("with_codebooks",
                                                               "without_codebooks")},
                      "steering": report["steering"]}, indent=1))
    return 0
