"""``codebook-features compare``: its options, its data and the run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import CodebookError
from ..io import writable_dir
from .comparison import DEFAULT_TOPICS, CompareConfig, compare_site
from .report import format_report
from .site import check_sae


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("codebooks", help="folder written by save_codebooks (e.g. runs/stories/model)")
    p.add_argument("config", help="a training config (its model and data sections are used)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--site", required=True, help="the codebook site, e.g. layers.0.attn_heads")
    p.add_argument("--out", required=True, help="folder for report.json/html/md, sae/, codebook/")
    p.add_argument("--steps", type=int, default=1000, help="SAE training steps (%(default)s)")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="activations per training step (%(default)s)")
    p.add_argument("--max-train-tokens", type=int, default=1_000_000,
                   help="training activations recorded (%(default)s)")
    p.add_argument("--max-docs", type=int, default=500,
                   help="held-out documents for evaluation, search and steering "
                        "(%(default)s; the eval split's first, else the split's first, held "
                        "out of training)")
    p.add_argument("--topics", default=",".join(DEFAULT_TOPICS),
                   help="comma-separated topics (%(default)s); their regex: the story "
                        "topic's words, or the topic as a word")
    p.add_argument("--codes-per-topic", type=int, default=4)
    p.add_argument("--samples-per-prompt", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--sae", help="a sparsify SAE folder (cfg.json, sae.safetensors) to compare "
                                 "instead of training one; its sizes must match")
    p.add_argument("--device", help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0)


def load_data(d: Any, tokenizer: Any, max_docs: int) -> tuple[Any, Any, list[str]]:
    """(training rows, evaluation rows, held-out documents) from a config's data section."""
    from ..data.text import load_text, pack, take_rows

    col = d.text_column
    text = load_text(d.dataset, d.files, d.config, d.split, col, d.streaming)
    if d.eval_split:
        held = take_rows(load_text(d.dataset, d.files, d.config, d.eval_split, col,
                                   d.streaming), max_docs)
        train_text = text
    elif d.streaming:
        held, train_text = take_rows(text, max_docs), text.skip(max_docs)
    else:
        if len(text) < 2:
            raise CodebookError(f"{len(text)} document(s): too few to train and hold out")
        n = min(max_docs, len(text) // 5 or 1)
        held, train_text = text.select(range(n)), text.select(range(n, len(text)))
    texts = [t for t in held[col] if t and t.strip()]
    eval_rows = take_rows(pack(held, tokenizer, d.seq_len, col), d.max_eval_rows)
    train_rows = pack(train_text, tokenizer, d.seq_len, col)
    if d.streaming:
        train_rows = take_rows(train_rows, d.max_train_rows or 10_000)
    if len(eval_rows) == 0 or len(train_rows) == 0 or not texts:
        raise CodebookError(f"no {'evaluation' if len(eval_rows) == 0 else 'training'} rows "
                            f"of {d.seq_len} tokens; lower data.seq_len or add text")
    return train_rows, eval_rows, texts


def run(args: argparse.Namespace) -> int:
    from ..evaluation.job import model_and_tokenizer
    from ..sae import require_sparsify
    from ..training.config import load_config

    sparsify = require_sparsify()  # missing extra: one line before any work
    cfg = load_config(args.config, args.overrides)
    if not Path(args.codebooks).is_dir():
        raise CodebookError(f"codebook folder {args.codebooks} not found")
    out = writable_dir(args.out)
    model, tokenizer = model_and_tokenizer(args.codebooks, cfg)
    layer = model.site(args.site)  # unknown site: one line naming the sites
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise CodebookError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    sae = None
    if args.sae:
        if not (Path(args.sae) / "cfg.json").is_file():
            raise CodebookError(f"--sae {args.sae}: no sparsify SAE there (cfg.json, "
                                "sae.safetensors)")
        sae = sparsify.SparseCoder.load_from_disk(args.sae,
                                                  device=next(model.parameters()).device)
        check_sae(sae, layer, args.site)
    topics = tuple(t.strip() for t in args.topics.split(",") if t.strip())
    if not topics:
        raise CodebookError("--topics: give at least one topic")
    train_rows, eval_rows, texts = load_data(cfg.data, tokenizer, args.max_docs)
    ccfg = CompareConfig(site=args.site, steps=args.steps, batch_tokens=args.batch_tokens,
                         max_train_tokens=args.max_train_tokens, eval_batch=args.batch_size,
                         topics=topics, max_length=cfg.data.seq_len,
                         codes_per_topic=args.codes_per_topic,
                         samples_per_prompt=args.samples_per_prompt,
                         gen_tokens=args.gen_tokens, seed=args.seed)
    report = compare_site(model, tokenizer, train_rows, eval_rows, texts, ccfg, out, sae)
    print(format_report(report))
    print(json.dumps({"report": str(out / "report.json"), "html": str(out / "report.html")}))
    return 0
