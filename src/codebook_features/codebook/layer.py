"""The layer: :class:`CodebookLayer` (its search, forward pass, k-means init, save and load)
and the grouped LayerNorm it normalises with."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import snap
from ..errors import CodebookError
from ..io import read_json, read_safetensors, write_json, write_safetensors
from .config import CodebookConfig
from .interventions import Intervention, _Interventions
from .usage import _Usage

CONFIG_NAME = "codebook_config.json"
WEIGHTS_NAME = "codebook.safetensors"


def _in_backward() -> bool:
    """Whether this forward runs inside a backward pass: gradient checkpointing recomputing
    it. Its statistics were counted by the first forward already."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _all_finite(a: Tensor) -> bool:
    """Whether every element of ``a`` is finite. A NaN or inf makes the sum non-finite, so the
    sum (one fast reduction) decides; only a non-finite sum, which an overflow of huge but
    finite values can also give, is checked element by element."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(a.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(a).all())


class GroupLayerNorm(nn.Module):
    """LayerNorm of each of ``groups`` equal slices of the width on its own, with one affine
    over the whole width: the authors' grouped codebooks (one ``LayerNorm(d/G)`` per group).

    Its ``weight``/``bias`` have the names and shapes of ``nn.LayerNorm(width)``'s. Written as
    ``layer_norm`` over the slices then the affine, which on CPU ran about twice as fast as
    ``F.group_norm`` (the same function) forward and backward.
    """

    def __init__(self, dim: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, a: Tensor) -> Tensor:
        dg = a.shape[-1] // self.groups
        x = F.layer_norm(a.unflatten(-1, (self.groups, dg)), (dg,), eps=self.eps)
        return torch.addcmul(self.bias, x.flatten(-2), self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, groups={self.groups}, eps={self.eps}"


class CodebookLayer(_Usage, _Interventions, nn.Module):
    """A codebook bottleneck for activations of width ``config.dim`` (any leading shape)."""

    def __init__(self, config: CodebookConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = CodebookConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        g, c, dg = config.groups, config.num_codes, config.group_dim
        self.ln: nn.Module | None = None
        if config.layernorm:
            self.ln = (GroupLayerNorm(config.dim, g) if g > 1 and config.layernorm_scope == "group"
                       else nn.LayerNorm(config.dim))
        self.codebook = nn.Parameter(torch.randn(g, c, dg))
        # Statistics, saved with the layer so that a resumed run keeps its dead-code state.
        self.register_buffer("code_counts", torch.zeros(g, c, dtype=torch.long))
        self.register_buffer("last_fired", torch.zeros(g, c, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("sse", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sum_x", torch.zeros(config.dim, dtype=torch.float64))
        self.register_buffer("sum_x2", torch.zeros((), dtype=torch.float64))
        self.track_stats = True
        self.bypass = False
        self.interventions: list[Intervention] = []
        self.position_offset = 0  # absolute position of the input's first token (steering)
        self.recorded: list[Tensor] | None = None  # when a list, raw inputs are appended to it
        self.last_codes: Tensor | None = None
        self.last_scores: Tensor | None = None
        self.last_mse: Tensor | None = None
        self._recent: Tensor | None = None  # recent normed inputs (M, G, dg) for dead codes
        self.approximate: snap.ApproximateIndex | None = None  # eval-mode search, see below
        self._workspace = snap.Workspace()  # the search's reusable scratch buffers

    def extra_repr(self) -> str:
        c = self.config
        return (f"name={c.name!r}, dim={c.dim}, num_codes={c.num_codes}, k={c.k}, "
                f"groups={c.groups}, similarity={c.similarity}, combine={c.combine}")

    def normalize(self, a: Tensor) -> Tensor:
        """The input as the codebook sees it: LayerNorm(a) (or a), in the codebook's dtype."""
        self._check_input(a)
        a = a.to(self.codebook.dtype)
        return self.ln(a) if self.ln is not None else a

    def _check_input(self, a: Tensor) -> None:
        c = self.config
        if not isinstance(a, Tensor) or a.dim() < 1 or a.shape[-1] != c.dim:
            shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise CodebookError(f"{c.name}: input of shape {shape} has width "
                                f"{shape[-1] if isinstance(a, Tensor) and a.dim() else '?'}, "
                                f"but the codebook expects width {c.dim}")
        if not a.is_floating_point():
            raise CodebookError(f"{c.name}: input of dtype {a.dtype} is not floating point; "
                                "pass activations (e.g. x.float()), not token ids or codes")
        if c.check_finite and not _all_finite(a):
            raise CodebookError(f"{c.name}: input contains NaN or inf; no codes were chosen "
                                "(check the model's activations, learning rate or precision)")

    def search(self, x: Tensor) -> snap.SearchResult:
        """Top-k codes of normed inputs ``x`` of shape ``(N, G, dg)``.

        Exact (``config.search_backend``), except in eval mode after :meth:`set_approximate`
        for float32 CPU inputs.
        """
        c = self.config
        book = self.codebook.detach()
        if (self.approximate is not None and not self.training and x.device.type == "cpu"
                and x.dtype == torch.float32):
            return self.approximate.search(x, book, c.k)
        return snap.search(x, book, c.k, c.similarity, c.chunk_mib, c.search_backend,
                           self._workspace)

    def set_approximate(self, kind: str | None = "hnsw", **params: Any) -> None:
        """Use approximate search (FAISS ``hnsw`` or ``ivf``) in eval mode; None turns it off.

        Inference only: in training mode the layer always searches exactly, since the codes it
        trains must be the ones it would choose (so ``model.train()`` needs no undo). The
        indexes are built on first use and rebuilt when the codebook changes. ``params``:
        ``m``, ``ef_search``, ``ef_construction`` (hnsw); ``nlist``, ``nprobe`` (ivf). Only
        float32 CPU inputs use it; others search exactly.
        """
        if kind is None:
            self.approximate = None
            return
        try:
            self.approximate = snap.ApproximateIndex(kind, self.config.similarity, **params)
        except (ValueError, RuntimeError, TypeError) as e:
            raise CodebookError(f"{self.config.name}: {e}") from None

    def forward(self, a: Tensor) -> Tensor:
        c = self.config
        lead = a.shape[:-1]
        x = self.normalize(a)
        if self.recorded is not None:
            self.recorded.append(a.detach())
        xg = x.reshape(-1, c.groups, c.group_dim)
        codes, scores = self.search(xg.detach())
        weights: Tensor | float = snap.combine_weights(c.k, c.combine)
        if self.interventions:
            codes, weights = self._intervene(codes, lead)
        self.last_codes = codes.view(*lead, c.groups, codes.shape[-1])
        self.last_scores = scores.view(*lead, c.groups, c.k)
        if self.bypass:
            return a
        y = snap.snap_combine(xg, self.codebook, codes, weights, c.mse_coeff,
                              reduction=c.mse_reduction, commitment_coeff=c.commitment_coeff,
                              codes_lm_grad=c.codes_lm_grad)
        with torch.no_grad():
            err = snap.sq_error(y, xg)  # no (N, d) temporary
            # The reconstruction term as the loss reduces it (per token, or per element).
            self.last_mse = err / (xg.shape[0] if c.mse_reduction == "sum" else xg.numel())
            if self.training and self.track_stats and not _in_backward():
                self._update_stats(xg.detach(), codes, err)
        return y.view(*lead, c.dim).to(a.dtype)

    @torch.no_grad()
    def kmeans_init(self, activations: Tensor, iters: int = 20, seed: int = 0,
                    nredo: int = 1) -> None:
        """Initialise every group's codes by k-means (FAISS) on raw activations ``(..., dim)``.

        Cosine similarity clusters spherically; each code is then set to the plain mean of the
        inputs the layer's own search assigns to it, so codes reconstruct at the inputs' scale.
        Needs at least ``num_codes`` activations.
        """
        import faiss

        c = self.config
        x = self.normalize(activations).reshape(-1, c.groups, c.group_dim).float()
        if x.shape[0] < c.num_codes:
            raise CodebookError(f"{c.name}: k-means init needs at least num_codes="
                                f"{c.num_codes} activations, got {x.shape[0]}; pass more "
                                "tokens or lower num_codes")
        xn = x.cpu().numpy()
        for g in range(c.groups):
            km = faiss.Kmeans(c.group_dim, c.num_codes, niter=iters, seed=seed + g, nredo=nredo,
                              spherical=c.similarity == "cosine", verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=1 << 30)
            km.train(xn[:, g].copy())
            self.codebook[g] = torch.from_numpy(km.centroids).to(self.codebook)
        # Final M-step with the layer's own assignment: codes become means of their inputs.
        x = x.to(self.codebook)
        assigned = snap.search(x, self.codebook, 1, c.similarity, c.chunk_mib).codes[..., 0]
        flat = (assigned + torch.arange(c.groups, device=x.device) * c.num_codes).reshape(-1)
        sums = torch.zeros(c.groups * c.num_codes, c.group_dim, dtype=x.dtype, device=x.device)
        sums.index_add_(0, flat, x.reshape(-1, c.group_dim))
        counts = torch.bincount(flat, minlength=c.groups * c.num_codes).unsqueeze(-1)
        book = self.codebook.view(-1, c.group_dim)
        if c.similarity == "cosine":  # empty clusters keep their direction at the data's scale
            book.mul_(x.norm(dim=-1).mean())
        book.copy_(torch.where(counts > 0, sums / counts.clamp_min(1), book))
        self.last_fired.fill_(int(self.step))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``codebook_config.json`` and ``codebook.safetensors`` into folder ``path``."""
        path = Path(path)
        write_safetensors(path / WEIGHTS_NAME, self.state_dict(),
                          metadata={"format": "codebook-features"})
        write_json(path / CONFIG_NAME, self.config.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"
             ) -> CodebookLayer:
        """Load a layer saved by :meth:`save`, checking the config against the weights."""
        path = Path(path)
        config = CodebookConfig.from_saved(read_json(path / CONFIG_NAME))
        layer = cls(config)
        layer.load_tensors(read_safetensors(path / WEIGHTS_NAME), source=str(path))
        return layer.to(map_location)

    def load_tensors(self, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Load a state dict, with one clear error for missing, extra or mis-shaped tensors."""
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise CodebookError(f"{source}: does not match codebook {self.config.name!r} "
                                f"(missing {missing}, unexpected {extra}); was it saved with "
                                "another config (layernorm, groups)?")
        for k, mine in own.items():
            if tuple(tensors[k].shape) != tuple(mine.shape):
                raise CodebookError(f"{source}: tensor {k!r} has shape {tuple(tensors[k].shape)} "
                                    f"but codebook {self.config.name!r} needs {tuple(mine.shape)}"
                                    "; the config and weights do not match")
        self.load_state_dict(tensors)
