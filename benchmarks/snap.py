"""Codebook layer speed and memory against its peers, measured in the same run.

Prints one JSON object per line: impl, N, d, C, k, G, dtype, fwd_ms, fwdbwd_ms (null for
forward-only peers), peak_mib (peak resident memory above the inputs, in MiB, from a fresh
process per peer, after one unmeasured step; peak_mib_pinned: the same with glibc's mmap
threshold pinned, see ``PINNED``), floor_mib (the sizes of the step's output, input
gradient and codebook gradient together: what a fwd+bwd step hands back, for scale; a peer may
peak lower where the allocator reuses one's memory for another), and ratios: ``naive_peak_x`` and
``naive_peak_pinned_x`` (naive peak over this one's), ``fwdbwd_x_faiss`` (over FAISS's forward),
``naive_x`` (naive fwd+bwd over this one's), ``fwd_x_matmul`` (over the similarity matmul).
Timings interleave the peers round by round (median of ``--repeats`` rounds, after a warm-up
round), so a busy machine slows them alike; the load average is printed before and after.

Peers: ``codebook`` (this library's CodebookLayer, default ``auto`` search, LayerNorm off so
every peer does the same work; ``backend`` says what auto chose), ``codebook_torch``,
``codebook_faiss`` and ``codebook_screen`` (the exact torch chunked, FAISS and certified
bfloat16-screen backends; the screen also reports ``redo_fraction``, the tokens its bound could
not certify, and ``route``: AMX tiles or a bfloat16 ``mm``), ``codebook_screen_mm`` and
``codebook_screen_amx`` (the screen held to its ``mm`` route, or to its AMX route whatever the
size of the keys), ``codebook_bf16`` (approximate bfloat16 similarity + re-rank), each with
``code_agreement`` (tokens whose codes equal the torch backend's), ``matmul`` (the similarity
matmul alone), ``naive`` (full N x C similarity, top-k, a gather with dense autograd, a Python
loop over groups: the paper's approach),
``faiss_flatip`` (FAISS IndexFlatIP search, forward only) and ``vqtorch``
(vector-quantize-pytorch, k=1 only).

``--approx`` instead measures eval-mode approximate search (``set_approximate``: HNSW, IVF)
against the exact forward: ``recall_at_k`` (fraction of the exact top-k codes found),
``speedup`` and ``build_ms`` (index construction, paid once per codebook version), on random
codes and on clustered codes with inputs near them.

    python benchmarks/snap.py            # DESIGN section 3 shapes
    python benchmarks/snap.py --quick    # small shapes, seconds
    python benchmarks/snap.py --shape 8192,128,1000,1,4   # one TokFSM layer
    python benchmarks/snap.py --approx   # approximate inference search
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

SHAPES = [  # (N, d, C, k, G)
    (4096, 512, 10000, 8, 1),
    (4096, 512, 10000, 8, 8),
    (16384, 128, 1000, 1, 1),
    (16384, 128, 1000, 1, 4),
]
QUICK = [(1024, 128, 2000, 4, 1), (1024, 128, 2000, 4, 4), (4096, 64, 500, 1, 2)]
IMPLS = ["matmul", "codebook", "codebook_torch", "codebook_faiss", "codebook_screen",
         "codebook_screen_mm", "codebook_screen_amx",
         "codebook_bf16", "naive", "faiss_flatip", "vqtorch"]


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Restart the peak-RSS counter (Linux: ``clear_refs`` 5), so VmHWM counts from now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


CPU_MS: dict[str, float] = {}
"""Median process CPU ms of the last :func:`interleaved` call (steadier on a busy machine)."""


def interleaved(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Median wall ms of each closure, run round-robin (one warm-up round first)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            if r:
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    CPU_MS.clear()
    CPU_MS.update({name: statistics.median(ts) * 1000 for name, ts in cpu.items()})
    return {name: statistics.median(ts) * 1000 for name, ts in times.items()}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def build(impl: str, n: int, d: int, c: int, k: int, g: int):
    """Return (forward, forward_backward or None) closures for one implementation."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dg = d // g
    x = torch.randn(n, d, requires_grad=True)
    grad_out = torch.randn(n, d)

    if impl == "matmul":
        xs = x.detach().view(n, g, dg).transpose(0, 1)
        book_t = torch.randn(g, dg, c)
        return (lambda: torch.bmm(xs, book_t)), None

    if impl.startswith("codebook"):
        from codebook_features import CodebookLayer

        backend = {"codebook": "auto", "codebook_torch": "torch", "codebook_faiss": "faiss",
                   "codebook_screen": "bf16_screen", "codebook_screen_mm": "bf16_screen",
                   "codebook_screen_amx": "bf16_screen", "codebook_bf16": "torch_bf16"}[impl]
        torch.manual_seed(1)  # every codebook peer gets the same codes
        layer = CodebookLayer(dim=d, num_codes=c, k=k, groups=g, layernorm=False,
                              search_backend=backend)
        # codebook_screen_mm / _amx: the screen held to its bfloat16 mm route / its AMX route.
        route = {"codebook_screen_mm": _amx_key_bytes(-1),
                 "codebook_screen_amx": _amx_key_bytes(1 << 62)}.get(impl,
                                                                      contextlib.nullcontext)

        def fwd():
            with torch.no_grad(), route():
                layer(x)

        def clear():
            layer.zero_grad(set_to_none=True)
            x.grad = None

        def fwdbwd():
            clear()
            with route():
                layer(x).backward(grad_out)

        fwd.layer, fwd.route = layer, route
        fwdbwd.clear = clear
        return fwd, fwdbwd

    if impl == "naive":
        book = torch.randn(g, c, dg, requires_grad=True)

        def run() -> torch.Tensor:
            xs = x.view(n, g, dg)
            outs = []
            for i in range(g):  # the reference code's loop over groups
                sim = xs[:, i].detach() @ F.normalize(book[i].detach(), dim=-1).T  # N x C
                idx = sim.topk(k, dim=-1).indices
                outs.append(F.embedding(idx, book[i]).mean(1))
            y = torch.stack(outs, 1)
            mse = (y - xs.detach()).pow(2).mean()
            out = y + xs - xs.detach()
            return out.reshape(n, d), mse

        def fwd():
            with torch.no_grad():
                run()

        def clear():
            book.grad = None
            x.grad = None

        def fwdbwd():
            clear()
            out, mse = run()
            torch.autograd.backward([out, mse], [grad_out, torch.ones(())])

        fwdbwd.clear = clear
        return fwd, fwdbwd

    if impl == "faiss_flatip":
        import faiss

        books = torch.randn(g, c, dg)
        indexes = []
        for i in range(g):
            index = faiss.IndexFlatIP(dg)
            index.add(F.normalize(books[i], dim=-1).numpy())
            indexes.append(index)
        xs = [x.detach()[:, i * dg:(i + 1) * dg].contiguous().numpy() for i in range(g)]

        def fwd():
            for i in range(g):
                indexes[i].search(xs[i], k)

        return fwd, None

    if impl == "vqtorch":
        if k != 1:
            return None
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=d, codebook_size=c, heads=g, separate_codebook_per_head=True,
                            use_cosine_sim=True, decay=0.99)
        xb = x.detach().view(1, n, d).requires_grad_()

        def fwd():
            with torch.no_grad():
                vq.eval()(xb)

        def clear():
            vq.zero_grad(set_to_none=True)
            xb.grad = None

        def fwdbwd():
            vq.train()
            clear()
            q, _, loss = vq(xb)
            torch.autograd.backward([q, loss.sum()], [grad_out.view(1, n, d), torch.ones(())])

        fwdbwd.clear = clear
        return fwd, fwdbwd
    raise ValueError(impl)


PINNED = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""glibc's mmap threshold pinned at 128 KiB (its default before it adapts): every large block
goes back to the system when freed, so the peak counts live memory, not the allocator's
history (``peak_mib_pinned``)."""


def _amx_key_bytes(limit: int):
    """A context manager factory: the screen's AMX route taken while a group's key tiles fit
    ``limit`` bytes (-1: never, the ``mm`` route; huge: always, where AMX runs at all)."""

    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        from codebook_features.snap import screen_kernel  # where _amx_fits reads it

        old = screen_kernel.AMX_KEY_BYTES
        screen_kernel.AMX_KEY_BYTES = limit
        try:
            yield
        finally:
            screen_kernel.AMX_KEY_BYTES = old

    return ctx


def peak_memory(impl: str, shape: tuple[int, ...]) -> float | None:
    """Run in this (fresh) process: peak resident MiB above the inputs over a few steps.

    One step of the peer runs first, so that one-off set-up (JIT-compiled kernels, libraries,
    thread pools, state the peer keeps between steps) is not counted; its gradients are then
    released and the freed heap trimmed, so each measured step allocates them again and they
    are counted.
    """
    import gc

    import faiss
    import numpy as np
    import torch

    n, d, c, k, g = shape
    built = build(impl, n, d, c, k, g)
    if built is None:
        return None
    fwd, fwdbwd = built
    # Load every library's kernels, thread pools and work buffers first, for every peer.
    torch.randn(256, 256) @ torch.randn(256, 256)
    torch.randn(256, 256).topk(4)
    faiss.knn(np.ones((256, 64), "float32"), np.ones((256, 64), "float32"), 4,
              metric=faiss.METRIC_INNER_PRODUCT)
    step = fwdbwd or fwd
    step()
    if hasattr(step, "clear"):
        step.clear()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc: hand freed heap back to the OS,
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # so the measured steps cannot reuse it unseen
    base = rss_mib()
    reset_peak()
    for _ in range(3):
        step()
    return round(max(0.0, rss_mib("VmHWM") - base), 1)


def measure_shape(shape: tuple[int, ...], impls: list[str], repeats: int) -> list[dict]:
    """Time every peer at one shape in this process, interleaved; agreement of bf16 codes."""
    import torch

    n, d, c, k, g = shape
    built = {impl: build(impl, n, d, c, k, g) for impl in impls}
    built = {impl: b for impl, b in built.items() if b is not None}
    fwd = interleaved({impl: b[0] for impl, b in built.items()}, repeats)
    fwd_cpu = dict(CPU_MS)
    fwdbwd = interleaved({impl: b[1] for impl, b in built.items() if b[1]}, repeats)
    fwdbwd_cpu = dict(CPU_MS)
    rows = []
    for impl in built:
        rows.append({"impl": impl, "N": n, "d": d, "C": c, "k": k, "G": g,
                     "dtype": "float32", "fwd_ms": round(fwd[impl], 2),
                     "fwdbwd_ms": round(fwdbwd[impl], 2) if impl in fwdbwd else None,
                     "fwd_cpu_ms": round(fwd_cpu[impl], 1),
                     "fwdbwd_cpu_ms": round(fwdbwd_cpu[impl], 1) if impl in fwdbwd else None,
                     "threads": torch.get_num_threads()})
    codes = {}
    for impl in built:
        if impl.startswith("codebook"):
            layer = built[impl][0].layer
            with _screen_redos() as redo:
                built[impl][0]()
            codes[impl] = layer.last_codes.sort(-1).values
            for row in rows:
                if row["impl"] == impl:
                    row["backend"] = snap_backend(layer, x_shape=(n, g, d // g))
                    if row["backend"] == "bf16_screen":
                        row["redo_fraction"] = round(sum(redo) / n, 5)
                        row["route"] = screen_route(built[impl][0].route, d, c, k, g)
    if "codebook_torch" in codes:
        for row in rows:
            if row["impl"] in codes:
                same = (codes[row["impl"]] == codes["codebook_torch"]).all(-1).float().mean()
                row["code_agreement"] = round(float(same), 5)
    return rows


def screen_route(route, d: int, c: int, k: int, g: int) -> str:
    """Where the screen's scores come from under a peer's ``route``: AMX tiles in the kernel,
    a bfloat16 ``mm``, or torch (no kernel)."""
    from codebook_features import kernels, snap

    if not kernels.available():
        return "torch"
    with route():
        return "amx" if snap._amx_fits(g, c, d // g, k) else "mm"


def snap_backend(layer, x_shape: tuple[int, int, int]) -> str:
    """The search backend a layer's ``auto`` resolves to for float32 CPU inputs."""
    import torch

    from codebook_features import snap

    return snap.resolve_backend(layer.config.search_backend, torch.empty(x_shape),
                                layer.codebook)


@contextlib.contextmanager
def _screen_redos() -> Iterator[list[int]]:
    """Collects the rows the certified bf16 screen hands to exact search meanwhile."""
    from codebook_features.snap import screen, screen_kernel

    calls: list[int] = []
    # Each spy sits in the module whose screen calls it (the torch screen's exact search, the
    # compiled screen's redo).
    saved = {(module, name): getattr(module, name)
             for module, name in ((screen, "_search_torch"), (screen_kernel, "_redo"))}

    def spy_of(exact):
        def spy(x, *args, **kwargs):
            calls.append(x.shape[0])
            return exact(x, *args, **kwargs)
        return spy

    for (module, name), exact in saved.items():
        setattr(module, name, spy_of(exact))
    try:
        yield calls
    finally:
        for (module, name), exact in saved.items():
            setattr(module, name, exact)


def approx_rows(shape: tuple[int, ...], repeats: int) -> list[dict]:
    """Eval-mode approximate search vs the exact forward: recall@k, speed-up, build time."""
    import torch

    from codebook_features import CodebookLayer

    n, d, c, k, g = shape
    dg = d // g
    out = []
    for data in ("random", "clustered"):
        torch.manual_seed(0)
        layer = CodebookLayer(dim=d, num_codes=c, k=k, groups=g, layernorm=False).eval()
        if data == "random":
            x = torch.randn(n, d)
        else:  # codes in 50 clusters per group; inputs are noisy copies of random codes
            centres = torch.randn(g, 50, dg)
            book = centres.repeat_interleave(-(-c // 50), 1)[:, :c] + 0.3 * torch.randn(g, c, dg)
            with torch.no_grad():
                layer.codebook.copy_(book)
            pick = torch.randint(c, (n, g))
            x = (book[torch.arange(g), pick] + 0.3 * torch.randn(n, g, dg)).reshape(n, d)
        variants = {"exact": None, "hnsw": ("hnsw", {}), "ivf": ("ivf", {"nprobe": 8})}
        codes, fns, build_ms, indexes = {}, {}, {}, {}
        for name, spec in variants.items():
            def run(spec=spec, layer=layer, x=x, indexes=indexes):
                if spec is None:
                    layer.set_approximate(None)
                else:
                    layer.approximate = indexes[spec[0]]
                with torch.no_grad():
                    layer(x)
                return layer.last_codes
            fns[name] = run
        for kind, params in (("hnsw", {}), ("ivf", {"nprobe": 8})):
            layer.set_approximate(kind, **params)
            indexes[kind] = layer.approximate
            t = time.perf_counter()
            indexes[kind]._build(layer.codebook.detach())
            build_ms[kind] = (time.perf_counter() - t) * 1000
        for name, fn in fns.items():
            codes[name] = fn().clone()
        ms = interleaved(fns, repeats)
        for name in ("hnsw", "ivf"):
            hit = (codes[name].unsqueeze(-1) == codes["exact"].unsqueeze(-2)).any(-1)
            out.append({"impl": f"approx_{name}", "data": data, "N": n, "d": d, "C": c, "k": k,
                        "G": g, "fwd_ms": round(ms[name], 2), "exact_fwd_ms": round(ms["exact"], 2),
                        "speedup": round(ms["exact"] / ms[name], 2),
                        "recall_at_k": round(float(hit.float().mean()), 4),
                        "build_ms": round(build_ms[name], 1)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes")
    p.add_argument("--approx", action="store_true", help="approximate inference search")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch (and FAISS) threads; 1 makes CPU times load-proof")
    p.add_argument("--shape", action="append", metavar="N,d,C,k,G",
                   help="measure this shape instead of DESIGN's four (repeatable)")
    p.add_argument("--_mem", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args._mem:  # child process: peak memory of one implementation at one shape
        print(json.dumps(peak_memory(args._mem[0], tuple(json.loads(args._mem[1])))))
        return
    print(json.dumps({"load_avg_before": load(), "cpus": os.cpu_count(),
                      "threads": args.threads}), flush=True)
    shapes = QUICK if args.quick else SHAPES
    if args.shape:
        shapes = [tuple(int(v) for v in sh.split(",")) for sh in args.shape]
    for shape in shapes:
        if args.approx:
            for row in approx_rows(shape, args.repeats):
                print(json.dumps(row), flush=True)
            continue
        impls = args.impls.split(",")
        rows = measure_shape(shape, impls, args.repeats)
        by = {r["impl"]: r for r in rows}
        n, d, c = shape[:3]
        for row in rows:
            if not args.no_memory:
                threads = ["--threads", str(args.threads)] if args.threads else []
                for key, env in (("peak_mib", {}), ("peak_mib_pinned", PINNED)):
                    out = subprocess.run([sys.executable, __file__, *threads, "--_mem",
                                          row["impl"], json.dumps(shape)], capture_output=True,
                                         text=True, env={**os.environ, **env})
                    row[key] = (json.loads(out.stdout.strip().splitlines()[-1])
                                if out.returncode == 0 else None)
        for row in rows:
            if row["fwdbwd_ms"] is not None and row.get("peak_mib") is not None:
                # The step's output, the input's gradient and the codebook's gradient (float32).
                row["floor_mib"] = round((2 * n * d + c * d) * 4 / 2**20, 1)
                for key, ratio in (("peak_mib", "naive_peak_x"),
                                   ("peak_mib_pinned", "naive_peak_pinned_x")):
                    if by.get("naive", {}).get(key) and row.get(key):
                        row[ratio] = round(by["naive"][key] / row[key], 2)
            if "matmul" in by:
                row["fwd_x_matmul"] = round(row["fwd_ms"] / by["matmul"]["fwd_ms"], 2)
            if row["fwdbwd_ms"] is not None:
                if "faiss_flatip" in by:
                    row["fwdbwd_x_faiss"] = round(row["fwdbwd_ms"] / by["faiss_flatip"]["fwd_ms"],
                                                  2)
                    row["fwdbwd_cpu_x_faiss"] = round(
                        row["fwdbwd_cpu_ms"] / by["faiss_flatip"]["fwd_cpu_ms"], 2)
                if "naive" in by:
                    row["naive_x"] = round(by["naive"]["fwdbwd_ms"] / row["fwdbwd_ms"], 2)
                    row["naive_cpu_x"] = round(by["naive"]["fwdbwd_cpu_ms"]
                                               / row["fwdbwd_cpu_ms"], 2)
            row["load_avg"] = load()
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
