"""Codebook layer speed and memory against its peers, measured in the same run.

Prints one JSON object per line: impl, N, d, C, k, G, dtype, fwd_ms, fwdbwd_ms (null for
forward-only peers), peak_mib (peak resident memory above the inputs, in MiB), plus
``x_matmul`` (time over the similarity matmul of the same shape: the floor).

Peers: ``codebook`` (this library's CodebookLayer, LayerNorm off so every peer does the same
work), ``matmul`` (the similarity matmul alone), ``naive`` (full N x C similarity, top-k, a
gather with dense autograd, a Python loop over groups: the paper's approach), ``faiss_flatip``
(FAISS IndexFlatIP search, forward only) and ``vqtorch`` (vector-quantize-pytorch, k=1 only).
Each (impl, shape) runs in a fresh subprocess so that peak memory is its own.

    python benchmarks/snap.py            # DESIGN section 3 shapes
    python benchmarks/snap.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SHAPES = [  # (N, d, C, k, G)
    (4096, 512, 10000, 8, 1),
    (4096, 512, 10000, 8, 8),
    (16384, 128, 1000, 1, 1),
    (16384, 128, 1000, 1, 4),
]
QUICK = [(1024, 128, 2000, 4, 1), (1024, 128, 2000, 4, 4), (4096, 64, 500, 1, 2)]
IMPLS = ["matmul", "codebook", "naive", "faiss_flatip", "vqtorch"]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


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

    if impl == "codebook":
        from codebook_features import CodebookLayer

        layer = CodebookLayer(dim=d, num_codes=c, k=k, groups=g, layernorm=False)

        def fwd():
            with torch.no_grad():
                layer(x)

        def fwdbwd():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(grad_out)

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

        def fwdbwd():
            book.grad = None
            x.grad = None
            out, mse = run()
            torch.autograd.backward([out, mse], [grad_out, torch.ones(())])

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

        def fwdbwd():
            vq.train()
            xb.grad = None
            q, _, loss = vq(xb)
            torch.autograd.backward([q, loss.sum()], [grad_out.view(1, n, d), torch.ones(())])

        return fwd, fwdbwd
    raise ValueError(impl)


def measure(impl: str, shape: tuple[int, ...], repeats: int) -> dict | None:
    """Run in this process: time forward and forward+backward, report peak memory."""
    import torch

    n, d, c, k, g = shape
    built = build(impl, n, d, c, k, g)
    if built is None:
        return None
    fwd, fwdbwd = built
    # Load the kernels' libraries and thread pools before taking the baseline.
    torch.randn(256, 256) @ torch.randn(256, 256)
    torch.randn(256, 256).topk(4)
    base = rss_mib()
    fwd_ms = timeit(fwd, repeats)
    fwdbwd_ms = timeit(fwdbwd, repeats) if fwdbwd else None
    return {"impl": impl, "N": n, "d": d, "C": c, "k": k, "G": g, "dtype": "float32",
            "fwd_ms": round(fwd_ms, 2),
            "fwdbwd_ms": None if fwdbwd_ms is None else round(fwdbwd_ms, 2),
            "peak_mib": round(max(0.0, rss_mib() - base), 1),
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:  # child process: one implementation at one shape
        res = measure(args._one[0], tuple(json.loads(args._one[1])), args.repeats)
        print(json.dumps(res))
        return
    for shape in QUICK if args.quick else SHAPES:
        matmul_ms = None
        for impl in args.impls.split(","):
            out = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats),
                                  "--_one", impl, json.dumps(shape)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(json.dumps({"impl": impl, "shape": shape, "error": out.stderr[-400:]}))
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            if res is None:
                continue
            if impl == "matmul":
                matmul_ms = res["fwd_ms"]
            if matmul_ms:
                res["fwd_x_matmul"] = round(res["fwd_ms"] / matmul_ms, 2)
                if res["fwdbwd_ms"] is not None:
                    res["fwdbwd_x_matmul"] = round(res["fwdbwd_ms"] / matmul_ms, 2)
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
