"""This library against the authors' own code (PyPI ``codebook-features`` 0.1.2), same run.

Their package lives in its own venv (``bash scripts/authors/setup.sh`` makes
``.venv-authors``); this script times our side in-process and theirs in a child process of
that venv, shape by shape, each the median of ``--repeats`` after a warm-up. Prints one JSON
object per shape: ``ours_ms``, ``theirs_ms`` and ``speedup`` (theirs / ours).

- ``layer`` shapes (DESIGN.md section 3): one codebook layer, forward + backward, inputs
  ``(1, N, d)``, ``G`` groups of ``C`` codes, top-``k``, cosine (their ``inner_product``), the
  paper's lambda (their ``aeloss``);
- ``model`` shapes: a GPT-NeoX training step (forward + ``loss.backward()``) with codebooks on
  every layer's attention heads (their ``attn_preproj``, one group per head), and the same
  model's step without codebooks, so each side's overhead is its own ratio.

    python benchmarks/authors.py                 # every shape
    python benchmarks/authors.py --quick         # small shapes, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THEIR_PYTHON = ROOT / ".venv-authors" / "bin" / "python"

LAYER_SHAPES = [  # (N, d, C, k, G)
    (4096, 512, 10000, 8, 1), (4096, 512, 10000, 8, 8),
    (16384, 128, 1000, 1, 1), (16384, 128, 1000, 1, 4),
]
MODEL_SHAPES = {  # name: hidden, layers, heads, mlp, vocab, batch, seq, codes, k
    "tokfsm": (128, 4, 4, 512, 11, 64, 128, 1000, 1),
    "pythia-70m": (512, 6, 8, 2048, 50304, 8, 256, 10000, 8),
}
QUICK_LAYER = [(512, 64, 256, 2, 1), (512, 64, 256, 2, 4)]
QUICK_MODEL = {"tokfsm": (32, 2, 4, 64, 11, 4, 32, 64, 1)}


def _time(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _neox(spec, torch):
    import transformers as T

    hidden, layers, heads, mlp, vocab = spec[:5]
    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, intermediate_size=mlp, vocab_size=vocab,
                          max_position_embeddings=2048, hidden_dropout=0.0,
                          attention_dropout=0.0)
    return T.GPTNeoXForCausalLM(cfg).train()


def ours(kind: str, spec: tuple, warmup: int, repeats: int) -> dict:
    import torch

    from codebook_features import CodebookLayer, CodebookModel

    if kind == "layer":
        n, d, c, k, g = spec
        layer = CodebookLayer(dim=d, num_codes=c, k=k, groups=g).train()
        a = torch.randn(1, n, d, requires_grad=True)

        def run():
            layer(a).sum().backward()
            layer.zero_grad(set_to_none=True)
        return {"ms": _time(run, warmup, repeats)}
    base = _neox(spec, torch)
    model = CodebookModel(base, placements=["attn_heads"], num_codes=spec[7], k=spec[8]).train()
    ids = torch.randint(spec[4], (spec[5], spec[6]), generator=torch.Generator().manual_seed(0))

    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    with_cb = _time(run, warmup, repeats)
    model.disable_codebooks()
    without = _time(run, warmup, repeats)
    return {"ms": with_cb, "base_ms": without}


def theirs(kind: str, spec: tuple, warmup: int, repeats: int) -> dict:
    """Runs inside the authors' venv: their layer and their wrapped model."""
    import torch

    from codebook_features import models

    models.BaseSnapFunction.loss = "aeloss"
    if kind == "layer":
        n, d, c, k, g = spec
        layer = models.GroupCodebookLayer(dim=d, num_codes=c, key="bench", num_codebooks=g,
                                          snap_fn=models.InnerProductSnapFunction, kcodes=k)
        layer.train()
        layer.disable_logging()
        a = torch.randn(1, n, d, requires_grad=True)

        def run():
            layer(a).sum().backward()
            layer.zero_grad(set_to_none=True)
        return {"ms": _time(run, warmup, repeats)}
    base = _neox(spec, torch)
    cfg = models.CodebookModelConfig(codebook_at=["attn_preproj"], codebook_type=["group"],
                                     num_codebooks=[-1], k_codebook=[spec[8]],
                                     num_codes=spec[7], layers_to_snap="all",
                                     similarity_metric="inner_product", loss="aeloss")
    model = models.wrap_codebook(base, config=cfg).train()
    ids = torch.randint(spec[4], (spec[5], spec[6]), generator=torch.Generator().manual_seed(0))

    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    with_cb = _time(run, warmup, repeats)
    model.disable_codebooks()
    without = _time(run, warmup, repeats)
    return {"ms": with_cb, "base_ms": without}


def _their_run(kind: str, spec: tuple, warmup: int, repeats: int, threads: int) -> dict:
    cmd = [str(THEIR_PYTHON), __file__, "--_theirs", json.dumps([kind, list(spec), warmup,
                                                                 repeats, threads])]
    env = {**os.environ, "PYTHONPATH": "", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")
    if out.returncode:
        raise SystemExit(f"the authors' side failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on both sides (default 1: steadier on a busy machine)")
    ap.add_argument("--only", choices=["layer", "model"], help="one kind of shape")
    ap.add_argument("--_theirs", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    if args._theirs:
        kind, spec, warmup, repeats, threads = json.loads(args._theirs)
        torch.set_num_threads(threads)
        print(json.dumps(theirs(kind, tuple(spec), warmup, repeats)))
        return
    if not THEIR_PYTHON.is_file():
        raise SystemExit(f"{THEIR_PYTHON} not found: run `bash scripts/authors/setup.sh` first")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    warmup = 1
    work = [("layer", s) for s in (QUICK_LAYER if args.quick else LAYER_SHAPES)]
    work += [("model", (name, s)) for name, s in
             (QUICK_MODEL if args.quick else MODEL_SHAPES).items()]
    for kind, spec in work:
        if args.only and kind != args.only:
            continue
        name, shape = spec if kind == "model" else ("x".join(map(str, spec)), spec)
        mine = ours(kind, shape, warmup, repeats)
        other = _their_run(kind, shape, warmup, repeats, args.threads)
        row = {"kind": kind, "shape": name, "ours_ms": round(mine["ms"], 1),
               "theirs_ms": round(other["ms"], 1),
               "speedup": round(other["ms"] / mine["ms"], 2), "threads": args.threads,
               "repeats": repeats, "load_avg": round(os.getloadavg()[0], 2)}
        if kind == "model":
            row.update(ours_overhead=round(mine["ms"] / mine["base_ms"], 3),
                       theirs_overhead=round(other["ms"] / other["base_ms"], 3),
                       spec=dict(zip(["hidden", "layers", "heads", "mlp", "vocab", "batch",
                                      "seq", "num_codes", "k"], shape, strict=True)))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
