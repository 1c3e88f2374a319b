"""``CodebookLayer``: a sparse, discrete bottleneck for one activation site.

``y = combine(top-k codes of LayerNorm(a))`` replaces the activation ``a``. Groups live in one
``(G, C, d/G)`` parameter. The layer keeps usage statistics, replaces dead codes, can be
initialised by k-means, and carries intervention state (read, replace, append, ablate, bypass).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import snap
from .errors import CodebookError
from .io import read_json, read_safetensors, write_json, write_safetensors

if TYPE_CHECKING:
    from typing_extensions import Self

CONFIG_NAME = "codebook_config.json"
LAYERNORM_SCOPES = ("group", "site")
MSE_REDUCTIONS = ("sum", "mean")
RECENT_ROWS = 4096
"""Recent normed inputs kept per layer as candidates for replacing dead codes."""
WEIGHTS_NAME = "codebook.safetensors"


@dataclass(kw_only=True)
class CodebookSettings:
    """The settings every codebook has, shared by one layer and a whole model's config."""

    num_codes: int = 10_000
    """Codes per group."""
    k: int = 1
    """Codes chosen per token (and per group)."""
    similarity: str = "cosine"
    """How inputs are matched to codes: cosine, inner or euclidean."""
    combine: str = "mean"
    """How the k chosen codes become the output: mean or sum."""
    mse_coeff: float = 1.0
    """lambda: weight of the reconstruction term |output - stop_grad(input)|^2 in the codebook
    gradient, reduced as ``mse_reduction``. 1 is the paper's lambda = 1 (the authors'
    ``aeloss``); 0 their ``base`` loss."""
    mse_reduction: str = "sum"
    """sum: summed over the site's features and averaged over tokens (the paper's, and the
    authors' code); mean: averaged over features too, so lambda is width times weaker (what
    codebooks saved before format 2 used, kept for them)."""
    commitment_coeff: float = 0.0
    """beta: the input is also pulled toward its codes, its gradient gaining 2 beta (x - y)
    (the authors' ``fullaeloss-beta`` and ``vqvae-beta``); 0 for none."""
    codes_lm_grad: bool = True
    """Whether the chosen codes also get the downstream (LM) gradient; False with mse_coeff 1
    and a commitment_coeff is the authors' ``vqvae`` loss."""
    layernorm: bool = True
    """Apply a LayerNorm with trainable affine to the input first."""
    layernorm_scope: str = "group"
    """group: each group's slice is normalised on its own (the authors' grouped codebooks);
    site: the whole width at once, then split (codebooks saved before format 2). The same
    for one group."""
    dead_code_window: int = 100
    """Training steps without firing after which a code counts as dead."""
    chunk_mib: float = 16.0
    """Memory bound of one similarity block in the exact chunked search (torch backend)."""
    search_backend: str = "auto"
    """Top-k search, exact unless named: auto (the fastest exact one measured for the device,
    CPU and shape: see ``snap``), torch, faiss, bf16_screen (a certified bfloat16 screen, for
    CPUs with AMX), or torch_bf16 (bfloat16 similarity + re-rank of a shortlist; approximate)."""
    check_finite: bool = True
    """Reject NaN/inf inputs with a clear error (one host sync per forward)."""

    _label: ClassVar[str] = "codebook settings"
    LEGACY: ClassVar[dict[str, Any]] = {"mse_reduction": "mean", "layernorm_scope": "site"}
    """What settings that a saved config lacks meant before they existed (format 1)."""

    @classmethod
    def shared_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(CodebookSettings))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Build from a dict, refusing unknown keys with one line that lists the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CodebookError(f"unknown {cls._label} keys {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> Self:
        """Build from a config saved earlier: a setting it lacks keeps its old meaning."""
        if not isinstance(d, dict):
            raise CodebookError(f"saved {cls._label} is not a mapping; the file is corrupt")
        return cls.from_dict({**{k: v for k, v in cls.LEGACY.items() if k not in d}, **d})


@dataclass(kw_only=True)
class CodebookConfig(CodebookSettings):
    """Settings of one codebook layer."""

    _label: ClassVar[str] = "codebook config"
    dim: int
    """Width of the activation the codebook replaces."""
    groups: int = 1
    """Equal slices of the width, each with its own codebook and top-k (e.g. one per head)."""
    name: str = "codebook"
    """Name used in error messages and statistics."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a CodebookError naming the first impossible setting."""
        n = self.name
        for key in ("dim", "num_codes", "groups"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise CodebookError(f"{n}: {key} must be a positive integer, "
                                    f"got {getattr(self, key)!r}")
        if not isinstance(self.k, int) or not 1 <= self.k <= self.num_codes:
            raise CodebookError(f"{n}: k={self.k!r} must be between 1 and num_codes="
                                f"{self.num_codes}; lower k or add codes")
        if self.dim % self.groups:
            raise CodebookError(f"{n}: groups={self.groups} do not divide the width "
                                f"dim={self.dim}; pick a divisor of {self.dim}")
        if self.similarity not in snap.SIMILARITIES:
            raise CodebookError(f"{n}: unknown similarity {self.similarity!r}; choose one of "
                                f"{', '.join(snap.SIMILARITIES)}")
        if self.combine not in snap.COMBINES:
            raise CodebookError(f"{n}: unknown combine {self.combine!r}; choose one of "
                                f"{', '.join(snap.COMBINES)}")
        if self.search_backend not in snap.BACKENDS:
            raise CodebookError(f"{n}: unknown search_backend {self.search_backend!r}; choose "
                                f"one of {', '.join(snap.BACKENDS)}")
        if self.search_backend == "faiss" and not snap.faiss_available():
            raise CodebookError(f"{n}: search_backend 'faiss' needs the faiss package; "
                                "install faiss-cpu or use 'auto'")
        for key, allowed in (("mse_reduction", MSE_REDUCTIONS),
                             ("layernorm_scope", LAYERNORM_SCOPES)):
            if getattr(self, key) not in allowed:
                raise CodebookError(f"{n}: unknown {key} {getattr(self, key)!r}; choose one of "
                                    f"{', '.join(allowed)}")
        for key in ("mse_coeff", "commitment_coeff", "chunk_mib"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise CodebookError(f"{n}: {key} must be a number >= 0, got {v!r}")
        if self.chunk_mib <= 0 or not isinstance(self.dead_code_window, int) or \
                self.dead_code_window < 1:
            raise CodebookError(f"{n}: chunk_mib must be > 0 and dead_code_window an "
                                "integer >= 1")

    @property
    def group_dim(self) -> int:
        return self.dim // self.groups



@dataclass
class Intervention:
    """One edit of the chosen codes, applied after the search.

    kind: ``replace`` (put ``codes[0]`` at ``slot``), ``append`` (add ``codes`` as extra slots)
    or ``ablate`` (``codes`` contribute zero wherever chosen). ``positions`` index the token
    axis (the input's second-to-last dimension); None means every position.
    """

    kind: str
    codes: tuple[int, ...]
    group: int = 0
    slot: int = -1
    positions: tuple[int, ...] | None = None


@dataclass
class CodebookStats:
    """Summary of a layer's usage since the statistics were last reset."""

    tokens: int
    active_codes: int
    dead_codes: int
    dead_fraction: float
    usage_entropy: float
    """Mean over groups of the entropy (nats) of code usage."""
    mse: float
    fvu: float
    """Fraction of variance unexplained: sum |y - x|^2 / sum |x - mean(x)|^2."""
    activation_frequency: Tensor = field(repr=False)
    """(G, C): activations of each code per token."""


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


class CodebookLayer(nn.Module):
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

    # ------------------------------------------------------------------ forward
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

    # ------------------------------------------------------------ statistics
    @torch.no_grad()
    def _update_stats(self, xg: Tensor, codes: Tensor, err: Tensor) -> None:
        c = self.config
        flat = snap._flat_codes(codes, c.num_codes).reshape(-1)
        counts = torch.bincount(flat, minlength=c.groups * c.num_codes).view(c.groups, -1)
        self.step += 1
        self.code_counts += counts
        self.last_fired.masked_fill_(counts > 0, self.step)
        n = xg.shape[0]
        self.tokens_seen += n
        self.sse += err
        flat_x = xg.reshape(n, c.dim)
        self.sum_x += flat_x.sum(0)
        self.sum_x2 += torch.linalg.vector_norm(flat_x).square()
        # Rows for dead-code replacement: up to RECENT_ROWS, spread over the batch, copied so
        # that the batch itself is not kept alive between steps. The old rows go first, so the
        # two never coexist (unless someone else holds them).
        self._recent = None
        self._recent = xg[:: max(1, -(-n // RECENT_ROWS))].clone()

    def reset_stats(self) -> None:
        """Zero the usage counters and error sums (the dead-code clock keeps running)."""
        for name in ("code_counts", "tokens_seen", "sse", "sum_x", "sum_x2"):
            getattr(self, name).zero_()

    def dead_codes(self) -> Tensor:
        """Bool ``(G, C)``: codes that have not fired in the last ``dead_code_window`` steps."""
        return (self.step - self.last_fired) >= self.config.dead_code_window

    def stats(self) -> CodebookStats:
        """Usage, entropy, MSE, FVU and dead codes since the last ``reset_stats``."""
        c = self.config
        tokens = int(self.tokens_seen)
        counts = self.code_counts.double()
        totals = counts.sum(-1, keepdim=True)
        p = counts / totals.clamp_min(1)
        ent = -(p * p.clamp_min(1e-300).log()).sum(-1)
        dead = self.dead_codes()
        mean_sq = self.sum_x2 - self.sum_x.pow(2).sum() / max(tokens, 1)
        return CodebookStats(
            tokens=tokens,
            active_codes=int((self.code_counts > 0).sum()),
            dead_codes=int(dead.sum()),
            dead_fraction=float(dead.float().mean()),
            usage_entropy=float(ent.mean()),
            mse=float(self.sse / max(tokens * c.dim, 1)),
            fvu=float(self.sse / mean_sq) if tokens and float(mean_sq) > 0 else float("nan"),
            activation_frequency=(counts / max(tokens, 1)).float(),
        )

    # ------------------------------------------------- dead codes and init
    @torch.no_grad()
    def replace_dead_codes(self, inputs: Tensor | None = None, noise: float = 0.01,
                           generator: torch.Generator | None = None) -> int:
        """Re-initialise dead codes to random recent inputs plus small noise.

        ``inputs``: normed inputs ``(M, G, dg)`` to draw from (default: a sample of the last
        training batch). Returns how many codes were replaced. Deterministic given
        ``generator`` (a CPU generator) and ``inputs``, so every process of a distributed run
        can do the same.
        """
        dead = self.dead_codes()
        src = inputs if inputs is not None else self._recent
        if src is None:
            raise CodebookError(f"{self.config.name}: no recent inputs to draw replacement "
                                "codes from; run a training forward first or pass inputs")
        src = src.to(self.codebook.device, self.codebook.dtype)
        src = src.reshape(-1, self.config.groups, self.config.group_dim)
        g_idx, c_idx = dead.nonzero(as_tuple=True)
        n = g_idx.numel()
        if n == 0:
            return 0
        # Random draws on the CPU generator, so that every process draws the same.
        rows = torch.randint(src.shape[0], (n,), generator=generator)
        eps = torch.randn(n, self.config.group_dim, generator=generator)
        picked = src[rows.to(src.device), g_idx]
        scale = picked.std().clamp_min(1e-6) if n > 1 else picked.abs().mean().clamp_min(1e-6)
        picked = picked + noise * scale * eps.to(picked)
        self.codebook[g_idx, c_idx] = picked
        self.last_fired[g_idx, c_idx] = self.step
        return n

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

    # --------------------------------------------------------- interventions
    def replace_code(self, code: int, slot: int = -1, group: int = 0,
                     positions: Sequence[int] | None = None) -> None:
        """Force ``code`` into ``slot`` (default the weakest) of ``group``."""
        self._add(Intervention("replace", (int(code),), group, slot, positions))

    def append_code(self, code: int | Sequence[int], group: int = 0,
                    positions: Sequence[int] | None = None) -> None:
        """Add ``code`` (or several) as extra slots of ``group``; mean divides by the new count."""
        codes = (code,) if isinstance(code, int) else tuple(code)
        self._add(Intervention("append", tuple(int(x) for x in codes), group, -1, positions))

    def ablate_codes(self, codes: int | Sequence[int], group: int = 0,
                     positions: Sequence[int] | None = None) -> None:
        """Make ``codes`` of ``group`` contribute zero wherever they are chosen."""
        codes = (codes,) if isinstance(codes, int) else tuple(codes)
        self._add(Intervention("ablate", tuple(int(x) for x in codes), group, -1, positions))

    def clear_interventions(self) -> None:
        self.interventions = []
        self.bypass = False

    def _add(self, iv: Intervention) -> None:
        c = self.config
        if not 0 <= iv.group < c.groups:
            raise CodebookError(f"{c.name}: group {iv.group} does not exist "
                                f"(groups 0..{c.groups - 1})")
        bad = [x for x in iv.codes if not 0 <= x < c.num_codes]
        if bad or not iv.codes:
            raise CodebookError(f"{c.name}: code(s) {bad or '[]'} do not exist "
                                f"(codes 0..{c.num_codes - 1})")
        if iv.kind == "replace" and not -c.k <= iv.slot < c.k:
            raise CodebookError(f"{c.name}: slot {iv.slot} does not exist (k={c.k})")
        if iv.positions is not None:
            iv.positions = tuple(int(p) for p in iv.positions)
        self.interventions.append(iv)

    def _intervene(self, codes: Tensor, lead: torch.Size) -> tuple[Tensor, Tensor]:
        """Apply the interventions to ``codes`` ``(N, G, K)``; returns codes and slot weights."""
        c = self.config
        n = codes.shape[0]
        dev = codes.device
        present = torch.ones(codes.shape, dtype=torch.bool, device=dev)
        ablated = torch.zeros(codes.shape, dtype=torch.bool, device=dev)
        for iv in self.interventions:
            rows = self._rows(iv.positions, lead, dev, self.position_offset)
            if iv.kind == "replace":
                slot = iv.slot % c.k
                codes[rows, iv.group, slot] = iv.codes[0]
            elif iv.kind == "append":
                m = len(iv.codes)
                extra = torch.zeros(n, c.groups, m, dtype=codes.dtype, device=dev)
                extra_on = torch.zeros(n, c.groups, m, dtype=torch.bool, device=dev)
                extra[rows, iv.group] = torch.tensor(iv.codes, device=dev)
                extra_on[rows, iv.group] = True
                codes = torch.cat([codes, extra], -1)
                present = torch.cat([present, extra_on], -1)
                ablated = torch.cat([ablated, torch.zeros_like(extra_on)], -1)
        for iv in self.interventions:
            if iv.kind == "ablate":
                rows = self._rows(iv.positions, lead, dev, self.position_offset)
                hit = torch.zeros_like(ablated)
                hit[rows, iv.group] = torch.isin(
                    codes[rows, iv.group], torch.tensor(iv.codes, device=dev))
                ablated |= hit & present
        w = present.float()
        if c.combine == "mean":
            w = w / w.sum(-1, keepdim=True).clamp_min(1)
        w = w.masked_fill(ablated, 0.0)
        return codes, w

    @staticmethod
    def _rows(positions: tuple[int, ...] | None, lead: torch.Size, dev, offset: int = 0
              ) -> Tensor | slice:
        """Flat token rows at the given positions of the token axis (``lead[-1]``).

        A position ``p >= 0`` is absolute: the input's first token is at ``offset`` (non-zero
        while generating with a cache); a negative ``p`` counts from the input's end."""
        if positions is None:
            return slice(None)
        t = lead[-1] if len(lead) else 1
        rel = [p - offset if p >= 0 else p % t for p in positions if p >= -t]
        pos = torch.tensor([r for r in rel if 0 <= r < t], dtype=torch.long, device=dev)
        outer = math.prod(lead[:-1]) if len(lead) > 1 else 1
        return (torch.arange(outer, device=dev).view(-1, 1) * t + pos.view(1, -1)).reshape(-1)

    # ------------------------------------------------------------- save/load
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
