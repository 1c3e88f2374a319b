"""The comparison's report: its tables as markdown and HTML, and the files written."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..io import write_json, write_text


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def report_tables(r: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables: (title, header, rows of cells)."""
    from ..evaluation import STANDARD_COLUMNS

    names = {"codebook": "codebook (the model's)", "codebook_fresh": "codebook (fresh, "
             "trained here)", "sae": "TopK SAE (sparsify)"}
    std = [[names[n]] + [fmt.format(row[key]) if row[key] == row[key] else "n/a"
                         for key, _, fmt in STANDARD_COLUMNS]
           for n, row in r["standard"].items()]
    cost = []
    for n in ("codebook", "sae"):
        cst = r["training_cost"].get(n)
        label = names["codebook_fresh" if n == "codebook" else n]
        seen = r["config"]["steps"] * min(r["config"]["batch_tokens"], r["train_tokens"])
        cost.append([label, str(r["config"]["steps"]), str(seen)] + (
            [f"{cst['seconds']:.1f}", f"{cst['peak_memory_mib']:.0f} ({cst['memory']})"]
            if cst else ["given (--sae)", "given (--sae)"]))
    interp = []

    def unit(u: dict[str, Any] | None, key: str) -> list[str]:
        if u is None:
            return ["none", "n/a", "n/a"]
        ident = f"{u['group']}/{u['code']}" if key == "code" else str(u["latent"])
        return [ident, _pct(u["precision"]), _pct(u["recall"])]

    for t, row in r["interpretability"]["topics"].items():
        interp.append([t, str(row["positives"])] + unit(row["code"], "code")
                      + unit(row["latent"], "latent")
                      + [_pct(row["neuron_at_code_recall"]),
                         _pct(row["neuron_at_latent_recall"])])
    m = r["interpretability"]["mean"]
    if m:
        interp.append([f"mean ({m['topics']} topics)", "", "", _pct(m["code_precision"]),
                       _pct(m["code_recall"]), "", _pct(m["latent_precision"]),
                       _pct(m["latent_recall"]), _pct(m["neuron_at_code_recall"]),
                       _pct(m["neuron_at_latent_recall"])])
    steer = []
    by = {n: {row["topic"]: row for row in r["steering"][n]["rows"]} for n in r["steering"]}
    for t in r["config"]["topics"]:
        cb, sa = by["codebook"][t], by["sae"][t]
        steer.append([t, str(cb["codes"]), str(cb["samples"]), _pct(cb["baseline"]),
                      _pct(cb["steered"]), _pct(sa["baseline"]), _pct(sa["steered"])])
    return [
        ("Standard evaluation (each spliced into the site alone)",
         ["Dictionary"] + [h for _, h, _ in STANDARD_COLUMNS], std),
        ("Training cost (same activations, same batches)",
         ["Dictionary", "Steps", "Tokens seen", "Seconds", "Peak memory (MiB)"], cost),
        ("Regex search: best code, best SAE latent, best neuron at their recall",
         ["Topic", "Positives", "Code (group/code)", "Precision", "Recall", "SAE latent",
          "Precision", "Recall", "Neuron P @ code R", "Neuron P @ latent R"], interp),
        ("Topic steering (Table 3): mention rate, unsteered vs steered",
         ["Topic", "Units", "Samples", "Codebook baseline", "Codes on", "SAE baseline",
          "Latents on"], steer),
    ]


def format_report(r: dict[str, Any]) -> str:
    """The report as markdown tables (what the command prints)."""
    s = r["sizes"]
    parts = [f"Site {r['site']}: codebook {s['groups']} x {s['codes'] // s['groups']} codes, "
             f"L0 {s['l0']}; TopK SAE {s['sae_latents']} latents, k={s['sae_k']} "
             f"({r['library']['name']} {r['library']['version']}); {r['train_tokens']} "
             f"training tokens, {r['documents']} held-out documents"]
    for title, head, rows in report_tables(r):
        parts.append(f"{title}\n\n| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|\n"
                     + "\n".join("| " + " | ".join(row) + " |" for row in rows))
    return "\n\n".join(parts)


def format_html(r: dict[str, Any]) -> str:
    """The report as one HTML page (the same tables)."""
    e = html.escape
    body = [f"<h1>Codebook vs TopK SAE at {e(r['site'])}</h1>",
            f"<p>{e(format_report(r).split(chr(10))[0])}</p>"]
    for title, head, rows in report_tables(r):
        body.append(f"<h2>{e(title)}</h2><table><tr>"
                    + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                              for row in rows) + "</table>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>compare "
            f"{e(r['site'])}</title><style>{style}</style></head><body>{''.join(body)}"
            "</body></html>\n")


def write_report(r: dict[str, Any], out: Path) -> None:
    write_json(out / "report.json", r)
    write_text(out / "report.md", format_report(r) + "\n")
    write_text(out / "report.html", format_html(r))
