"""Planted bugs, one at a time, against the tests that should catch them.

Each mutant is a textual edit ``(file, old, new)`` of the core (codebook, snap, sites, model,
training, the analysis statistics: code search and the TokFSM metrics). The source tree is
copied to a temporary folder (``git archive`` of a commit, HEAD by default, or the working
tree with ``--worktree``); each mutant is applied to the copy, the mutant's test files run
against it (``PYTHONPATH`` puts the copy's ``src`` first, subprocesses included), and the
copy is restored. The shared working tree is never modified. A mutant is *killed* when a
test fails, *survived* when all pass, *skipped* when its text no longer occurs exactly once
(the code changed: update the pattern).

    python scripts/mutation_check.py                 # every mutant, a table and a JSON line
    python scripts/mutation_check.py --only window late --jobs 2 --json out.json

First a baseline run of every test file used must pass on the unmutated copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "src/codebook_features/"

CODEBOOK_TESTS = ("tests/test_codebook.py", "tests/test_search.py", "tests/test_kernels.py")
DEAD_TESTS = ("tests/test_dead_codes.py", "tests/test_codebook.py")
SITE_TESTS = ("tests/test_sites.py", "tests/test_model.py")
TRAIN_TESTS = ("tests/test_dead_codes.py", "tests/test_training.py")
INDEX_TESTS = ("tests/test_code_index.py", "tests/test_analysis_cli.py")
FSM_TESTS = ("tests/test_fsm_metrics.py",)
ANALYSIS_TESTS = ("tests/test_fsm_analysis.py",)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


MUTANTS = [
    # ---------------------------------------------------------------- dead codes
    Mutant("window", "codebook/usage.py",
           "return (self.step - self.last_fired) >= self.config.dead_code_window",
           "return (self.step - self.last_fired) > self.config.dead_code_window",
           DEAD_TESTS, "dead one step after the window is reached"),
    Mutant("window_short", "codebook/usage.py",
           "return (self.step - self.last_fired) >= self.config.dead_code_window",
           "return (self.step - self.last_fired) >= self.config.dead_code_window - 1",
           DEAD_TESTS, "dead one step before the window is reached"),
    Mutant("clock_not_restarted", "codebook/usage.py",
           "        self.last_fired[g_idx, c_idx] = self.step\n",
           "        pass\n",
           DEAD_TESTS, "a replaced code keeps its old firing step"),
    Mutant("fired_mask", "codebook/usage.py",
           "self.last_fired.masked_fill_(counts > 0, self.step)",
           "self.last_fired.masked_fill_(counts > 1, self.step)",
           DEAD_TESTS, "a code chosen once in a batch does not count as fired"),
    Mutant("late", "training/trainer.py",
           "if every and state.global_step % every == 0 and",
           "if every and state.global_step > 1 and (state.global_step - 1) % every == 0 and",
           TRAIN_TESTS, "replacement one optimizer step late"),
    Mutant("last_step", "training/trainer.py",
           "state.global_step < state.max_steps:",
           "state.global_step <= state.max_steps:",
           TRAIN_TESTS, "replacement also after the last step"),
    Mutant("ga_clock", "training/trainer.py",
           "layer.step.fill_(start + 1)",
           "layer.step.fill_(int(layer.step))",
           TRAIN_TESTS, "gradient accumulation: the clock counts micro-batches"),
    Mutant("ga_share", "training/trainer.py",
           "self._mse_share = plan[j] / sum(plan)",
           "self._mse_share = 1.0",
           TRAIN_TESTS, "gradient accumulation: each micro-batch's MSE gradient at full weight"),
    Mutant("ddp_min", "training/trainer.py",
           "dist.all_reduce(layer.last_fired, op=dist.ReduceOp.MAX)",
           "dist.all_reduce(layer.last_fired, op=dist.ReduceOp.MIN)",
           ("tests/test_ddp.py",), "processes agree on the oldest firing step"),
    Mutant("resume_codebooks", "training/trainer.py",
           "            layer.load_state_dict(loaded.site(name).state_dict())",
           "            pass",
           TRAIN_TESTS, "resume does not load the codebooks and their statistics"),
    # ------------------------------------------------------------ layer numerics
    Mutant("ste_sign", "snap/combine.py",
           "grad_x = grad_y if ",
           "grad_x = -grad_y if ",
           CODEBOOK_TESTS, "straight-through gradient with the wrong sign"),
    Mutant("mean_sum", "snap/combine.py",
           'return 1.0 / k if combine == "mean" else 1.0',
           'return 1.0 if combine == "mean" else 1.0 / k',
           CODEBOOK_TESTS, "mean and sum swapped"),
    Mutant("group_offset", "snap/combine.py",
           "offsets = torch.arange(g, device=codes.device).mul_(num_codes).view(1, g, 1)",
           "offsets = torch.arange(g, device=codes.device).mul_(num_codes - 1).view(1, g, 1)",
           CODEBOOK_TESTS, "wrong group offset into the flat codebook"),
    Mutant("mse_sign", "snap/combine.py",
           "row = torch.sub(y, x)",
           "row = torch.sub(x, y)",
           CODEBOOK_TESTS, "MSE gradient with the wrong sign (torch path)"),
    Mutant("cosine_keys", "snap/scores.py",
           'if similarity == "cosine":\n        return _unit_keys(codebook, ws), None',
           'if similarity == "cosine":\n        return codebook, None',
           CODEBOOK_TESTS, "cosine ranks by inner product"),
    Mutant("euclid_bias", "snap/scores.py",
           "return codebook, -0.5 * codebook.pow(2).sum(-1)",
           "return codebook, 0.5 * codebook.pow(2).sum(-1)",
           CODEBOOK_TESTS, "Euclidean bias with the wrong sign"),
    Mutant("euclid_score", "snap/scores.py",
           "return 2 * scores - sq.unsqueeze(-1)",
           "return 2 * scores + sq.unsqueeze(-1)",
           CODEBOOK_TESTS, "Euclidean scores not the negative squared distance"),
    Mutant("block_index", "snap/topk.py",
           "idx = blk.gather(-1, torch.div(j, bs, rounding_mode=\"floor\")).mul_(bs).add_(j % bs)",
           "idx = blk.gather(-1, torch.div(j, bs, rounding_mode=\"floor\")).mul_(bs)"
           ".add_((j + 1) % bs)",
           CODEBOOK_TESTS, "block-max top-k returns the neighbour's index (torch path)"),
    Mutant("certificate", "snap/screen.py",
           "return (v[..., -1] - 1.1 * err > bound + 2 * _U * bound.abs()).all(-1)",
           "return (v[..., -1] > bound).all(-1)",
           CODEBOOK_TESTS, "bf16 screen certifies without its error bound"),
    Mutant("rerank_offset", "snap/torch_search.py",
           "offsets = torch.arange(g, device=x.device).view(1, g, 1) * keys.shape[1]",
           "offsets = torch.arange(g, device=x.device).view(1, g, 1) * keys.shape[2]",
           CODEBOOK_TESTS, "shortlist re-rank reads another group's keys"),
    Mutant("stats_mse", "codebook/usage.py",
           "mse=float(self.sse / max(tokens * c.dim, 1)),",
           "mse=float(self.sse / max(tokens, 1)),",
           DEAD_TESTS, "statistics' MSE per token, not per element"),
    Mutant("fvu_centre", "codebook/usage.py",
           "mean_sq = self.sum_x2 - self.sum_x.pow(2).sum() / max(tokens, 1)",
           "mean_sq = self.sum_x2",
           DEAD_TESTS, "FVU against the uncentred variance"),
    Mutant("ablate", "codebook/interventions.py",
           "w = w.masked_fill(ablated, 0.0)",
           "w = w.masked_fill(ablated, 0.5)",
           DEAD_TESTS, "ablated codes still contribute"),
    # --------------------------------------------------------------------- sites
    Mutant("attn_heads_same_width", "sites.py",
           '_LLAMA_LIKE = ArchSpec("model.layers", "self_attn", "self_attn.o_proj",',
           '_LLAMA_LIKE = ArchSpec("model.layers", "self_attn", "self_attn.q_proj",',
           SITE_TESTS, "Llama-like attn_heads on q_proj (same width as o_proj)"),
    Mutant("gpt2_attn_heads", "sites.py",
           '"gpt2": ArchSpec("transformer.h", "attn", "attn.c_proj", "mlp", "mlp.c_proj"),',
           '"gpt2": ArchSpec("transformer.h", "attn", "attn.c_attn", "mlp", "mlp.c_proj"),',
           SITE_TESTS, "GPT-2 attn_heads on c_attn (same input width)"),
    Mutant("neox_mlp_hidden", "sites.py",
           '"mlp.dense_4h_to_h"),',
           '"mlp.dense_h_to_4h"),',
           SITE_TESTS, "GPT-NeoX mlp_hidden before the nonlinearity"),
    Mutant("residual_is_mlp", "sites.py",
           'return Site(name, i, placement, prefix, "post", hidden, 1) if hidden else None',
           'return Site(name, i, placement, full(paths["mlp"] or ""), "post", hidden, 1) '
           'if hidden else None',
           SITE_TESTS, "residual hooked on the MLP output (same width)"),
    Mutant("discovery_down", "sites.py",
           '_DOWN_NAMES = ("down_proj",',
           '_DOWN_NAMES = ("up_proj", "down_proj",',
           SITE_TESTS, "generic discovery takes the up projection as the down projection"),
    # --------------------------------------------------------------------- model
    Mutant("heads_groups", "model.py",
           "groups = config.groups if config.groups is not None else s.heads",
           "groups = config.groups if config.groups is not None else 1",
           SITE_TESTS, "attn_heads not grouped per head"),
    Mutant("loss_mean", "model.py",
           "return torch.stack(terms).sum().detach()",
           "return torch.stack(terms).mean().detach()",
           SITE_TESTS + ("tests/test_training.py",), "codebook loss averaged over sites"),
    # ------------------------------------------------------------------ analysis
    Mutant("prec_recall", "analysis/search/code_index.py",
           "prec, rec = h / f, h / len(rows)",
           "rec, prec = h / f, h / len(rows)",
           INDEX_TESTS, "precision and recall swapped"),
    Mutant("sort_by_recall", "analysis/search/code_index.py",
           "order = np.lexsort((keep, -rec, -prec))",
           "order = np.lexsort((keep, -prec, -rec))",
           INDEX_TESTS, "codes sorted by recall first"),
    Mutant("fsm_recall", "experiments/tokfsm/metrics/state_codes.py",
           "recall = torch.where(fired, top.double() / state_totals[best].clamp(min=1), zero)",
           "recall = torch.where(fired, top.double() / activations.clamp(min=1), zero)",
           FSM_TESTS, "TokFSM code recall divided by the code's firings (= precision)"),
    Mutant("fsm_threshold", "experiments/tokfsm/metrics/state_codes.py",
           "state_codes = torch.nonzero(fired & (precision >= precision_threshold)",
           "state_codes = torch.nonzero(fired & (precision > precision_threshold)",
           FSM_TESTS, "state codes need precision above, not at, the threshold"),
    Mutant("fsm_distinct", "experiments/tokfsm/metrics/state_codes.py",
           "pairs = torch.unique(pos * num_codes + codes.reshape(-1))  # distinct (position, "
           "code)\n    return pairs // num_codes, pairs % num_codes",
           "pairs = pos * num_codes + codes.reshape(-1)\n"
           "    return pairs // num_codes, pairs % num_codes",
           FSM_TESTS, "a code chosen twice at one position counts twice"),
    Mutant("fsm_recall_rank", "experiments/tokfsm/metrics/neurons.py",
           "return min(n, max(1, math.ceil(recall * n * (1 - 1e-6))))",
           "return min(n, max(1, math.floor(recall * n)))",
           FSM_TESTS, "neuron threshold admits one position too few for the recall"),
    Mutant("neuron_count", "analysis/search/neurons.py",
           "best = np.maximum(best, need / (m + 1))",
           "best = np.maximum(best, need / (m + 2))",
           INDEX_TESTS, "neuron baseline counts one token too many"),
    Mutant("patch_position", "experiments/tokfsm/analysis.py",
           "pos = fsm.digits * (j + 1)  # A's final digit",
           "pos = fsm.digits * (j + 1) - 1  # A's final digit",
           ANALYSIS_TESTS, "B's codes patched at A's first digit, not its final one"),
    Mutant("best_code_by_recall", "experiments/tokfsm/metrics/code_search.py",
           "top = ok & (p_ok == p_ok.max(1, keepdim=True).values)",
           "top = ok",
           ANALYSIS_TESTS, "each state keeps its most frequent code, not its most precise"),
    Mutant("remainder_mixed", "experiments/tokfsm/analysis.py",
           'out["remainder"] = {"normalized_jsd": norm(extra), "conditions": extra}',
           'out["remainder"] = {"normalized_jsd": dict(zip(extra, norm(list(extra)[::-1])'
           '.values())), "conditions": extra}',
           ANALYSIS_TESTS, "the remainder's figures under each other's names"),
]


def copy_tree(dest: Path, worktree: bool, ref: str) -> None:
    if worktree:
        for part in ("src", "tests", "configs", "benchmarks", "docs", "README.md", "mkdocs.yml",
                     "pyproject.toml"):
            src = ROOT / part
            if src.is_dir():
                shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns(
                    "__pycache__", "*.pyc", ".pytest_cache"))
            elif src.exists():
                shutil.copy2(src, dest / part)
        return
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """(passed | failed | timeout, seconds, last lines of output)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(copy / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, ""
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    failed = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    tail = "\n".join(failed[:1] or lines[-3:])
    return ("passed" if proc.returncode == 0 else "failed"), time.time() - start, tail


def check_import(copy: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(copy / "src")}
    out = subprocess.run([sys.executable, "-c", "import codebook_features as c; "
                          "print(c.__file__)"], cwd=copy, env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    if not out.startswith(str(copy)):
        raise SystemExit(f"the copy is not the imported package ({out})")


def run_mutant(m: Mutant, base: Path, worktree: bool, ref: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mut-{m.name}-", dir=base) as d:
        copy = Path(d)
        copy_tree(copy, worktree, ref)
        path = copy / PKG / m.file
        text = path.read_text()
        if text.count(m.old) != 1:
            return {"mutant": m.name, "file": m.file, "result": "skipped",
                    "why": f"pattern found {text.count(m.old)} times", "what": m.what}
        path.write_text(text.replace(m.old, m.new))
        status, secs, tail = run_tests(copy, m.tests, timeout)
    result = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[status]
    return {"mutant": m.name, "file": m.file, "result": result, "seconds": round(secs, 1),
            "tests": list(m.tests), "what": m.what,
            **({"killed_by": tail.splitlines()[-1] if tail else ""} if status == "failed"
               else {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="mutant names (default: all)")
    p.add_argument("--worktree", action="store_true",
                   help="copy the working tree (uncommitted edits included), not a commit")
    p.add_argument("--ref", default="HEAD", help="commit to copy (default HEAD)")
    p.add_argument("--jobs", type=int, default=1, help="mutants run at once")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per test run")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    p.add_argument("--tests", nargs="*", help="run these test files instead of each "
                   "mutant's own (e.g. to see which mutants an older suite misses)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = p.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.tests:
        mutants = [dataclasses.replace(m, tests=tuple(args.tests)) for m in mutants]
    if args.list:
        for m in mutants:
            print(f"{m.name:24} {m.file:20} {m.what}")
        return 0
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutants: {sorted(unknown)}")
    base = Path(tempfile.mkdtemp(prefix="mutation-check-"))
    try:
        if not args.no_baseline:
            copy = base / "baseline"
            copy.mkdir()
            copy_tree(copy, args.worktree, args.ref)
            check_import(copy)
            tests = tuple(sorted({t for m in mutants for t in m.tests}))
            status, secs, tail = run_tests(copy, tests, args.timeout * 2)
            print(f"baseline ({len(tests)} test files): {status} in {secs:.0f} s", flush=True)
            if status != "passed":
                print(tail)
                return 2
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = []
            for r in pool.map(lambda m: run_mutant(m, base, args.worktree, args.ref,
                                                   args.timeout), mutants):
                print(f"{r['mutant']:24} {r['result']:9} {r.get('seconds', '-'):>7}  "
                      f"{r['what']}", flush=True)
                results.append(r)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    counts = {k: sum(r["result"] == k for r in results)
              for k in ("killed", "survived", "skipped", "timeout")}
    print(json.dumps({"counts": counts, "results": results}))
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "results": results},
                                              indent=1) + "\n")
    return 1 if counts["survived"] or counts["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
