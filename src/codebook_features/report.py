"""Self-contained HTML reports (tables, and matplotlib plots inlined as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

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
