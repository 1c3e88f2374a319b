"""Self-contained HTML reports (tables, and matplotlib plots inlined as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

from .io import write_text

CSS = """
body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.met{color:#0a7a2f;font-weight:600}.miss{color:#b00020;font-weight:600}
img{max-width:100%}code{background:#f3f3f3;padding:1px 4px}
"""


def _fig_to_img(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _plots(report: dict[str, Any], models: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    fig, ax = plt.subplots(figsize=(6.5, 3))
    accs = [report[m].get("state_acc") or 0 for m in models]
    ax.bar(models, accs, color=["#555"] + ["#3b75af"] * (len(models) - 1))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("sampled state accuracy")
    ax.tick_params(axis="x", rotation=20)
    plots["state_acc"] = _fig_to_img(fig)

    sc, ne = report.get("state_codes", {}), report.get("neurons", {})
    if sc.get("precisions"):
        fig, ax = plt.subplots(figsize=(6.5, 3))
        bins = [i / 20 for i in range(21)]
        ax.hist(sc["precisions"], bins=bins, alpha=0.7, label="state codes")
        ax.hist([p for p in ne.get("precisions", []) if p == p], bins=bins, alpha=0.7,
                label="best neuron at the code's recall")
        ax.set_xlabel("precision for the best state")
        ax.set_ylabel("count")
        ax.legend()
        plots["precision"] = _fig_to_img(fig)

    ex = report.get("intervention", {}).get("example")
    if ex:
        fig, ax = plt.subplots(figsize=(8, 3))
        xs = list(range(len(ex["before"])))
        ax.bar([x - 0.2 for x in xs], ex["before"], width=0.4, label=f"before (state {ex['a']})")
        ax.bar([x + 0.2 for x in xs], ex["after"], width=0.4,
               label=f"after swapping in state {ex['b']}'s codes")
        for s in ex["b_successors"]:
            ax.axvspan(s - 0.5, s + 0.5, color="#3b75af", alpha=0.12)
        ax.set_xlabel("next state (shaded: successors of B)")
        ax.set_ylabel("probability")
        ax.legend()
        plots["intervention"] = _fig_to_img(fig)
    return plots


def write_demo_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the TokFSM demo's HTML report (atomically)."""
    cfg = report["config"]
    models = ["base", *cfg["variants"]]
    plots = _plots(report, models)
    rows = [[m, report[m].get("loss"), report[m].get("lm_acc"), report[m].get("state_acc"),
             report[m].get("first_transition_acc"), report[m].get("codebook_mse"),
             report[m].get("dead_code_fraction")] for m in models]
    targets = "".join(
        f"<li class='{'met' if t['met'] else 'miss'}'>{'met' if t['met'] else 'NOT met'}: "
        f"{html.escape(t['target'])} (measured: {html.escape(str(t['value']))})</li>"
        for t in report["targets"])
    sc, ne, iv = report.get("state_codes", {}), report.get("neurons", {}), report.get(
        "intervention", {})
    fsm = cfg["fsm"]["config"]
    machine = report["machine"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>TokFSM codebook report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Codebook Features on TokFSM</h1>",
        f"<p>FSM: {fsm['num_states']} states, {fsm['successors']} successors each, "
        f"{fsm['states_per_sequence']} states per sequence. Model: GPT-NeoX, {cfg['layers']} "
        f"layers &times; {cfg['hidden']}, {cfg['heads']} heads, MLP {cfg['mlp']}; base "
        f"{cfg['base_steps']} steps, codebook finetunes {cfg['finetune_steps']} steps, batch "
        f"{cfg['batch']}. Attention codebooks: {cfg['attn_codes']} codes per head; MLP "
        f"codebooks: {cfg['mlp_codes']} codes. Machine: {machine['cores']} cores, "
        f"{'CUDA' if machine['cuda'] else 'CPU only'}, torch {machine['torch']}. The paper used "
        "100 states and 10 successors on a GPU (<code>codebook-features demo --paper</code>); "
        "this is a smaller FSM chosen to show the same effects in minutes.</p>",
        "<h2>Targets</h2><ul>", targets, "</ul>",
        "<h2>Models</h2>",
        _table(["model", "loss", "LM acc", "state acc", "first-transition acc", "codebook MSE",
                "dead codes"], rows),
        plots["state_acc"],
        "<h2>State codes vs neurons</h2>",
        f"<p>Codebook <code>{html.escape(str(sc.get('site')))}</code>: {sc.get('count')} state "
        f"codes (precision &ge; 0.9) covering {sc.get('states_covered')} of "
        f"{sc.get('num_states')} states; mean precision {sc.get('mean_precision')}, mean recall "
        f"{sc.get('mean_recall')}. The best of the layer's {ne.get('count')} MLP neurons, "
        f"thresholded to each code's recall, reaches mean precision "
        f"{ne.get('mean_precision')}.</p>",
        plots.get("precision", ""),
        "<h2>Intervention</h2>",
        f"<p>Over {iv.get('pairs')} (A, B) pairs, replacing A's state codes by B's in the MLP "
        f"codebooks at one position puts {iv.get('success')} of the next-state probability on "
        f"B's successors (before: {iv.get('mass_on_target_successors_before')}); normalised JSD "
        f"to B's true next-state distribution {iv.get('jsd_before')} &rarr; "
        f"{iv.get('jsd_after')}.</p>",
        plots.get("intervention", ""),
        "<h2>Timings (s)</h2>",
        _table(["step", "seconds"], [[k, v] for k, v in report["timings"].items()]),
        "<p>Every figure is also in <code>report.json</code>.</p></body></html>",
    ]
    write_text(path, "\n".join(parts))


def code_density_figure(density: dict[str, dict[str, Any]]):
    """The code density histogram: per site, how many codes fire at each log10 frequency
    (firings per token); dead codes (never fired) are counted in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for site, h in density.items():
        ax.stairs(h["counts"], h["bin_edges"], label=f"{site} ({h['dead']} of {h['codes']} "
                  "dead)")
    ax.set_xlabel("log10 firing frequency (firings per token)")
    ax.set_ylabel("codes")
    ax.legend(fontsize="small")
    return fig


def code_density_img(density: dict[str, dict[str, Any]]) -> str:
    """The code density histogram as an inline ``<img>`` (for HTML reports)."""
    return _fig_to_img(code_density_figure(density))


def write_code_density_plot(density: dict[str, dict[str, Any]], path: str | os.PathLike
                            ) -> None:
    """Write the code density histogram as a PNG (atomically)."""
    import matplotlib.pyplot as plt

    from .io import _atomic_replace

    fig = code_density_figure(density)
    try:
        _atomic_replace(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110,
                                                            bbox_inches="tight"))
    finally:
        plt.close(fig)
