"""Store a TokFSM demo run's figures for the docs: ``benchmarks/results/tokfsm_demo.json``.

    codebook-features demo --out runs/demo          # a full run on the defaults
    python scripts/tokfsm_results.py runs/demo/report.json --wall-s SECONDS

keeps from ``report.json`` what ``docs/tokfsm.md`` shows (Table 1, the state codes against the
neurons, the patching figures, every target with its verdict, the timings, the machine and the
settings), so the page's figures come from a run, not from a hand copy
(``scripts/render_benchmarks.py`` renders them). ``--wall-s``: the command's wall time as
measured outside it (e.g. by ``/usr/bin/time``), stored beside the demo's own timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "tokfsm_demo.json"
ROW_KEYS = ("loss", "lm_acc", "state_acc", "first_transition_acc")


def summarise(report: dict, wall_s: float | None = None) -> dict:
    """The parts of a demo ``report.json`` the docs show."""
    config = {k: v for k, v in report["config"].items() if k not in ("fsm", "out", "variants")}
    if report["config"].get("smoke"):
        raise ValueError("a --quick run's figures are not results; run the demo on its "
                         "defaults")
    sc, ne, iv = report["state_codes"], report["neurons"], report["intervention"]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": wall_s,
        "machine": report.get("machine"),
        "config": config,
        "timings": report.get("timings"),
        "table1": {name: {k: report[name].get(k) for k in ROW_KEYS}
                   for name in ("base", *report["config"]["variants"])},
        "state_codes": {k: sc.get(k) for k in ("site", "states_covered", "num_states",
                                               "mean_precision", "mean_recall")},
        "neurons": {k: ne.get(k) for k in ("count", "mean_precision")},
        "intervention": {k: iv.get(k) for k in ("pairs", "normalized_jsd", "success",
                                                "success_before", "remainder")},
        "targets": report["targets"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="a demo run's report.json")
    p.add_argument("--wall-s", type=float, default=None)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    try:
        summary = summarise(json.loads(a.report.read_text()), a.wall_s)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {a.report}: {e!r} (pass a full demo run's report.json)", file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
