"""Where codebooks go in a causal language model, and the hooks that put them there.

A *site* is one activation of one layer: ``layers.{i}.{placement}`` with placement

* ``attn_heads``: the concatenated head outputs, before the attention output projection
  (a forward pre-hook on that projection; grouped, one group per head by default),
* ``attn_out``: the attention module's output,
* ``mlp_out``: the MLP's output,
* ``mlp_hidden``: the MLP's hidden activation after the nonlinearity (a pre-hook on the
  MLP's down projection),
* ``residual``: the decoder block's output (the residual stream after the block).

Modules are found from a small table per ``model_type`` and, for models not in it, by generic
discovery of the standard layout (a ``ModuleList`` of blocks, each with an attention submodule
holding an ``o_proj``-like child and an MLP with a down projection). TransformerLens
``HookedTransformer`` models are supported through their hook points. Only forward hooks and
pre-hooks on the model's own modules are used: no model's forward is copied or replaced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import CodebookError

PLACEMENTS = ("attn_heads", "attn_out", "mlp_out", "mlp_hidden", "residual")


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture family, relative to each decoder block.

    ``mlp`` is the module whose output is the MLP output (for OPT, whose MLP is not a
    submodule, this is ``fc2``); ``mlp_proj`` is the MLP's down projection.
    """

    blocks: str
    attn: str
    attn_proj: str
    mlp: str
    mlp_proj: str


_LLAMA_LIKE = ArchSpec("model.layers", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj")

FAMILIES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("transformer.h", "attn", "attn.c_proj", "mlp", "mlp.c_proj"),
    "gpt_neo": ArchSpec("transformer.h", "attn", "attn.attention.out_proj", "mlp", "mlp.c_proj"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "attention", "attention.dense", "mlp",
                         "mlp.dense_4h_to_h"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi": ArchSpec("model.layers", "self_attn", "self_attn.dense", "mlp", "mlp.fc2"),
    "opt": ArchSpec("model.decoder.layers", "self_attn", "self_attn.out_proj", "fc2", "fc2"),
}
"""Known families by ``config.model_type``; other models go through generic discovery."""

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_OPROJ_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "o")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff", "mlp_block")
_DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "fc_out", "wo", "out_proj")


@dataclass(frozen=True)
class Site:
    """One codebook site: the module hooked and how.

    ``hook`` is ``pre`` (replace the module's first input) or ``post`` (replace its output, or
    the first element of a tuple output). ``merge_heads``: the hooked tensor is
    ``(..., heads, head_dim)`` and is seen by the codebook as ``(..., heads * head_dim)``.
    """

    name: str
    layer: int
    placement: str
    module: str
    hook: str
    dim: int
    heads: int
    merge_heads: bool = False


@dataclass
class HookState:
    """State shared by all hooks of one model: the on/off switch and the token shape."""

    enabled: bool = True
    tokens: tuple[int, ...] | None = None
    """``(batch, seq)`` of the current forward, to unflatten ``(batch*seq, d)`` activations."""
    on_forward: list[Callable[[], None]] = field(default_factory=list)
    """Called at the start of every forward of the model."""


# --------------------------------------------------------------------------- discovery
def model_type(model: nn.Module) -> str:
    """``config.model_type`` of a Hugging Face model, ``hooked_transformer`` or the class name."""
    if is_hooked_transformer(model):
        return "transformer_bridge" if hasattr(model, "original_model") else "hooked_transformer"
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", None) or type(model).__name__)


def is_hooked_transformer(model: nn.Module) -> bool:
    """Whether ``model`` is a TransformerLens model with hook points (``HookedTransformer``
    before TransformerLens 4, ``TransformerBridge`` from 4 on)."""
    cfg = getattr(model, "cfg", None)
    return (hasattr(model, "blocks") and hasattr(cfg, "n_layers") and hasattr(cfg, "d_model")
            and hasattr(model, "hook_dict"))


def _get(root: nn.Module, path: str) -> nn.Module | None:
    hooks = getattr(root, "hook_dict", None)
    if isinstance(hooks, Mapping) and path in hooks:
        return hooks[path]  # TransformerLens hook point (aliases included)
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _in_width(mod: nn.Module) -> int | None:
    """Input width of a linear-like module (Linear, GPT-2's Conv1D, ...)."""
    for attr in ("in_features", "nx"):
        v = getattr(mod, attr, None)
        if isinstance(v, int):
            return v
    w = getattr(mod, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2:
        return int(w.shape[1])
    return None


def _config_int(cfg: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _find_blocks(model: nn.Module, spec: ArchSpec | None, n_layers: int | None
                 ) -> tuple[str, nn.ModuleList] | None:
    if spec is not None:
        blocks = _get(model, spec.blocks)
        if isinstance(blocks, nn.ModuleList):
            return spec.blocks, blocks
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if n_layers is not None and len(mod) == n_layers:
            return name, mod
        if n_layers is None and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    return best


def _first_child(parent: nn.Module, names: Sequence[str]) -> str | None:
    for n in names:
        if isinstance(getattr(parent, n, None), nn.Module):
            return n
    return None


def _find_in(parent: nn.Module, names: Sequence[str]) -> str | None:
    """Path (relative to ``parent``) of the first linear-like descendant named in ``names``.

    Paths through a ModuleList (e.g. one expert of a mixture of experts) do not count: a hook
    there would see only part of the activation.
    """
    found = {}
    for path, mod in parent.named_modules():
        parts = path.split(".")
        if not path or any(p.isdigit() for p in parts):
            continue
        if parts[-1] in names and _in_width(mod) is not None:
            found.setdefault(parts[-1], path)
    for n in names:
        if n in found:
            return found[n]
    return None


def _discover(block: nn.Module) -> dict[str, str | None]:
    """Generic paths of attention, its output projection, MLP and down projection in a block."""
    attn = _first_child(block, _ATTN_NAMES)
    if attn is None:  # any direct child whose name mentions attention
        attn = next((n for n, _ in block.named_children() if "attn" in n or "attention" in n),
                    None)
    attn_proj = None
    if attn is not None:
        sub = _find_in(getattr(block, attn), _OPROJ_NAMES)
        attn_proj = f"{attn}.{sub}" if sub else None
    mlp = _first_child(block, _MLP_NAMES)
    mlp_proj = None
    if mlp is not None:
        mod = getattr(block, mlp)
        moe = any("expert" in n for n, _ in mod.named_modules())
        sub = None if moe else _find_in(mod, _DOWN_NAMES)  # no single hidden layer in an MoE
        mlp_proj = f"{mlp}.{sub}" if sub else None
    else:  # MLP layers directly in the block (OPT style)
        mlp_proj = _first_child(block, ("fc2", "down_proj", "dense_4h_to_h", "fc_out"))
        mlp = mlp_proj
    return {"attn": attn, "attn_proj": attn_proj, "mlp": mlp, "mlp_proj": mlp_proj}


def normalize_layers(layers: Iterable[int] | int | None, n_layers: int, what: str) -> list[int]:
    """Sorted unique layer indices (negative ones count from the end); all when ``None``."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = set()
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not -n_layers <= i < n_layers:
            raise CodebookError(f"{what}: layer {i!r} out of range; the model has {n_layers} "
                                f"layers (0..{n_layers - 1})")
        out.add(i % n_layers)
    if not out:
        raise CodebookError(f"{what}: no layers given; pass layer indices or None for all")
    return sorted(out)


def normalize_placements(placements: Iterable[str] | str) -> list[str]:
    """Validated placements, in the order given, without duplicates."""
    if isinstance(placements, str):
        placements = [placements]
    out: list[str] = []
    for p in placements:
        if p not in PLACEMENTS:
            raise CodebookError(f"unknown placement {p!r}; choose from {', '.join(PLACEMENTS)}")
        if p not in out:
            out.append(p)
    if not out:
        raise CodebookError(f"no placements given; choose from {', '.join(PLACEMENTS)}")
    return out


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks of a supported model."""
    if is_hooked_transformer(model):
        return int(model.cfg.n_layers)
    spec = FAMILIES.get(model_type(model))
    cfg = getattr(model, "config", None)
    found = _find_blocks(model, spec, _config_int(cfg, "num_hidden_layers", "n_layer",
                                                  "num_layers"))
    if found is None:
        raise CodebookError(f"{model_type(model)}: cannot find the list of decoder blocks "
                            "(a ModuleList); this model is not supported")
    return len(found[1])


def find_sites(model: nn.Module, placements: Iterable[str] | str,
               layers: Iterable[int] | int | None = None) -> list[Site]:
    """The sites for ``placements`` at ``layers`` (all when ``None``) of ``model``.

    Raises a one-line :class:`CodebookError` for an unknown placement, a layer out of range,
    or placements this model does not have (naming the model type and those placements).
    """
    placements = normalize_placements(placements)
    if is_hooked_transformer(model):
        return _hooked_sites(model, placements, layers)
    mtype = model_type(model)
    cfg = getattr(model, "config", None)
    spec = FAMILIES.get(mtype)
    n_cfg = _config_int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    found = _find_blocks(model, spec, n_cfg)
    if found is None:
        raise CodebookError(f"{mtype}: could not find {', '.join(placements)} (no list of "
                            "decoder blocks found); this model is not supported")
    blocks_path, blocks = found
    idx = normalize_layers(layers, len(blocks), mtype)
    hidden = _config_int(cfg, "hidden_size", "n_embd", "d_model")
    heads = _config_int(cfg, "num_attention_heads", "n_head", "num_heads")
    sites: list[Site] = []
    missing: list[str] = []
    for placement in placements:
        for i in idx:
            block = blocks[i]
            paths = _table_paths(block, spec) or _discover(block)
            site = _hf_site(model, f"{blocks_path}.{i}", block, i, placement, paths, hidden,
                            heads)
            if site is None:
                missing.append(placement)
                break
            sites.append(site)
    if missing:
        raise CodebookError(f"{mtype}: could not find placement(s) {', '.join(missing)} in "
                            f"blocks {blocks_path}; supported families: "
                            f"{', '.join(sorted(FAMILIES))} or the standard layout")
    return sites


def _table_paths(block: nn.Module, spec: ArchSpec | None) -> dict[str, str | None] | None:
    if spec is None:
        return None
    paths: dict[str, str | None] = {
        "attn": spec.attn, "attn_proj": spec.attn_proj, "mlp": spec.mlp,
        "mlp_proj": spec.mlp_proj}
    if any(_get(block, p) is None for p in paths.values() if p):
        return None  # a variant of the family with other names: fall back to discovery
    return paths


def _hf_site(model: nn.Module, prefix: str, block: nn.Module, i: int, placement: str,
             paths: Mapping[str, str | None], hidden: int | None, heads: int | None
             ) -> Site | None:
    name = f"layers.{i}.{placement}"

    def full(p: str) -> str:
        return f"{prefix}.{p}" if p else prefix

    if placement == "residual":
        return Site(name, i, placement, prefix, "post", hidden, 1) if hidden else None
    if placement in ("attn_out", "mlp_out"):
        p = paths["attn" if placement == "attn_out" else "mlp"]
        if not p or not hidden:
            return None
        return Site(name, i, placement, full(p), "post", hidden, 1)
    p = paths["attn_proj" if placement == "attn_heads" else "mlp_proj"]
    if not p:
        return None
    width = _in_width(block.get_submodule(p))
    if width is None:
        return None
    if placement == "attn_heads":
        if not heads:
            return None
        return Site(name, i, placement, full(p), "pre", width, heads)
    return Site(name, i, placement, full(p), "pre", width, 1)


def _hooked_sites(model: nn.Module, placements: list[str], layers: Iterable[int] | int | None
                  ) -> list[Site]:
    """Sites of a TransformerLens model, on its hook points (legacy names, which
    ``TransformerBridge`` keeps as aliases)."""
    cfg = model.cfg
    mtype = model_type(model)
    idx = normalize_layers(layers, int(cfg.n_layers), mtype)
    d_mlp = getattr(cfg, "d_mlp", None)
    table = {
        "attn_heads": ("blocks.{i}.attn.hook_z", cfg.n_heads * cfg.d_head, cfg.n_heads, True),
        "attn_out": ("blocks.{i}.hook_attn_out", cfg.d_model, 1, False),
        "mlp_out": ("blocks.{i}.hook_mlp_out", cfg.d_model, 1, False),
        "mlp_hidden": ("blocks.{i}.mlp.hook_post", d_mlp, 1, False),
        "residual": ("blocks.{i}.hook_resid_post", cfg.d_model, 1, False),
    }
    sites, missing = [], []
    for placement in placements:
        path, dim, heads, merge = table[placement]
        for i in idx:
            p = path.format(i=i)
            if _get(model, p) is None or not dim:
                missing.append(placement)
                break
            sites.append(Site(f"layers.{i}.{placement}", i, placement, p, "post", int(dim),
                              int(heads), merge))
    if missing:
        raise CodebookError(f"{mtype}: could not find placement(s) "
                            f"{', '.join(missing)} (hook points missing, e.g. an attention-only "
                            "model has no MLP)")
    return sites


# ------------------------------------------------------------------------------ hooks
def _first_input(args: tuple, kwargs: dict) -> tuple[Tensor | None, str | int | None]:
    if args:
        return args[0], 0
    for key in ("input", "hidden_states", "x"):
        if key in kwargs:
            return kwargs[key], key
    return None, None


class _SiteHook:
    """Calls a codebook on one site's activation when the shared state says so."""

    def __init__(self, site: Site, layer: Callable[[Tensor], Tensor], state: HookState) -> None:
        self.site = site
        self.layer = layer
        self.state = state

    def apply(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise CodebookError(f"{self.site.name}: expected a tensor at {self.site.module}, "
                                f"got {type(x).__name__}")
        shape = x.shape
        if self.site.merge_heads and x.dim() >= 3 and shape[-1] != self.site.dim:
            x = x.reshape(*shape[:-2], shape[-2] * shape[-1])
        elif x.dim() == 2 and self.state.tokens and x.shape[0] == math.prod(self.state.tokens):
            x = x.view(*self.state.tokens, shape[-1])  # (batch*seq, d) -> (batch, seq, d)
        return self.layer(x).reshape(shape)

    def pre(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.state.enabled:
            return None
        x, where = _first_input(args, kwargs)
        if where is None:
            raise CodebookError(f"{self.site.name}: {self.site.module} was called without a "
                                "tensor input to replace")
        y = self.apply(x)
        if where == 0:
            return (y, *args[1:]), kwargs
        return args, {**kwargs, where: y}

    def post(self, module: nn.Module, args: tuple, output: Any):
        if not self.state.enabled:
            return None
        if isinstance(output, Tensor):
            return self.apply(output)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            return type(output)([self.apply(output[0]), *output[1:]])
        raise CodebookError(f"{self.site.name}: cannot replace the output of {self.site.module} "
                            f"(a {type(output).__name__}, not a tensor or tuple)")


def _record_tokens(state: HookState):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None and args and isinstance(args[0], Tensor):
            x = args[0]
        if x is None and kwargs.get("inputs_embeds") is not None:
            x = kwargs["inputs_embeds"][..., 0]
        state.tokens = tuple(x.shape[:2]) if isinstance(x, Tensor) and x.dim() >= 2 else None
        for fn in state.on_forward:
            fn()
        return None

    return hook


class Attachment:
    """Hooks that route a model's activations through codebooks; ``remove()`` undoes them."""

    def __init__(self, model: nn.Module, sites: Sequence[Site],
                 layers: Mapping[str, Callable[[Tensor], Tensor]],
                 state: HookState | None = None) -> None:
        self.state = state or HookState()
        self.sites = list(sites)
        self.handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(_record_tokens(self.state), with_kwargs=True)]
        try:
            for site in self.sites:
                if site.name not in layers:
                    raise CodebookError(f"no codebook given for site {site.name}")
                hook = _SiteHook(site, layers[site.name], self.state)
                mod = _get(model, site.module)
                if mod is None:
                    raise CodebookError(f"{site.name}: module {site.module} not found")
                if site.hook == "pre":
                    self.handles.append(mod.register_forward_pre_hook(hook.pre, with_kwargs=True))
                else:
                    self.handles.append(mod.register_forward_hook(hook.post))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def attach(model: nn.Module, sites: Sequence[Site],
           layers: Mapping[str, Callable[[Tensor], Tensor]],
           state: HookState | None = None) -> Attachment:
    """Hook ``layers[site.name]`` (e.g. CodebookLayers) into ``model`` at every site."""
    return Attachment(model, sites, layers, state)
