"""``codebook-features eval``: a saved codebook model on a dataset, in the paper's Table 2 form.

Writes ``eval_metrics.json``, ``eval_table.md`` and a plot of the code density (log10 firing
frequency per code) beside the codebooks, and refreshes their model card.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import CodebookError
from .metrics import DENSITY_PLOT, evaluate_codebooks, format_table


def options(p: argparse.ArgumentParser) -> None:
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
    from ..io import load_tokenizer, read_json
    from ..model import CodebookModel
    from ..model_config import CONFIG_NAME

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


def run(args: argparse.Namespace) -> int:
    from ..data.text import load_text, pack, take_rows
    from ..fetch import local_folder
    from ..io import writable_dir, write_json, write_text
    from ..modelcard import refresh_model_card
    from ..report import write_code_density_plot
    from ..training.config import STREAM_EVAL_ROWS, load_config

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
