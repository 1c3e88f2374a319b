"""``codebook-features synthetic``: a self-check, one codebook layer on clustered data.

The data are ``clusters`` Gaussian blobs; a good codebook gives each blob its own code, so the
code-to-cluster purity should approach 1 and the reconstruction error fall to the noise level.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..codebook import CodebookLayer
from ..errors import CodebookError
from ..io import write_json


def make_clusters(n: int, centres: torch.Tensor, noise: float, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points around the given centres; returns (points, cluster labels)."""
    labels = torch.randint(len(centres), (n,), generator=generator)
    dim = centres.shape[1]
    return centres[labels] + noise * torch.randn(n, dim, generator=generator), labels


def purity(codes: torch.Tensor, labels: torch.Tensor, clusters: int) -> float:
    """Share of tokens whose code's majority cluster is their own cluster."""
    table = torch.zeros(int(codes.max()) + 1, clusters)
    table.index_put_((codes, labels), torch.ones(len(codes)), accumulate=True)
    return float(table.max(1).values.sum() / len(codes))


def train_on_clusters(steps: int = 300, dim: int = 64, clusters: int = 32, num_codes: int = 64,
                      batch: int = 512, lr: float = 3e-3, seed: int = 0,
                      out: str | None = None) -> dict[str, Any]:
    """Train a k=1 codebook on clustered data; return (and write to ``out``) its metrics."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = CodebookLayer(dim=dim, num_codes=num_codes, k=1, dead_code_window=25,
                          name="synthetic")
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    centres = torch.randn(clusters, dim, generator=gen) * 3
    x_all, _ = make_clusters(20 * batch, centres, 0.3, gen)
    layer.train()
    replaced = 0
    for step in tqdm(range(steps), desc="codebook on clusters"):
        idx = torch.randint(len(x_all), (batch,), generator=gen)
        out_ = layer(x_all[idx])
        # Downstream objective: reproduce the input's normed value (gradients flow straight
        # through to the LayerNorm; the codebook learns from both terms).
        loss = (out_ - layer.normalize(x_all[idx]).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 25 == 0 and step < steps - 50:
            replaced += layer.replace_dead_codes(generator=gen)
    layer.eval()
    x_test, y_test = make_clusters(4096, centres, 0.3, gen)
    with torch.no_grad():
        test_mse = float((layer(x_test) - layer.normalize(x_test)).pow(2).mean())
    codes = layer.last_codes[:, 0, 0]
    s = layer.stats()
    metrics = {
        "steps": steps, "clusters": clusters, "num_codes": num_codes,
        "train_mse": s.mse, "train_fvu": s.fvu, "usage_entropy": s.usage_entropy,
        "dead_fraction": s.dead_fraction, "codes_replaced": replaced,
        "test_mse": test_mse, "codes_used_on_test": int(codes.unique().numel()),
        "code_cluster_purity": purity(codes, y_test, clusters),
    }
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / "metrics.json", metrics)
        layer.save(Path(out) / "codebook")
    return metrics


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/synthetic", help="output folder (default %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from ..io import writable_dir

    if args.steps < 1:
        raise CodebookError(f"--steps {args.steps}: give at least 1")
    writable_dir(args.out)
    metrics = train_on_clusters(steps=args.steps, seed=args.seed, out=args.out)
    print(json.dumps(metrics, indent=2))
    return 0
