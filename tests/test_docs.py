"""The documentation builds with ``mkdocs build --strict`` (a broken link, a stale reference
or a docstring mkdocstrings cannot read fails it), its API reference covers every module, and
the performance tables come from the benchmark scripts' JSON (scripts/render_benchmarks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import render_benchmarks as rb  # noqa: E402
import tokfsm_results  # noqa: E402

sys.path.pop(0)

QUIET = {"NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(config), "-d", str(site)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **QUIET})


def test_docs_build_strict(tmp_path):
    out = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING" not in "\n".join(
        line for line in out.stderr.splitlines() if " -  " in line), out.stderr[-3000:]
    modules = {".".join(p.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(
               ".__init__") for p in (ROOT / "src" / "codebook_features").rglob("*.py")
               if p.name == "__init__.py" or not p.name.startswith("_")}
    for module in modules:  # one reference page per module, nothing listed by hand
        assert (tmp_path / "site" / "reference" / module / "index.html").is_file(), module
    page = tmp_path / "site" / "reference" / "codebook_features.codebook" / "index.html"
    assert "CodebookLayer" in page.read_text()
    # Sphinx roles in docstrings are shown as plain code (scripts/docs_roles.py).
    pages = [p.read_text() for p in (tmp_path / "site" / "reference").rglob("*.html")]
    assert not [p for p in pages if ":meth:<code>" in p or ":func:<code>" in p]


def test_docs_build_fails_on_a_broken_link(tmp_path):
    """The strict build is not a formality: one link to a page that does not exist fails it."""
    import shutil

    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    (docs / "index.md").write_text((docs / "index.md").read_text()
                                   + "\nSee [the missing page](missing.md).\n")
    config = (ROOT / "mkdocs.yml").read_text()
    config = config.replace("docs_dir: docs", f"docs_dir: {docs}")
    config = config.replace("- scripts/", f"- {ROOT / 'scripts'}/")
    config = config.replace("paths: [src]", f"paths: [{ROOT / 'src'}]")
    (tmp_path / "mkdocs.yml").write_text(config)
    out = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert out.returncode != 0 and "missing.md" in out.stderr, out.stderr[-3000:]


SNAP_ROWS = [
    {"load_avg_before": 0.5, "cpus": 2, "threads": 1},
    {"impl": "matmul", "N": 64, "d": 8, "C": 16, "k": 1, "G": 1, "fwd_ms": 0.5,
     "fwdbwd_ms": None},
    {"impl": "codebook", "N": 64, "d": 8, "C": 16, "k": 1, "G": 1, "fwd_ms": 1.0,
     "fwdbwd_ms": 2.0, "backend": "torch", "naive_x": 3.0, "fwdbwd_x_faiss": 1.5,
     "peak_mib": 1.25, "peak_mib_pinned": 1.0},
    {"impl": "naive", "N": 64, "d": 8, "C": 16, "k": 1, "G": 1, "fwd_ms": 3.0,
     "fwdbwd_ms": 6.0, "peak_mib": 10.0},
    {"impl": "faiss_flatip", "N": 64, "d": 8, "C": 16, "k": 1, "G": 1, "fwd_ms": 1.333,
     "fwdbwd_ms": None},
]


def test_snap_table_from_the_scripts_rows():
    got = rb.snap_table(SNAP_ROWS).splitlines()
    assert got[0] == ("| N | d | C | k | G | matmul (fwd) | this layer (auto) | naive | "
                      "FAISS flat IP (fwd) | naive ÷ layer | layer ÷ FAISS fwd | "
                      "peak MiB layer / naive |")
    assert got[2] == ("| 64 | 8 | 16 | 1 | 1 | 0.5 | 2.0 (torch) | 6.0 | 1.3 | 3.00 × | "
                      "1.50 × | 1.2 / 10.0 |")
    assert len(got) == 3


def test_model_and_authors_tables():
    model = rb.model_table([{"shape": "tokfsm", "batch": 64, "seq": 128, "num_codes": 1000,
                             "k": 1, "base_step_ms": 100.0, "codebook_step_ms": 114.0,
                             "overhead": 1.14, "cpu_overhead": 1.1, "threads": 1,
                             "load_avg": 0.9}])
    assert model.splitlines()[2] == ("| tokfsm | 64 × 128 | 1000 | 1 | 100.0 | 114.0 | 1.14 × | "
                                     "1.10 × | 1 | 0.9 |")
    authors = rb.authors_table([{"kind": "layer", "shape": "512x64x256x2x1", "ours_ms": 2.0,
                                 "theirs_ms": 5.0, "speedup": 2.5, "threads": 1,
                                 "load_avg": 1.0}])
    assert authors.splitlines()[2] == ("| layer | 512x64x256x2x1 | 2.0 | 5.0 | 2.50 × | — | — | "
                                       "1 | 1.0 |")


def test_render_reads_stored_results_and_says_what_is_missing(tmp_path):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "snap.jsonl").write_text(
        "loading...\n" + "\n".join(json.dumps(r) for r in SNAP_ROWS) + "\n")
    text = rb.render("snap", root=tmp_path)
    assert text.startswith("From `benchmarks/results/snap.jsonl`, written by `python "
                           "benchmarks/snap.py --threads 1")
    assert "(2 CPUs, load average 0.5 at the start)" in text
    assert rb.snap_table(SNAP_ROWS) in text
    missing = rb.render("model", root=tmp_path)
    assert missing.startswith("*Not stored yet.* `python benchmarks/model.py")
    page = "intro\n<!-- benchmark: snap -->\nafter\n"
    assert rb.on_page_markdown(page) != page
    with pytest.raises(ValueError, match="unknown benchmark table 'nope'"):
        rb.on_page_markdown("<!-- benchmark: nope -->\n")


def test_calibration_table_is_the_stored_runs():
    runs = json.loads((ROOT / "benchmarks" / "tokfsm_calibration.json").read_text())
    lines = rb.calibration_table(runs).splitlines()
    assert len(lines) == 2 + len(runs)
    last = runs[-1]["figures"]
    assert f"{100 * last['state_codes.mean_precision']:.1f}%" in lines[-1]
    assert str(last["intervention.normalized_jsd"]["mlp_all"]) in lines[-1]


def fake_report(smoke: bool = False) -> dict:
    jsd = {"mlp_all": 0.25, "attn_all": 0.6, "mlp_layer1": 0.64, "attn_layer0": 0.7,
           "attn_mlp_all": 0.0001, "mlp_layer0": 0.76}
    row = {"loss": 0.85, "lm_acc": 0.556, "state_acc": 0.963, "first_transition_acc": 0.959,
           "standard": {"all": {}}}
    return {
        "config": {"smoke": smoke, "variants": ["attn_k1", "attn_mlp_k1", "attn_mlp_k4"],
                   "fsm": {"transitions": [[1]]}, "out": "/x", "hidden": 64},
        "machine": {"cores": 2, "torch": "2.13.0+cpu"},
        "timings": {"total_s": 480.5},
        "base": row, "attn_k1": {**row, "state_acc": 0.97},
        "attn_mlp_k1": {**row, "state_acc": 0.91}, "attn_mlp_k4": {**row, "state_acc": 0.95},
        "state_codes": {"site": "layers.3.mlp_out", "states_covered": 40, "num_states": 40,
                        "mean_precision": 0.9999, "mean_recall": 0.39, "per_state": [1, 2]},
        "neurons": {"count": 512, "mean_precision": 0.861, "precisions": [0.5]},
        "intervention": {"pairs": 400, "normalized_jsd": jsd, "success": 0.25,
                         "success_before": 0.12, "pairs_used": [[0, 1, 2, 3]],
                         "remainder": {"normalized_jsd": {"mlp_all+attn_layer0": 0.12,
                                                          "mlp_all+attn_layer1": 0.24},
                                       "conditions": {}}},
        "targets": [{"target": "base state accuracy >= 0.90", "value": 0.963, "met": True},
                    {"target": "state codes >= 0.20 above the best neurons",
                     "value": [0.9999, 0.861], "met": False}],
    }


def test_tokfsm_demo_results_come_from_a_report(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(fake_report()))
    out = tmp_path / "benchmarks" / "results" / "tokfsm_demo.json"
    assert tokfsm_results.main([str(report), "--wall-s", "495", "--out", str(out)]) == 0
    stored = json.loads(out.read_text())
    assert "fsm" not in stored["config"] and "pairs_used" not in stored["intervention"]
    text = rb.render("tokfsm_demo", root=tmp_path)
    assert "480.5 s in the demo, 495.0 s wall for the whole command" in text
    assert "| attention + MLP, k=4 | 0.85 | 55.6% | 95.0% | 95.9% |" in text
    assert "| attention only, k=1 | 0.85 | 55.6% | 97.0% | 95.9% |" in text
    assert "mean precision 100.0% at mean recall 39.0%" in text and ": 86.1%." in text
    # the conditions in the paper's order
    assert ("| normalised JSD | 0.7 | 0.76 | 0.64 | 0.6 | 0.25 | 0.0001 |") in text
    assert "| normalised JSD | 0.12 | 0.24 |" in text and "| mlp_all+attn_layer0 |" in text
    assert "| state codes >= 0.20 above the best neurons | [0.9999, 0.861] | **not met** |" in text
    report.write_text(json.dumps(fake_report(smoke=True)))
    assert tokfsm_results.main([str(report), "--out", str(out)]) == 2


def test_readme_performance_summary_is_the_stored_results(tmp_path):
    """The README's performance bullets are what the stored JSON gives (rerun
    ``scripts/render_benchmarks.py --readme`` after storing a run)."""
    assert rb.write_readme(ROOT, check=True), "run: python scripts/render_benchmarks.py --readme"
    # from rows, the figures themselves
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "README.md").write_text("a\n<!-- performance-summary -->\nold\n"
                                        "<!-- /performance-summary -->\nb\n")
    rows = [{"cpus": 2, "threads": 1, "load_avg_before": 0.1},
            {**SNAP_ROWS[2], "naive_x": 4.5, "fwdbwd_x_faiss": 0.2, "naive_peak_x": 8.0},
            {**SNAP_ROWS[2], "N": 8, "naive_x": 7.25, "fwdbwd_x_faiss": 0.1,
             "naive_peak_x": 12.0}]
    (tmp_path / "benchmarks" / "results" / "snap.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "benchmarks" / "results" / "model.jsonl").write_text(json.dumps(
        {"shape": "tokfsm", "overhead": 1.137}) + "\n")
    assert rb.write_readme(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "forward + backward 4.50–7.25 × faster, peak memory 8.00–12.00 × smaller; " \
           "forward + backward in 0.10–0.20 × the time of FAISS's bare forward search." in text
    assert "1.14 × at the tokfsm shape" in text
    assert "**Against the authors' package** (`benchmarks/authors.py`): not stored yet." in text
    assert text.startswith("a\n<!-- performance-summary -->\n") and text.endswith(
        "<!-- /performance-summary -->\nb\n") and "old" not in text
