"""The TokFSM demo's self-contained ``report.html``: the paper's figures and each target's
verdict, readable at a glance (every figure is also in ``report.json``)."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from ...io import write_text
from ...report import CSS, _fig_to_img, _table, code_density_img

VERDICT = {True: ("met", "met"), False: ("miss", "NOT met"), None: ("na", "n/a")}
EXTRA_CSS = """
.na{color:#777}.banner{background:#fff4ce;border:1px solid #e0c060;padding:8px 12px}
td.met,td.miss,td.na{text-align:center}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return "n/a" if v is None else str(v)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _accuracy_plot(report: dict[str, Any], models: list[str]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3))
    accs = [report[m].get("state_acc") or 0 for m in models]
    colors = ["#555"] + ["#3b75af" if m.startswith("attn_k") else "#c8702a" for m in models[1:]]
    ax.bar(models, accs, color=colors)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("sampled state accuracy")
    ax.tick_params(axis="x", rotation=20)
    return _fig_to_img(fig)


def _precision_plot(sc: dict[str, Any], ne: dict[str, Any]) -> str:
    codes = [p for p in sc.get("precisions", []) if p is not None]
    neurons = [p for p in ne.get("precisions", []) if p is not None]
    if not codes:
        return ""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3))
    bins = [i / 20 for i in range(21)]
    ax.hist(codes, bins=bins, alpha=0.7, label=f"state codes (mean {sum(codes) / len(codes):.3f})")
    if neurons:
        ax.hist(neurons, bins=bins, alpha=0.7,
                label=f"best neuron at the code's recall (mean {sum(neurons) / len(neurons):.3f})")
    ax.set_xlabel("precision for the state")
    ax.set_ylabel("states")
    ax.legend(loc="upper left")
    return _fig_to_img(fig)


def _in_order(conditions) -> list[str]:
    """Patching conditions in the paper's order: layer-0 attention, each MLP layer, all
    attention, all MLP, all attention + MLP."""
    rank = {"attn_layer0": 0, "attn_all": 2, "mlp_all": 3, "attn_mlp_all": 4}
    return sorted(conditions, key=lambda n: (rank.get(n, 1),
                                             int(n[9:]) if n[9:].isdigit() else 0))


def _jsd_plot(iv: dict[str, Any]) -> str:
    jsd = {k: v for k, v in (iv.get("normalized_jsd") or {}).items() if v is not None}
    if not jsd:
        return ""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3))
    names = _in_order(jsd)
    colors = ["#3b75af" if n.startswith("attn") and "mlp" not in n else
              "#c8702a" if n.startswith("mlp") else "#6a4c93" for n in names]
    bars = ax.bar(names, [jsd[n] for n in names], color=colors)
    ax.bar_label(bars, labels=[f"{jsd[n]:.2f}" for n in names], fontsize=8)
    ax.axhline(1.0, color="#555", lw=0.8, ls=":")
    ax.axhline(0.2, color="#b00020", lw=0.8, ls="--", label="target 0.2")
    ax.set_ylabel("normalised JSD to B\n(1 = no effect, 0 = B)")
    ax.set_ylim(0, max(1.05, max(jsd.values()) * 1.05))
    ax.tick_params(axis="x", rotation=20)
    ax.legend(loc="upper right")
    return _fig_to_img(fig)


def _targets_table(targets: list[dict[str, Any]]) -> str:
    rows = []
    for t in targets:
        cls, word = VERDICT[t["met"]]
        rows.append(f"<tr><td>{html.escape(t['target'])}</td><td>{html.escape(_fmt(t['value']))}"
                    f"</td><td class='{cls}'>{word}</td></tr>")
    return ("<table><tr><th>target</th><th>measured</th><th>verdict</th></tr>"
            + "".join(rows) + "</table>")


STANDARD = ("ce_loss", "ce_loss_base", "ce_loss_recovered_zero", "ce_loss_recovered_mean",
            "kl_div", "explained_variance", "fvu", "l0", "alive_fraction")
STANDARD_HEADER = ["CE loss", "CE base", "CE rec. (zero)", "CE rec. (mean)", "KL",
                   "expl. var.", "FVU", "L0", "alive"]


def _standard_section(report: dict[str, Any], variants: list[str], analysed: str) -> list[str]:
    """The standard (sparse-autoencoder) evaluation: every model with all its codebooks,
    the analysed model per site, and its code density plot."""
    have = [m for m in variants if "standard" in report.get(m, {})]
    if not have:
        return []
    rows = [[m, *[report[m]["standard"]["all"][k] for k in STANDARD]] for m in have]
    parts = ["<h2>Standard evaluation (as sparse-autoencoder tools report it)</h2>",
             "<p>Each model with all its codebooks in. CE rec.: the share of the loss gap "
             "between ablating the sites (zeros, or their mean activation) and the model "
             "without codebooks that the codebooks recover; KL: KL(without || with codebooks) "
             "of the next-token distribution per token; expl. var.: of the codebooks' "
             "normalised input; L0: codes active per token; alive: codes that fired on the "
             "evaluation set.</p>",
             _table(["model", *STANDARD_HEADER], rows)]
    if analysed in have:
        std = report[analysed]["standard"]
        site_rows = [[site, *[v[k] for k in STANDARD]] for site, v in std.items()]
        parts += [f"<h3>Model <code>{html.escape(analysed)}</code>, each site spliced in alone"
                  "</h3>", _table(["site", *STANDARD_HEADER], site_rows)]
        if report[analysed].get("code_density"):
            parts += ["<p>Code density: codes by log10 firing frequency (firings per token), "
                      "each site alone.</p>", code_density_img(report[analysed]["code_density"])]
    return parts


CALIBRATION = Path(__file__).resolve().parents[2] / "benchmarks" / "tokfsm_calibration.json"
"""The measured settings -> figures the demo's defaults were chosen from (a repository
checkout has it; ``benchmarks/tokfsm_calibrate.py --demo`` appends to it)."""


def _calibration_table(path: Path = CALIBRATION) -> str:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    out = []
    for r in rows:
        f = r.get("figures", {})
        jsd = f.get("intervention.normalized_jsd") or {}
        out.append([r.get("label") or " ".join(r.get("set", [])), f.get("base.state_acc"),
                    f.get("attn_mlp_k1.state_acc"), f.get("state_codes.mean_precision"),
                    f.get("neurons.mean_precision"), jsd.get("mlp_all"), jsd.get("attn_mlp_all"),
                    f.get("intervention.success")])
    if not out:
        return ""
    return ("<h2>How the defaults were chosen</h2><p>Every calibration run recorded in "
            "<code>benchmarks/tokfsm_calibration.json</code> (settings &rarr; figures; "
            "<code>benchmarks/tokfsm_calibrate.py --demo</code>):</p>"
            + _table(["setting", "base acc", "attn+MLP k=1 acc", "state codes' precision",
                      "best neurons' precision", "JSD mlp_all", "JSD attn_mlp_all",
                      "success"], out))


def _remainder_section(rem: dict[str, Any] | None) -> list[str]:
    """Every MLP codebook patched with one layer's attention codebooks: which attention layer
    still carries state A after ``mlp_all``."""
    norm = (rem or {}).get("normalized_jsd") or {}
    if not norm:
        return []
    rows = [[name, v, ", ".join(rem["conditions"][name])] for name, v in norm.items()]
    return ["<h3>Where the rest of the divergence sits</h3>",
            "<p>Not a condition of the paper: every MLP codebook patched together with one "
            "layer's attention codebooks, on the same pairs. The layer whose addition lowers "
            "the divergence most is where state A still reaches the prediction when only the "
            "MLP codes are B's.</p>",
            _table(["condition", "normalised JSD", "codebooks patched"], rows)]


def write_demo_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the TokFSM demo's HTML report (atomically)."""
    cfg = report["config"]
    models = ["base", *cfg["variants"]]
    sc, ne = report.get("state_codes", {}), report.get("neurons", {})
    iv = report.get("intervention", {})
    fsm = cfg["fsm"]["config"]
    machine = report["machine"]
    met = [t["met"] for t in report["targets"]]
    if cfg.get("smoke"):
        headline = ("<p class='banner'><b>Smoke run</b> (<code>--quick</code>): tiny settings "
                    "that only check every stage runs. Its figures mean nothing; the targets "
                    "are not applicable. Run <code>make demo</code> for the real experiment.</p>")
    else:
        headline = (f"<p><b>{met.count(True)} of {len(met)} targets met</b>"
                    + (f", {met.count(False)} not met" if False in met else "") + ".</p>")
    model_rows = [[m, report[m].get("loss"), report[m].get("lm_acc"), report[m].get("state_acc"),
                   report[m].get("first_transition_acc"), report[m].get("codebook_mse"),
                   report[m].get("dead_code_fraction")] for m in models]
    per_state = [[r["state"], r["code"], r["precision"], r["recall"], r["activations"],
                  r["neuron"], r["neuron_precision"]] for r in sc.get("per_state", [])]
    codebook_rows = [[name, v["states_with_code"], v["mean_precision"], v["mean_recall"],
                      v["neurons_mean_precision"]] for name, v in sc.get("codebooks", {}).items()]
    norm = iv.get("normalized_jsd") or {}
    jsd_rows = [[name, iv.get("jsd", {}).get(name), norm[name], ", ".join(iv["conditions"][name])]
                for name in _in_order(norm)]
    start = "from scratch with its codebooks" if cfg.get("from_scratch") else "from the base model"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>TokFSM codebook report</title>",
        f"<style>{CSS}{EXTRA_CSS}</style></head><body>",
        "<h1>Codebook Features on TokFSM</h1>",
        headline,
        f"<p>FSM: {fsm['num_states']} states, {fsm['successors']} successors each, "
        f"{fsm['states_per_sequence']} states per sequence. Model: GPT-NeoX, {cfg['layers']} "
        f"layers &times; {cfg['hidden']}, {cfg['heads']} heads, MLP {cfg['mlp']}; base "
        f"{cfg['base_steps']} steps; each codebook model trained {start} for "
        f"{cfg['finetune_steps']} steps; batch {cfg['batch']}. Codebooks: {cfg['attn_codes']} "
        f"codes per attention head, {cfg['mlp_codes']} per MLP, &lambda; = "
        f"{cfg.get('mse_coeff', 1.0)}. Machine: {machine['cores']} cores, "
        f"{'CUDA' if machine['cuda'] else 'CPU only'}, torch {machine['torch']}. The paper: 100 "
        "states, 10 successors, batch 512, 20k steps on a GPU "
        "(<code>codebook-features demo --paper</code>).</p>",
        "<h2>Targets</h2>", _targets_table(report["targets"]),
        "<h2>Models (paper Table 1)</h2>",
        _table(["model", "loss", "LM acc", "state acc", "first-transition acc", "codebook MSE",
                "dead codes"], model_rows),
        _accuracy_plot(report, models),
        *_standard_section(report, cfg["variants"], f"attn_mlp_k{cfg['ks'][0]}"),
        "<h2>State codes vs neurons</h2>",
        f"<p>Model <code>attn_mlp_k{cfg['ks'][0]}</code>. In each codebook, each state's best "
        "code is searched on the positions of the state's final digit (recall: share of those "
        "positions where the code fires; precision: share of the code's firings that are on "
        "them; codes with recall &le; 1% dropped). Codebook "
        f"<code>{html.escape(str(sc.get('site')))}</code>: {sc.get('states_covered')} of "
        f"{sc.get('num_states')} states have a code; mean precision "
        f"<b>{_fmt(sc.get('mean_precision'))}</b>, mean recall {_fmt(sc.get('mean_recall'))}. "
        f"The best of {ne.get('count')} neurons ({html.escape(str(ne.get('set')))}) reaches "
        f"mean precision <b>{_fmt(ne.get('mean_precision'))}</b>.</p>",
        _precision_plot(sc, ne),
        "<h3>Every codebook</h3>",
        _table(["codebook", "states with a code", "mean precision", "mean recall",
                "best neurons' mean precision"], codebook_rows),
        f"<h3>Per state ({html.escape(str(sc.get('site')))})</h3>",
        _table(["state", "code", "precision", "recall", "firings", "best neuron",
                "its precision"], per_state),
        "<h2>Patching state codes</h2>",
        f"<p>{html.escape(str(iv.get('method', '')))}. {iv.get('pairs')} (A, B) pairs; "
        f"unpatched JSD {_fmt(iv.get('jsd_unpatched'))} nats. After patching every MLP "
        f"codebook, <b>{_fmt(iv.get('success'))}</b> of the next-state probability is on B's "
        f"successors (unpatched: {_fmt(iv.get('success_before'))}).</p>",
        _jsd_plot(iv),
        _table(["condition", "JSD (nats)", "normalised JSD", "codebooks patched"], jsd_rows),
        *_remainder_section(iv.get("remainder")),
        "" if cfg.get("smoke") else _calibration_table(),
        "<h2>Timings (s)</h2>",
        _table(["step", "seconds"], [[k, v] for k, v in report["timings"].items()]),
        "<p>Every figure is also in <code>report.json</code>.</p></body></html>",
    ]
    write_text(path, "\n".join(parts))
