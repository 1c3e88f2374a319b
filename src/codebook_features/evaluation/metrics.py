"""A codebook model's evaluation in the paper's Table 2 form, as a dict, log keys or a table.

LM loss, next-token accuracy and perplexity with and without the codebooks, and the
standard sparse-autoencoder evaluation (SAELens, SAEBench) for each site spliced in alone and
for all sites: CE loss recovered against zero- and mean-ablation, KL divergence from the
base model, explained variance, L0 and alive codes (:mod:`.standard`).
"""

from __future__ import annotations

import math
from typing import Any


def evaluate_codebooks(model, eval_ds, batch_size: int = 16, per_site: bool = True
                       ) -> dict[str, Any]:
    """LM metrics with and without codebooks, per-site codebook statistics and the standard
    sparse-autoencoder evaluation (:mod:`codebook_features.evaluation.standard`).

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
    from .standard import standard_evaluation

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
