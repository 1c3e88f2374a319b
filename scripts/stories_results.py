"""Rewrite docs/stories.md's story-workload figures from a run of ``codebook-features stories``.

    codebook-features stories --out runs/stories
    python scripts/stories_results.py runs/stories            # rewrites docs/stories.md's block
    python scripts/stories_results.py runs/stories --check    # exit 1 if the page differs

The block between ``<!-- stories-results -->`` and ``<!-- /stories-results -->`` is
generated from the run's ``report.json`` and ``table.md`` (the tables the command printed):
the Table 2 rows, the steering table, and the sentences that quote them. Nothing else of the
page changes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import textwrap
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "stories.md"
BEGIN, END = "<!-- stories-results -->", "<!-- /stories-results -->"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render(run: Path, machine: str) -> str:
    """The page's block for the run in folder ``run``."""
    report = json.loads((run / "report.json").read_text())
    tables = (run / "table.md").read_text().strip().split("\n\n")
    eval_table = next(t for t in tables if t.startswith("| Model |"))
    steering_table = next(t for t in tables if t.startswith("| topic |"))
    cfg, ev, t = report["config"], report["eval"], report["timings"]
    site = next(iter(ev["sites"].values())) if ev.get("sites") else {}
    bypass = ev["without_codebooks"]["loss"] - ev["with_codebooks"]["loss"]
    rows = report["steering"]
    ratios = [r["steered"] / r["baseline"] for r in rows if r["baseline"] > 0]
    mode = {"replace": "written over the weakest slots", "append": "appended"}.get(
        cfg["steer_mode"], cfg["steer_mode"])
    usage = (f" (FVU {site['fvu']:.2f}, {100 * site['dead_fraction']:.0f}% dead codes)"
             if site else "")
    rise = (f"Every topic's mention rate rises {min(ratios):.1f} to {max(ratios):.1f} times "
            "over its unsteered baseline" if len(ratios) == len(rows) else
            "Mention rates, unsteered and steered, are in the table")
    wrap = functools.partial(textwrap.fill, width=96, break_on_hyphens=False)
    return "\n".join([
        BEGIN,
        wrap(f"Measured with the defaults, `codebook-features stories --out {run.name}` on "
        f"{machine}: {t['total_s']:.0f} s in all (base model {t.get('base_train_s', 0):.0f} s, "
        f"codebook finetune {t.get('finetune_s', 0):.0f} s); `python "
        f"scripts/stories_results.py RUN_DIR` rewrites this block from such a run's "
        "`report.json` and `table.md`."),
        "",
        eval_table,
        "",
        wrap(f"With codebooks{usage} the loss is {ev['with_codebooks']['loss']:.3f} against the "
        f"base model's {ev['base_model']['loss']:.3f}; bypassing them in the finetuned model "
        f"changes it by {bypass:+.3f} nats. Topic steering, {cfg['codes_per_topic']} codes "
        f"{mode} at every position, 4 prompts × {cfg['samples_per_prompt']} samples of "
        f"{cfg['gen_tokens']} tokens:"),
        "",
        steering_table,
        "",
        wrap(f"{rise}."),
        END,
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the --out folder of `codebook-features stories`")
    p.add_argument("--page", type=Path, default=PAGE, help="the page holding the block")
    p.add_argument("--machine", default=f"{os.cpu_count()} cores ({cpu_name()})",
                   help="how to describe the machine the run was on")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if different")
    args = p.parse_args(argv)
    for name in ("report.json", "table.md"):
        if not (args.run / name).is_file():
            print(f"error: {args.run / name} not found; run `codebook-features stories --out "
                  f"{args.run}` first", file=sys.stderr)
            return 2
    text = args.page.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        print(f"error: {args.page} needs exactly one {BEGIN} ... {END} block",
              file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    old, tail = rest.split(END, 1)
    block = render(args.run, args.machine)
    if args.check:
        same = BEGIN + old + END == block
        print(f"the stories block of {args.page} is up to date" if same else
              f"the stories block of {args.page} differs from the run")
        return 0 if same else 1
    tmp = args.page.with_name(f".{args.page.name}.tmp")
    tmp.write_text(head + block + tail)
    os.replace(tmp, args.page)
    print(f"rewrote the stories block of {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
