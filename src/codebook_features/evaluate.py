"""``codebook-features eval``: a saved codebook model on a dataset, in the paper's Table 2 form.

Reports LM loss, next-token accuracy and perplexity with and without the codebooks, and the
standard sparse-autoencoder evaluation (SAELens, SAEBench) for each site spliced in alone and
for all sites: CE loss recovered against zero- and mean-ablation, KL divergence from the
base model, explained variance, L0 and alive codes (:mod:`codebook_features.standard_eval`),
with a plot of the code density (log10 firing frequency per code).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from .cli import command
from .errors import CodebookError


def evaluate_codebooks(model, eval_ds, batch_size: int = 16, per_site: bool = True
                       ) -> dict[str, Any]:
    """LM metrics with and without codebooks, per-site codebook statistics and the standard
    sparse-autoencoder evaluation (:mod:`codebook_features.standard_eval`).

    Returns ``with_codebooks`` / ``without_codebooks`` (``loss``, ``accuracy``,
    ``perplexity``), ``sites`` (each site's ``mse``, ``fvu``, ``dead_fraction`` and
    ``usage_entropy`` with all codebooks in, the model as it runs), ``standard`` (per site
    spliced in alone and ``all``: ``ce_loss``, ``ce_loss_base``, ``ce_loss_recovered_zero``,
    ``ce_loss_recovered_mean``, ``kl_div``, ``explained_variance``, ``fvu``, ``l0``,
    ``alive_fraction`` and more), ``code_density`` (per site, a histogram of log10 firing
    frequency) and ``tokens`` (scored). Leaves the model as it found it (mode, parameters,
    statistics), so it can run in the middle of training; ``per_site=False`` (cheaper, for
    evaluations during training) gives ``standard`` the ``all`` row only.
    """
    from .standard_eval import standard_evaluation

    r = standard_evaluation(model, eval_ds, batch_size, per_site)

    def row(m) -> dict[str, float]:
        return {"loss": m["loss"], "accuracy": m["accuracy"],
                "perplexity": math.exp(min(m["loss"], 50))}

    sites = {n: {k: f[k] for k in ("mse", "fvu", "dead_fraction", "usage_entropy")}
             for n, f in r["sites_together"].items()}
    return {"with_codebooks": row(r["with_codebooks"]), "without_codebooks": row(r["base"]),
            "sites": sites, "standard": r["rows"], "code_density": r["code_density"],
            "tokens": r["tokens"]}


DENSITY_PLOT = "code_density.png"
"""The code density histogram written beside ``eval_metrics.json``."""


def flat_metrics(metrics: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """:func:`evaluate_codebooks`' result as flat log keys: ``{prefix}_loss`` (``accuracy``,
    ``perplexity``) with codebooks, ``{prefix}_without_codebooks_loss`` (...) and
    ``{prefix}_{site}/mse`` (``fvu``, ``dead_fraction``, ``usage_entropy``), and the standard
    evaluation's ``{prefix}_standard/{site or all}/{key}``."""
    out = {f"{prefix}_{k}": v for k, v in metrics["with_codebooks"].items()}
    out.update({f"{prefix}_without_codebooks_{k}": v
                for k, v in metrics["without_codebooks"].items()})
    for site, stats in metrics["sites"].items():
        out.update({f"{prefix}_{site}/{k}": v for k, v in stats.items()})
    for row, stats in metrics.get("standard", {}).items():
        out.update({f"{prefix}_standard/{row}/{k}": v for k, v in stats.items()})
    out[f"{prefix}_tokens"] = metrics["tokens"]
    return out


STANDARD_COLUMNS = (("ce_loss", "CE loss", "{:.4f}"), ("ce_loss_base", "CE base", "{:.4f}"),
                    ("ce_loss_recovered_zero", "CE rec. (zero)", "{:.1%}"),
                    ("ce_loss_recovered_mean", "CE rec. (mean)", "{:.1%}"),
                    ("kl_div", "KL", "{:.4f}"), ("explained_variance", "Expl. var.", "{:.3f}"),
                    ("fvu", "FVU", "{:.3f}"), ("l0", "L0", "{:.1f}"),
                    ("alive_fraction", "Alive", "{:.1%}"))
"""The standard evaluation's table: key, heading, format."""


def format_table(metrics: dict[str, Any]) -> str:
    """Markdown tables: models (Table 2 style), then the standard evaluation per site (spliced
    in alone) and for all sites (or, for results without it, per-site codebook statistics)."""
    lines = ["| Model | Loss | LM Acc (%) | Perplexity |", "|---|---|---|---|"]
    for label, key in (("Without codebooks", "without_codebooks"),
                       ("With codebooks", "with_codebooks")):
        m = metrics[key]
        lines.append(f"| {label} | {m['loss']:.3f} | {100 * m['accuracy']:.2f} | "
                     f"{m['perplexity']:.2f} |")
    if "standard" in metrics:
        lines += ["", "| Site | " + " | ".join(h for _, h, _ in STANDARD_COLUMNS) + " |",
                  "|---" * (len(STANDARD_COLUMNS) + 1) + "|"]
        std = metrics["standard"]
        for name in [*(n for n in std if n != "all"), "all"]:  # all last, as JSON sorts
            cells = [fmt.format(std[name][k]) if std[name][k] == std[name][k] else "n/a"
                     for k, _, fmt in STANDARD_COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
    lines += ["", "| Site | MSE | FVU | Dead codes | Usage entropy |", "|---|---|---|---|---|"]
    for name, s in metrics["sites"].items():
        lines.append(f"| {name} | {s['mse']:.4f} | {s['fvu']:.4f} | "
                     f"{100 * s['dead_fraction']:.1f}% | {s['usage_entropy']:.3f} |")
    return "\n".join(lines)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("codebooks", help="folder written by save_codebooks (e.g. OUTPUT/final), or "
                                     "a hub id (fetched into the hub cache; needs --out)")
    p.add_argument("config", help="the training config (its model and data sections are used)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--out", help="folder to write the results into (eval_metrics.json, "
                                 "eval_table.md, code_density.png; default: CODEBOOKS, whose "
                                 "model card README.md then shows them)")
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
    from .io import load_tokenizer, read_json
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
    tokenizer = load_tokenizer(named)
    if own and (d / "tokenizer_config.json").is_file():
        saved = load_tokenizer(d)
        if saved.get_vocab() != tokenizer.get_vocab():
            raise CodebookError(f"{d}: the tokenizer saved with the model differs from the "
                                f"config's ({named}); evaluate with the run's config (or the "
                                f"override tokenizer={d})")
        tokenizer = saved
    return model, tokenizer


@command("eval", "evaluate saved codebooks on a dataset; print the paper's Table 2", _options)
def _eval(args: argparse.Namespace) -> int:
    from .data.text import load_text, pack, take_rows
    from .fetch import local_folder
    from .io import writable_dir, write_json, write_text
    from .modelcard import refresh_model_card
    from .report import write_code_density_plot
    from .train import STREAM_EVAL_ROWS, load_config

    if not Path(args.codebooks).expanduser().is_dir() and args.out is None:
        raise CodebookError(f"codebook folder {args.codebooks} not found (for a hub id, pass "
                            "--out DIR: the results are not written into the hub cache)")
    cfg = load_config(args.config, args.overrides)
    d = cfg.data
    if args.batch_size < 1:
        raise CodebookError(f"--batch-size {args.batch_size}: give at least 1")
    writable_dir(args.out or args.codebooks)  # unwritable: one line before any work
    folder = local_folder(args.codebooks)  # the folder, or a hub id's snapshot
    model, tokenizer = model_and_tokenizer(str(folder), cfg)
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
    write_code_density_plot(metrics["code_density"], out / DENSITY_PLOT)
    write_text(out / "eval_table.md", f"{table}\n\n![code density]({DENSITY_PLOT})\n")
    refresh_model_card(out)  # the card of a saved folder shows the new figures
    print(table)
    return 0
