"""Markdown tables of the benchmark scripts' JSON output, for the documentation.

Each benchmark script prints JSON lines; its output, stored as it printed it under
``benchmarks/results/`` (``python benchmarks/snap.py --threads 1 > benchmarks/results/snap.jsonl``),
is turned into a table here, so no figure of the performance pages is copied by hand. A page
asks for a table with a marker line ``<!-- benchmark: NAME -->`` (NAME one of ``SOURCES``);
this module is also the MkDocs hook (``mkdocs.yml``: ``hooks``) that replaces the markers at
build time. A result not stored yet renders as one line saying which command stores it.

    python scripts/render_benchmarks.py            # every table, as the docs show them
    python scripts/render_benchmarks.py snap       # one
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- benchmark: (\S+) -->$", flags=re.M)


def read_json_lines(path: Path) -> list[dict]:
    """The JSON objects a benchmark printed, one a line (other lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines()
            if line.lstrip().startswith("{")]


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table; None shows as an em dash."""
    def cell(v: object) -> str:
        return "—" if v is None else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _ratio(v: float | None) -> str | None:
    return None if v is None else f"{v:.2f} ×"


SHAPE = ("N", "d", "C", "k", "G")
SNAP_PEERS = [  # (impl, column): forward + backward ms, forward only for matmul and FAISS
    ("matmul", "matmul (fwd)"), ("codebook", "this layer (auto)"),
    ("codebook_torch", "torch"), ("codebook_screen", "bf16_screen"),
    ("codebook_faiss", "faiss"), ("codebook_bf16", "torch_bf16 (approx.)"),
    ("naive", "naive"), ("faiss_flatip", "FAISS flat IP (fwd)"), ("vqtorch", "vqtorch"),
]


def snap_table(rows: list[dict]) -> str:
    """``benchmarks/snap.py``: per shape, each peer's ms, the layer's ratios and peak memory."""
    rows = [r for r in rows if "impl" in r and not r["impl"].startswith("approx_")]
    shapes = list(dict.fromkeys(tuple(r[s] for s in SHAPE) for r in rows))
    by = {(tuple(r[s] for s in SHAPE), r["impl"]): r for r in rows}
    peers = [(impl, col) for impl, col in SNAP_PEERS if any(i == impl for _, i in by)]
    header = [*SHAPE, *(col for _, col in peers), "naive ÷ layer", "layer ÷ FAISS fwd",
              "peak MiB layer / naive"]
    out = []
    for shape in shapes:
        cells: list[object] = list(shape)
        for impl, _ in peers:
            r = by.get((shape, impl))
            ms = None if r is None else (r["fwdbwd_ms"] if r["fwdbwd_ms"] is not None
                                         else r["fwd_ms"])
            cells.append(None if ms is None else
                         f"{ms:.1f}" + (f" ({r['backend']})" if impl == "codebook" else ""))
        layer, naive = by.get((shape, "codebook"), {}), by.get((shape, "naive"), {})
        peak = (f"{layer['peak_mib']:.1f} / {naive['peak_mib']:.1f}"
                if layer.get("peak_mib") is not None and naive.get("peak_mib") is not None
                else None)
        out.append([*cells, _ratio(layer.get("naive_x")), _ratio(layer.get("fwdbwd_x_faiss")),
                    peak])
    return table(header, out)


def approx_table(rows: list[dict]) -> str:
    """``benchmarks/snap.py --approx``: recall@k and speed-up over the exact forward."""
    rows = [r for r in rows if r.get("impl", "").startswith("approx_")]
    shapes = list(dict.fromkeys(tuple(r[s] for s in SHAPE) for r in rows))
    cols = [(impl, data) for impl in ("approx_ivf", "approx_hnsw")
            for data in ("random", "clustered")]
    by = {(tuple(r[s] for s in SHAPE), r["impl"], r["data"]): r for r in rows}
    out = []
    for shape in shapes:
        cells: list[object] = list(shape)
        for impl, data in cols:
            r = by.get((shape, impl, data))
            cells.append(None if r is None else
                         f"recall {r['recall_at_k']:.2f}, {r['speedup']:.2f} ×")
        out.append(cells)
    return table([*SHAPE, *(f"{i.removeprefix('approx_').upper()} {d}" for i, d in cols)],
                 out)


def model_table(rows: list[dict]) -> str:
    """``benchmarks/model.py``: a training step with codebooks against the plain step."""
    rows = [r for r in rows if "overhead" in r]
    return table(
        ["shape", "batch × seq", "C", "k", "plain step ms", "with codebooks ms", "overhead",
         "CPU-time overhead", "threads", "load avg"],
        [[r["shape"], f"{r['batch']} × {r['seq']}", r["num_codes"], r["k"], r["base_step_ms"],
          r["codebook_step_ms"], _ratio(r["overhead"]), _ratio(r["cpu_overhead"]),
          r["threads"], r["load_avg"]] for r in rows])


def authors_table(rows: list[dict]) -> str:
    """``benchmarks/authors.py``: this library against the authors' package, same run."""
    rows = [r for r in rows if "speedup" in r]
    return table(
        ["kind", "shape", "ours ms", "theirs ms", "speed-up", "our overhead",
         "their overhead", "threads", "load avg"],
        [[r["kind"], r["shape"], r["ours_ms"], r["theirs_ms"], _ratio(r["speedup"]),
          _ratio(r.get("ours_overhead")), _ratio(r.get("theirs_overhead")), r["threads"],
          r["load_avg"]] for r in rows])


def index_table(rows: list[dict]) -> str:
    """``benchmarks/index_scale.py``: the browser's queries on a large index, in ms."""
    queries = [r for r in rows if r.get("event") == "query"]
    return table(["query", "median", "max", "first call"],
                 [[r["name"], r.get("median_ms"), r.get("max_ms"), r.get("cold_ms")]
                  for r in queries])


def calibration_table(runs: list[dict]) -> str:
    """``benchmarks/tokfsm_calibration.json``: the TokFSM demo's settings and figures."""
    def pct(v: float | None) -> str | None:
        return None if v is None else f"{100 * v:.1f}%"

    out = []
    for r in runs:
        f = r.get("figures", {})
        jsd = f.get("intervention.normalized_jsd") or {}
        single = [v for key, v in jsd.items() if "layer" in key]
        out.append([r.get("label") or " ".join(r.get("set", [])), pct(f.get("base.state_acc")),
                    pct(f.get("attn_mlp_k1.state_acc")),
                    None if f.get("state_codes.mean_precision") is None else
                    f"{pct(f['state_codes.mean_precision'])} "
                    f"({pct(f.get('state_codes.mean_recall'))})",
                    pct(f.get("neurons.mean_precision")), jsd.get("mlp_all"),
                    jsd.get("attn_mlp_all"), min(single) if single else None,
                    r.get("wall_s")])
    return table(["run", "base state acc", "attn + MLP k=1 state acc",
                  "state codes' precision (recall)", "best neurons' precision", "JSD mlp_all",
                  "JSD attn_mlp_all", "best single layer", "wall s"], out)


TABLE1_NAMES = {"base": "no codebook", "attn_k1": "attention only, k=1"}


def _remainder_lines(rem: dict | None) -> list[str]:
    """Where ``mlp_all`` leaves divergence: every MLP codebook plus one attention layer."""
    jsd = (rem or {}).get("normalized_jsd") or {}
    if not jsd:
        return []
    return ["Where the rest of the divergence sits: every MLP codebook patched together with "
            "one layer's attention codebooks (not a condition of the paper).", "",
            table(["patched", *jsd], [["normalised JSD", *jsd.values()]]), ""]


def tokfsm_demo_summary(run: dict) -> str:
    """``benchmarks/results/tokfsm_demo.json``: a full demo run's Table 1, state codes against
    neurons, patching figures and targets (``scripts/tokfsm_results.py`` writes it)."""
    def pct(v: float | None) -> str | None:
        return None if v is None else f"{100 * v:.1f}%"

    rows = [[TABLE1_NAMES.get(name) or "attention + MLP, k=" + name.rsplit("_k", 1)[-1],
             r.get("loss"), pct(r.get("lm_acc")), pct(r.get("state_acc")),
             pct(r.get("first_transition_acc"))] for name, r in run["table1"].items()]
    sc, ne, iv = run["state_codes"], run["neurons"], run["intervention"]
    given = iv.get("normalized_jsd") or {}
    order = ["attn_layer0", *sorted(k for k in given if k.startswith("mlp_layer")), "attn_all",
             "mlp_all", "attn_mlp_all"]  # the paper's order of conditions
    jsd = {k: given[k] for k in order if k in given}
    m, t = run.get("machine") or {}, run.get("timings") or {}
    wall = run.get("wall_s")
    lines = [
        f"Run of {run.get('date')} on {m.get('cores')} CPU cores (torch {m.get('torch')}): "
        f"{t.get('total_s')} s in the demo"
        + (f", {wall} s wall for the whole command" if wall else "") + ".",
        "",
        table(["model", "loss", "LM acc", "state acc", "first-transition acc"], rows),
        "",
        f"State codes of `{sc.get('site')}`: {sc.get('states_covered')} of "
        f"{sc.get('num_states')} states have one, mean precision {pct(sc.get('mean_precision'))}"
        f" at mean recall {pct(sc.get('mean_recall'))}; the best of {ne.get('count')} "
        f"attention/MLP output dimensions at each code's recall: "
        f"{pct(ne.get('mean_precision'))}.",
        "",
        table(["patched", *jsd], [["normalised JSD", *jsd.values()]]),
        "",
        f"After the `mlp_all` patch {pct(iv.get('success'))} of the next-state probability is "
        f"on B's successors ({pct(iv.get('success_before'))} unpatched; {iv.get('pairs')} "
        "pairs).",
        "",
        *_remainder_lines(iv.get("remainder")),
        table(["target", "value", "verdict"],
              [[x["target"], x["value"], {True: "met", False: "**not met**", None: "n/a"}[
                  x["met"]]] for x in run["targets"]]),
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Source:
    path: str            # relative to the repository root
    command: str         # what writes it
    render: Callable[[list[dict]], str]
    json_lines: bool = True


SOURCES = {
    "snap": Source("benchmarks/results/snap.jsonl",
                   "python benchmarks/snap.py --threads 1 > benchmarks/results/snap.jsonl",
                   snap_table),
    "approx": Source("benchmarks/results/snap_approx.jsonl",
                     "python benchmarks/snap.py --approx --threads 1 > "
                     "benchmarks/results/snap_approx.jsonl", approx_table),
    "model": Source("benchmarks/results/model.jsonl",
                    "python benchmarks/model.py --threads 1 > benchmarks/results/model.jsonl",
                    model_table),
    "authors": Source("benchmarks/results/authors.jsonl",
                      "python benchmarks/authors.py > benchmarks/results/authors.jsonl",
                      authors_table),
    "index": Source("benchmarks/results/index_scale.jsonl",
                    "python benchmarks/index_scale.py --out DIR --runs 5 > "
                    "benchmarks/results/index_scale.jsonl", index_table),
    "tokfsm_demo": Source("benchmarks/results/tokfsm_demo.json",
                          "python scripts/tokfsm_results.py runs/demo/report.json",
                          tokfsm_demo_summary, json_lines=False),
    "tokfsm_calibration": Source("benchmarks/tokfsm_calibration.json",
                                 "python benchmarks/tokfsm_calibrate.py --demo --set ...",
                                 calibration_table, json_lines=False),
}


def render(name: str, root: Path = ROOT) -> str:
    """The Markdown for one source: its table with where it came from, or how to make it."""
    if name not in SOURCES:
        raise ValueError(f"unknown benchmark table {name!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[name]
    path = root / src.path
    if not path.is_file():
        return (f"*Not stored yet.* `{src.command}` stores it, and this page then shows it "
                "as a table.")
    rows = read_json_lines(path) if src.json_lines else json.loads(path.read_text())
    note = f"From `{src.path}`, written by `{src.command}`"
    context = next((r for r in rows if "cpus" in r), None)
    if context:
        note += (f" ({context['cpus']} CPUs, load average {context.get('load_avg_before')} "
                 "at the start)")
    return f"{note}:\n\n{src.render(rows)}"


README_BLOCK = re.compile(r"(<!-- performance-summary -->\n).*?(<!-- /performance-summary -->)",
                          flags=re.S)


def _span(values: list[float], unit: str = " ×") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}{unit}" if round(lo, 2) == round(hi, 2) else f"{lo:.2f}–{hi:.2f}{unit}"


def readme_summary(root: Path = ROOT) -> str:
    """The README's performance bullets, from the stored results (what is not stored yet is
    said so)."""
    def rows(name: str) -> list[dict]:
        path = root / SOURCES[name].path
        return read_json_lines(path) if path.is_file() else []

    out = []
    snap = [r for r in rows("snap") if r.get("impl") == "codebook"]
    ctx = next((r for r in rows("snap") if "cpus" in r), {})
    if snap:
        naive = [r["naive_x"] for r in snap if r.get("naive_x")]
        faiss = [r["fwdbwd_x_faiss"] for r in snap if r.get("fwdbwd_x_faiss")]
        mem = [r["naive_peak_x"] for r in snap if r.get("naive_peak_x")]
        out.append(
            f"- **The layer against the naive path** (full `N × C` similarity, top-k, dense "
            f"gather; `benchmarks/snap.py`, {len(snap)} shapes, {ctx.get('threads')} thread, "
            f"{ctx.get('cpus')} CPUs): forward + backward {_span(naive)} faster"
            + (f", peak memory {_span(mem)} smaller" if mem else "")
            + (f"; forward + backward in {_span(faiss)} the time of FAISS's bare forward "
               "search" if faiss else "") + ".")
    else:
        out.append("- **The layer against the naive path** (`benchmarks/snap.py`): not stored "
                   "yet.")
    model = [r for r in rows("model") if "overhead" in r]
    if model:
        per = ", ".join(f"{r['overhead']:.2f} × at the {r['shape']} shape" for r in model)
        out.append(f"- **A training step** with codebooks on every layer's attention heads "
                   f"against the plain step (`benchmarks/model.py`): {per}.")
    else:
        out.append("- **A training step** (`benchmarks/model.py`): not stored yet.")
    authors = [r for r in rows("authors") if "speedup" in r]
    if authors:
        kinds = dict.fromkeys(r["kind"] for r in authors)
        per = "; ".join(f"{kind}: {_span([r['speedup'] for r in authors if r['kind'] == kind])}"
                        for kind in kinds)
        out.append(f"- **Against the authors' package** in the same run "
                   f"(`benchmarks/authors.py`, their time ÷ ours): {per}.")
    else:
        out.append("- **Against the authors' package** (`benchmarks/authors.py`): not stored "
                   "yet.")
    return "\n".join(out) + "\n"


def write_readme(root: Path = ROOT, check: bool = False) -> bool:
    """Rewrite the README's performance block from the stored results; with ``check``, only
    say whether it is current."""
    path = root / "README.md"
    text = path.read_text()
    if not README_BLOCK.search(text):
        raise ValueError("README.md has no <!-- performance-summary --> block")
    new = README_BLOCK.sub(lambda m: m[1] + readme_summary(root) + m[2], text)
    if check:
        return new == text
    path.write_text(new)
    return True


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    """MkDocs hook: each ``<!-- benchmark: NAME -->`` line becomes that table, and a
    ``<!-- benchmark-summary -->`` line the README's performance bullets."""
    markdown = markdown.replace("<!-- benchmark-summary -->\n", readme_summary())
    return MARKER.sub(lambda m: render(m[1]), markdown)


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or list(SOURCES)
    if names == ["--readme"]:  # the README's summary block, from the stored results
        write_readme()
        print("README.md: performance summary rewritten from benchmarks/results/")
        return 0
    for name in names:
        if name not in SOURCES:
            print(f"error: unknown benchmark table {name!r}; known: {', '.join(SOURCES)}",
                  file=sys.stderr)
            return 2
        print(f"## {name}\n\n{render(name)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
