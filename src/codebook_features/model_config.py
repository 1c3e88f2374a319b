"""A codebook model's config and saved format, and loading its base model with one-line errors.

Kept apart from :mod:`codebook_features.model` so that readers of the saved format (the model
card, the authors' loader, the evaluation) need not import the model class.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from . import sites as _sites
from .codebook import CodebookConfig, CodebookSettings
from .errors import CodebookError

CONFIG_NAME = "codebook_model.json"
WEIGHTS_NAME = "codebooks.safetensors"
FORMAT = "codebook-features/model"
FORMAT_VERSION = 2
"""2: per-group LayerNorm and the paper's lambda by default (``layernorm_scope``,
``mse_reduction``); a format-1 config lacks those keys and keeps their old meaning."""


@dataclass(kw_only=True)
class CodebookModelConfig(CodebookSettings):
    """Which sites of a base model get codebooks, and the codebooks' settings."""

    _label: ClassVar[str] = "codebook model config"

    placements: list[str] = field(default_factory=lambda: ["attn_heads"])
    """Sites in every chosen layer: attn_heads, attn_out, mlp_out, mlp_hidden, residual."""
    layers: list[int] | None = None
    """Layer indices to snap (negative counts from the end); None for all layers."""
    groups: int | None = None
    """Groups per codebook; None: one per head for attn_heads, 1 for other placements."""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-placement or per-site codebook settings, e.g. {"mlp_out": {"k": 4}}."""

    def __post_init__(self) -> None:
        if isinstance(self.placements, str):
            self.placements = [self.placements]
        self.placements = _sites.normalize_placements(self.placements)
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if self.layers is not None:
            self.layers = list(self.layers)
        names = {f.name for f in dataclasses.fields(CodebookConfig)} - {"dim", "name"}
        for where, over in self.overrides.items():
            bad = sorted(set(over) - names)
            if bad:
                raise CodebookError(f"overrides[{where!r}]: unknown codebook setting(s) {bad}; "
                                    f"known: {sorted(names)}")
        # Validate the shared settings once, with a placeholder width.
        self.codebook_config(dim=self.groups or 1, groups=self.groups or 1, name="config")

    def codebook_config(self, dim: int, groups: int, name: str, placement: str | None = None
                        ) -> CodebookConfig:
        """The :class:`CodebookConfig` of one site (shared settings plus its overrides)."""
        kw: dict[str, Any] = {k: getattr(self, k) for k in self.shared_fields()}
        kw["groups"] = groups
        if placement is not None:
            kw.update(self.overrides.get(placement, {}))
        kw.update(self.overrides.get(name, {}))
        return CodebookConfig(dim=dim, name=name, **kw)



def _key(site: str) -> str:
    return site.replace(".", "_")


def load_base_config(name_or_path: str | os.PathLike) -> Any:
    """``AutoConfig.from_pretrained`` (no weights) with failures turned into a CodebookError."""
    from transformers import AutoConfig

    name = str(name_or_path)
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CodebookError(f"cannot read the config of base model {name!r}: {first}") from None


def load_base_model(name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with failures turned into a CodebookError."""
    from transformers import AutoModelForCausalLM

    name = str(name_or_path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        name = os.path.expanduser(name)
    if looks_local and not os.path.isdir(name):
        raise CodebookError(f"base model folder {name!r} not found; check the path")
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = ("local folder" if os.path.isdir(name) else
                 "hub name (offline, or no such model?)")
        raise CodebookError(f"cannot load base model {name!r} as a {where}: {first}") from None
