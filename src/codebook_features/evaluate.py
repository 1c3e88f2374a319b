"""``codebook-features eval``: a saved codebook model on a dataset, in the paper's Table 2 form.

Reports LM loss, next-token accuracy and perplexity with and without the codebooks, and per
site the reconstruction MSE, fraction of variance unexplained, dead-code fraction (codes that
never fired on the evaluation data) and code-usage entropy.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from .cli import command
from .errors import CodebookError


@torch.no_grad()
def evaluate_codebooks(model, eval_ds, batch_size: int = 16) -> dict[str, Any]:
    """LM metrics with and without codebooks, and per-site codebook statistics.

    Leaves the model as it found it: training mode, usage statistics and the recent inputs
    kept for dead-code replacement are restored (so it can run in the middle of training).
    """
    from .fsm import lm_metrics

    was_training = model.training
    model.eval()
    layers = model.sites
    saved = {n: ({k: v.clone() for k, v in layer.state_dict().items()}, layer._recent)
             for n, layer in layers.items()}
    for layer in layers.values():  # count usage on the evaluation data only
        layer.reset_stats()
        layer.train()
    try:
        with_cb = lm_metrics(model.base_model, eval_ds, batch_size=batch_size)
        sites = {}
        for name, layer in layers.items():
            s = layer.stats()
            sites[name] = {"mse": s.mse, "fvu": s.fvu,
                           "dead_fraction": float((layer.code_counts == 0).float().mean()),
                           "usage_entropy": s.usage_entropy}
    finally:
        for name, layer in layers.items():
            layer.eval()
            layer.load_state_dict(saved[name][0])
            layer._recent = saved[name][1]
    try:
        with model.codebooks_disabled():
            without = lm_metrics(model.base_model, eval_ds, batch_size=batch_size)
    finally:
        model.train(was_training)

    def row(m) -> dict[str, float]:
        return {"loss": m.loss, "accuracy": m.accuracy, "perplexity": math.exp(min(m.loss, 50))}

    return {"with_codebooks": row(with_cb), "without_codebooks": row(without), "sites": sites,
            "tokens": with_cb.tokens}


def flat_metrics(metrics: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """:func:`evaluate_codebooks`' result as flat log keys: ``{prefix}_loss`` (``accuracy``,
    ``perplexity``) with codebooks, ``{prefix}_without_codebooks_loss`` (...) and
    ``{prefix}_{site}/mse`` (``fvu``, ``dead_fraction``, ``usage_entropy``)."""
    out = {f"{prefix}_{k}": v for k, v in metrics["with_codebooks"].items()}
    out.update({f"{prefix}_without_codebooks_{k}": v
                for k, v in metrics["without_codebooks"].items()})
    for site, stats in metrics["sites"].items():
        out.update({f"{prefix}_{site}/{k}": v for k, v in stats.items()})
    out[f"{prefix}_tokens"] = metrics["tokens"]
    return out


def format_table(metrics: dict[str, Any]) -> str:
    """Markdown tables: models (Table 2 style) and per-site codebook statistics."""
    lines = ["| Model | Loss | LM Acc (%) | Perplexity |", "|---|---|---|---|"]
    for label, key in (("Without codebooks", "without_codebooks"),
                       ("With codebooks", "with_codebooks")):
        m = metrics[key]
        lines.append(f"| {label} | {m['loss']:.3f} | {100 * m['accuracy']:.2f} | "
                     f"{m['perplexity']:.2f} |")
    lines += ["", "| Site | MSE | FVU | Dead codes | Usage entropy |", "|---|---|---|---|---|"]
    for name, s in metrics["sites"].items():
        lines.append(f"| {name} | {s['mse']:.4f} | {s['fvu']:.4f} | "
                     f"{100 * s['dead_fraction']:.1f}% | {s['usage_entropy']:.3f} |")
    return "\n".join(lines)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("codebooks", help="folder written by save_codebooks (e.g. OUTPUT/final)")
    p.add_argument("config", help="the training config (its model and data sections are used)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--out", help="folder to write the results into (eval_metrics.json, "
                                 "eval_table.md; default: CODEBOOKS)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="rows of data.seq_len tokens per forward pass (%(default)s)")


def _same_source(a: str, b: str) -> bool:
    """Whether two model/tokenizer names (hub names or folders) name the same thing."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() or pb.exists():
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    return a == b


def model_and_tokenizer(codebooks: str, cfg: Any) -> tuple[Any, Any]:
    """The saved codebook model and the tokenizer to evaluate it with, refusing a config
    whose model or tokenizer is not the codebooks' base: a finetuned run's folder (base
    weights and tokenizer saved beside the codebooks) is evaluated with its own tokenizer,
    which the config's must equal; codebooks alone need the config's model to be the base
    they were trained on."""
    from transformers import AutoTokenizer

    from .io import read_json
    from .model import CONFIG_NAME, CodebookModel

    d = Path(codebooks)
    named = cfg.tokenizer or cfg.model
    own = (d / "config.json").is_file()  # finetuned: base weights beside the codebooks
    if not own:
        recorded = str((read_json(d / CONFIG_NAME).get("base_model") or {})
                       .get("name_or_path") or "")
        if recorded and not _same_source(recorded, cfg.model):
            raise CodebookError(f"{d}: the codebooks were trained on base model {recorded}, "
                                f"the config names model={cfg.model}; evaluate with the run's "
                                f"config (or the override model={recorded})")
    model = CodebookModel.from_pretrained(d, base_model=d if own else cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(named)
    if own and (d / "tokenizer_config.json").is_file():
        saved = AutoTokenizer.from_pretrained(d)
        if saved.get_vocab() != tokenizer.get_vocab():
            raise CodebookError(f"{d}: the tokenizer saved with the model differs from the "
                                f"config's ({named}); evaluate with the run's config (or the "
                                f"override tokenizer={d})")
        tokenizer = saved
    return model, tokenizer


@command("eval", "evaluate saved codebooks on a dataset; print the paper's Table 2", _options)
def _eval(args: argparse.Namespace) -> int:
    from .data.text import load_text, pack, take_rows
    from .io import write_json, write_text
    from .train import STREAM_EVAL_ROWS, load_config

    cfg = load_config(args.config, args.overrides)
    d = cfg.data
    if not Path(args.codebooks).is_dir():
        raise CodebookError(f"codebook folder {args.codebooks} not found")
    model, tokenizer = model_and_tokenizer(args.codebooks, cfg)
    text = load_text(d.dataset, d.files, d.config, d.eval_split or d.split, d.text_column,
                     d.streaming)
    rows = d.max_eval_rows or (STREAM_EVAL_ROWS if d.streaming else None)
    eval_ds = take_rows(pack(text, tokenizer, d.seq_len, d.text_column), rows)
    if len(eval_ds) == 0:
        raise CodebookError(f"no evaluation rows of {d.seq_len} tokens; lower data.seq_len")
    metrics = evaluate_codebooks(model, eval_ds, args.batch_size)
    table = format_table(metrics)
    out = Path(args.out or args.codebooks)
    write_json(out / "eval_metrics.json", metrics)
    write_text(out / "eval_table.md", table + "\n")
    print(table)
    return 0
