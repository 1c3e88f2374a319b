"""Training-step time with and without codebooks on every layer's attention heads.

One forward + ``loss.backward()`` (no optimizer) of a GPT-NeoX model built from a config, with
codebooks (``attn_heads``, all layers) on and off in the same run and on the same model: off
means the hooks pass activations through untouched, i.e. the base model's step. Prints one
JSON object per shape: ``shape``, ``base_step_ms``, ``codebook_step_ms``, ``overhead`` (median
over repeats after warm-up; the variants alternate so that drift hits all alike), plus
``site_ln_step_ms`` / ``site_ln_overhead`` (the same codebooks with one LayerNorm over the whole
width instead of the authors' one per head, ``layernorm_scope="site"``: what their per-head
LayerNorm costs), plus
``cpu_overhead`` (the same ratio in process CPU time, steadier on a shared machine) and the
load average (figures taken with a load above the core count are not trustworthy).

    python benchmarks/model.py            # Pythia-70m shape and TokFSM shape
    python benchmarks/model.py --quick    # smaller batches, fewer repeats
    python benchmarks/model.py --profile  # also print the top ops of a codebook step (stderr)

Targets: overhead <= 1.3 (Pythia-70m shape), <= 1.15 (TokFSM shape). The paper's reference
implementation measured 2.08x and 1.57x on this kind of machine (DESIGN.md section 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from codebook_features.model import CodebookModel


@dataclass
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    mlp: int
    vocab: int
    batch: int
    seq: int
    num_codes: int
    k: int


SHAPES = [
    Shape("pythia-70m", 512, 6, 8, 2048, 50304, 8, 256, 10_000, 8),
    Shape("tokfsm", 128, 4, 4, 512, 11, 64, 128, 1000, 1),
]
QUICK = {"pythia-70m": (2, 128), "tokfsm": (16, 128)}


def build(shape: Shape, **codebook_kw) -> CodebookModel:
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=shape.mlp,
                        vocab_size=shape.vocab, max_position_embeddings=2048,
                        rotary_pct=0.25, use_parallel_residual=True,
                        hidden_dropout=0.0, attention_dropout=0.0)
    base = GPTNeoXForCausalLM(cfg).train()
    return CodebookModel(base, placements=["attn_heads"], num_codes=shape.num_codes,
                         k=shape.k, **codebook_kw).train()


def step(model: CodebookModel, ids: torch.Tensor) -> tuple[float, float]:
    """One forward + backward; returns its wall time and process CPU time in ms."""
    t, c = time.perf_counter(), time.process_time()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    ms, cpu = (time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3
    model.zero_grad(set_to_none=True)
    return ms, cpu


def measure(shape: Shape, warmup: int, repeats: int, **codebook_kw) -> dict:
    model = build(shape, **codebook_kw)
    ids = torch.randint(shape.vocab, (shape.batch, shape.seq),
                        generator=torch.Generator().manual_seed(0))
    layers = list(model.sites.values())
    group_lns = [layer.ln for layer in layers]
    site_lns = [torch.nn.LayerNorm(layer.config.dim) for layer in layers]
    base_ms, cb_ms, base_cpu, cb_cpu, site_ms = [], [], [], [], []
    for i in range(warmup + repeats):
        model.disable_codebooks()
        b, bc = step(model, ids)
        model.enable_codebooks()
        c, cc = step(model, ids)
        for layer, ln in zip(layers, site_lns, strict=True):
            layer.ln = ln
        s, _ = step(model, ids)
        for layer, ln in zip(layers, group_lns, strict=True):
            layer.ln = ln
        if i >= warmup:
            base_ms.append(b)
            cb_ms.append(c)
            base_cpu.append(bc)
            cb_cpu.append(cc)
            site_ms.append(s)
    base, cb = statistics.median(base_ms), statistics.median(cb_ms)
    site = statistics.median(site_ms)
    bcpu, ccpu = statistics.median(base_cpu), statistics.median(cb_cpu)
    return {
        "shape": shape.name,
        "base_step_ms": round(base, 1),
        "codebook_step_ms": round(cb, 1),
        "overhead": round(cb / base, 3),
        "cpu_overhead": round(ccpu / bcpu, 3),
        "site_ln_step_ms": round(site, 1),
        "site_ln_overhead": round(site / base, 3),
        "load_avg": round(os.getloadavg()[0], 2),
        "batch": shape.batch, "seq": shape.seq, "num_codes": shape.num_codes, "k": shape.k,
        "groups": shape.heads, "layers": shape.layers, "repeats": repeats,
        "threads": torch.get_num_threads(),
        "chunk_mib": model.codebook_config.chunk_mib,
        "search_backend": model.codebook_config.search_backend,
    }


def profile(shape: Shape) -> None:
    """Print the ops that take the most CPU time in one codebook step to stderr."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    model = build(shape)
    ids = torch.randint(shape.vocab, (shape.batch, shape.seq))
    step(model, ids)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, ids)
    print(f"--- {shape.name}: top ops of one codebook step", file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
          file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    ap.add_argument("--shape", choices=[s.name for s in SHAPES], action="append",
                    help="only these shapes (repeatable)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    ap.add_argument("--profile", action="store_true", help="print a profile to stderr")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; 1 is steadier on a busy machine)")
    ap.add_argument("--chunk-mib", type=float, default=None,
                    help="similarity block bound of the exact search (default: the library's)")
    ap.add_argument("--search-backend", default=None,
                    help="top-k search backend (auto, torch, faiss, torch_bf16; default auto)")
    ap.add_argument("--no-check-finite", action="store_true",
                    help="skip the NaN/inf check of codebook inputs")
    args = ap.parse_args(argv)
    kw: dict = {}
    if args.chunk_mib:
        kw["chunk_mib"] = args.chunk_mib
    if args.no_check_finite:
        kw["check_finite"] = False
    if args.search_backend:
        kw["search_backend"] = args.search_backend
    if args.threads:
        torch.set_num_threads(args.threads)
    for shape in SHAPES:
        if args.shape and shape.name not in args.shape:
            continue
        if args.quick:
            shape.batch, shape.seq = QUICK[shape.name]
        repeats = args.repeats or (3 if args.quick else 7)
        print(json.dumps(measure(shape, warmup=1 if args.quick else 2, repeats=repeats, **kw)),
              flush=True)
        if args.profile:
            profile(shape)


if __name__ == "__main__":
    main()
