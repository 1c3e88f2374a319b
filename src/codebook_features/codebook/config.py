"""A codebook's settings: :class:`CodebookSettings` (shared with a whole model's config) and
:class:`CodebookConfig` (one layer's)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .. import snap
from ..errors import CodebookError

if TYPE_CHECKING:
    from typing_extensions import Self


LAYERNORM_SCOPES = ("group", "site")
MSE_REDUCTIONS = ("sum", "mean")


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
