"""``CodebookModel``: a causal language model plus codebooks at some of its sites.

The codebooks are attached with hooks (see :mod:`codebook_features.sites`); the base model's
own forward, ``generate`` and weights are used unchanged. Only the codebooks and their config
are saved (:meth:`CodebookModel.save_codebooks`), and they load back onto any base checkpoint
of the same shape (:meth:`CodebookModel.from_pretrained`).

Training note: the codebook MSE term ``lambda * MSE(y, stop_grad(x))`` already reaches the
codebook gradients through each layer's backward. :meth:`CodebookModel.codebook_loss` is a
detached figure for logging; a trainer must optimise the LM loss alone and must not add it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import sites as _sites
from .codebook import CodebookConfig, CodebookLayer
from .errors import CodebookError
from .io import read_json, read_safetensors, write_json, write_safetensors
from .model_config import (  # the saved format and the config, also importable from here
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    CodebookModelConfig,
    _key,
    load_base_config,
    load_base_model,
)

__all__ = ["CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "WEIGHTS_NAME", "CodebookModel",
           "CodebookModelConfig", "load_base_config", "load_base_model"]

class CodebookModel(nn.Module):
    """A base causal LM with codebooks hooked into it.

    ``CodebookModel(base, placements=["attn_heads"], num_codes=1000, k=8)``. Calling the model
    calls the base model (same arguments, same outputs); with codebooks disabled its logits are
    exactly the base model's. Attributes not found here are looked up on the base model
    (``config``, ``device``, ``generation_config``, ...).
    """

    def __init__(self, base_model: nn.Module, config: CodebookModelConfig | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = CodebookModelConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.codebook_config = config
        self.base_model = base_model
        self.site_specs: dict[str, _sites.Site] = {
            s.name: s for s in _sites.find_sites(base_model, config.placements, config.layers)}
        self.codebooks = nn.ModuleDict()
        for name, s in self.site_specs.items():
            groups = config.groups if config.groups is not None else s.heads
            cfg = config.codebook_config(s.dim, groups, name, s.placement)
            self.codebooks[_key(name)] = CodebookLayer(cfg)
        self._place_codebooks()
        self.train(base_model.training)  # start in the base model's mode (eval after loading)
        self._state = _sites.HookState()
        self._state.on_forward.append(self._clear_last)
        # Hooks look the layer up at call time, so a replaced layer takes effect at once.
        self._attachment: _sites.Attachment | None = _sites.attach(
            base_model, list(self.site_specs.values()),
            {name: self._caller(_key(name)) for name in self.site_specs}, self._state)

    def _caller(self, key: str) -> Callable[[Tensor], Tensor]:
        codebooks = self.codebooks
        return lambda x: codebooks[key](x)

    def _place_codebooks(self) -> None:
        p = next(self.base_model.parameters(), None)
        if p is not None:
            self.codebooks.to(p.device)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_model")
            if base is None or name in ("base_model", "codebooks"):
                raise
            return getattr(base, name)

    # ---------------------------------------------------------------- running
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward (codebooks act through hooks)."""
        return self.base_model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate``, with the codebooks (and interventions) in place."""
        return self.base_model.generate(*args, **kwargs)

    @property
    def enabled(self) -> bool:
        """Whether the codebooks replace their sites' activations."""
        return self._state.enabled

    def enable_codebooks(self) -> None:
        self._state.enabled = True

    def disable_codebooks(self) -> None:
        """Bypass every codebook: the model computes exactly the base model's outputs."""
        self._state.enabled = False

    @contextlib.contextmanager
    def codebooks_disabled(self) -> Iterator[None]:
        """Context in which the codebooks are off."""
        old = self._state.enabled
        self._state.enabled = False
        try:
            yield
        finally:
            self._state.enabled = old

    def remove_hooks(self) -> nn.Module:
        """Detach the codebooks from the base model for good and return the base model."""
        if self._attachment is not None:
            self._attachment.remove()
            self._attachment = None
        return self.base_model

    # ------------------------------------------------------------------ sites
    @property
    def sites(self) -> dict[str, CodebookLayer]:
        """Site name (``layers.{i}.{placement}``) -> its :class:`CodebookLayer`."""
        return {name: self.codebooks[_key(name)] for name in self.site_specs}

    @property
    def site_names(self) -> list[str]:
        return list(self.site_specs)

    def site(self, name: str) -> CodebookLayer:
        """The codebook at ``name`` (e.g. ``"layers.0.attn_heads"``), for reading or steering."""
        if name not in self.site_specs:
            raise CodebookError(f"no codebook at site {name!r}; sites: "
                                f"{', '.join(self.site_specs) or 'none'}")
        return self.codebooks[_key(name)]

    def _clear_last(self) -> None:
        for layer in self.codebooks.values():
            layer.last_codes = None
            layer.last_scores = None
            layer.last_mse = None

    def codes(self) -> dict[str, Tensor]:
        """Codes chosen at every site in the last forward: ``(batch, seq, G, k)`` LongTensors."""
        out = {n: layer.last_codes for n, layer in self.sites.items()
               if layer.last_codes is not None}
        if not out:
            raise CodebookError("no codes yet: run a forward with the codebooks enabled first")
        return out

    def clear_interventions(self) -> None:
        """Remove every site's interventions and bypass."""
        for layer in self.codebooks.values():
            layer.clear_interventions()

    def codebook_loss(self) -> Tensor:
        """``sum_sites lambda * MSE`` of the last forward, detached (for logging only).

        Its gradient is already applied to the codebooks by each layer's backward: do not add
        this to the training loss.
        """
        terms = [layer.config.mse_coeff * layer.last_mse for layer in self.codebooks.values()
                 if layer.last_mse is not None]
        if not terms:
            raise CodebookError("no codebook loss yet: run a forward with the codebooks "
                                "enabled first")
        return torch.stack(terms).sum().detach()

    # ----------------------------------------------------------------- params
    def codebook_parameters(self) -> Iterator[nn.Parameter]:
        return self.codebooks.parameters()

    def base_parameters(self) -> Iterator[nn.Parameter]:
        return self.base_model.parameters()

    def freeze_base(self) -> None:
        """Stop gradients to the base model's weights (codebooks still train)."""
        for p in self.base_model.parameters():
            p.requires_grad_(False)

    def unfreeze_base(self) -> None:
        for p in self.base_model.parameters():
            p.requires_grad_(True)

    # -------------------------------------------------------------- save/load
    def base_info(self) -> dict[str, Any]:
        """What a base model must match for these codebooks: type, widths, layer count."""
        return _base_info(self.base_model)

    def save_codebooks(self, directory: str | os.PathLike, base_model_name: str | None = None
                       ) -> None:
        """Write the codebooks alone (safetensors) and their config (JSON) into ``directory``.

        ``base_model_name``: hub name or folder to record (default: the base model's
        ``name_or_path``), used by :meth:`from_pretrained` when no base model is given.
        """
        d = Path(directory)
        tensors = {f"{name}.{k}": v for name, layer in self.sites.items()
                   for k, v in layer.state_dict().items()}
        base = self.base_info()
        if base_model_name is not None:
            base["name_or_path"] = str(base_model_name)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": self.codebook_config.to_dict(),
            "base_model": base,
            "sites": {name: {"placement": s.placement, "layer": s.layer, "module": s.module,
                             "dim": s.dim, "codebook": self.site(name).config.to_dict()}
                      for name, s in self.site_specs.items()},
        }
        write_safetensors(d / WEIGHTS_NAME, tensors, metadata={"format": FORMAT})
        from .modelcard import write_model_card  # README.md, the hub's model card

        write_model_card(d, meta)
        write_json(d / CONFIG_NAME, meta)  # written last: its presence marks a complete save

    @classmethod
    def from_pretrained(cls, codebook_dir: str | os.PathLike,
                        base_model: nn.Module | str | os.PathLike | None = None,
                        **base_kwargs: Any) -> CodebookModel:
        """Load codebooks from a folder or a hub id onto a base model.

        ``codebook_dir``: a folder written by :meth:`save_codebooks`, or one saved by the
        authors' package (their released models, e.g. ``taufeeque/TinyStories-1Layer-21M-
        Codebook``: see :mod:`codebook_features.authors`), or a hub id of either (fetched with
        ``huggingface_hub``, offline from its cache). ``base_model``: a model, a local folder
        or a hub name (default: the one recorded at save time; for the authors' checkpoints,
        whose weights hold the finetuned base, only its architecture is used), loaded with
        ``AutoModelForCausalLM.from_pretrained(..., **base_kwargs)``. A base model whose type,
        layer count or site widths differ is refused.
        """
        from . import authors
        from .fetch import local_folder

        d = local_folder(codebook_dir)
        if not (d / CONFIG_NAME).is_file() and authors.is_authors_folder(d):
            return authors.load(cls, d, str(codebook_dir), base_model, **base_kwargs)
        if not (d / CONFIG_NAME).is_file():
            raise CodebookError(f"{d}: neither codebooks saved by this library ({CONFIG_NAME}) "
                                "nor a checkpoint of the authors' package (config.json with "
                                "codebook_at); check the folder")
        meta = read_json(d / CONFIG_NAME)
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt != FORMAT:
            raise CodebookError(f"{d / CONFIG_NAME}: not a codebook model config (format "
                                f"{fmt!r}, expected {FORMAT!r})")
        if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
            raise CodebookError(f"{d / CONFIG_NAME}: format version {meta.get('version')!r} "
                                "was written by a newer codebook-features; upgrade it")
        saved = meta["base_model"]
        if base_model is None:
            base_model = saved.get("name_or_path") or None
            if base_model is None:
                raise CodebookError(f"{d}: no base model name was recorded; pass base_model= "
                                    "(a model, a folder or a hub name)")
            if base_model == ".":  # the base was saved beside the codebooks
                base_model = d
        if not isinstance(base_model, nn.Module):
            base_model = load_base_model(base_model, **base_kwargs)
        config = CodebookModelConfig.from_saved(meta["config"])
        _check_base(base_model, saved, d)
        model = cls(base_model, config)
        tensors = read_safetensors(d / WEIGHTS_NAME)
        if set(model.site_specs) != set(meta["sites"]):
            raise CodebookError(f"{d}: saved sites {sorted(meta['sites'])} do not match the "
                                f"base model's {sorted(model.site_specs)}")
        for name, info in meta["sites"].items():
            spec = model.site_specs[name]
            cb = CodebookConfig.from_saved(info["codebook"])
            if cb.dim != spec.dim:
                raise CodebookError(f"{d}: site {name} has width {spec.dim} in this base model "
                                    f"but the saved codebook has width {cb.dim}; wrong base "
                                    "model")
            layer = CodebookLayer(cb)
            prefix = f"{name}."
            layer.load_tensors({k[len(prefix):]: v for k, v in tensors.items()
                                if k.startswith(prefix)}, source=f"{d / WEIGHTS_NAME} [{name}]")
            model.codebooks[_key(name)] = layer
        model._place_codebooks()
        model.train(base_model.training)
        return model


def _base_info(base: nn.Module) -> dict[str, Any]:
    cfg = getattr(base, "config", None)
    tl_cfg = getattr(base, "cfg", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(tl_cfg, "model_name", None) or ""
    hidden = _sites._config_int(cfg, "hidden_size", "n_embd", "d_model")
    if hidden is None:
        hidden = _sites._config_int(tl_cfg, "d_model")
    return {"name_or_path": str(name), "model_type": _sites.model_type(base),
            "num_layers": _sites.num_layers(base), "hidden_size": hidden}


def _check_base(base: nn.Module, saved: dict[str, Any], where: Path) -> None:
    info = _base_info(base)
    for key, what in (("model_type", "model type"), ("num_layers", "layer count"),
                      ("hidden_size", "hidden size")):
        if saved.get(key) is not None and info[key] != saved[key]:
            raise CodebookError(f"{where}: codebooks need a base model with {what} "
                                f"{saved[key]}, this one has {info[key]}; pass the matching "
                                "base model")
