"""Codebook sites in the sparse-autoencoder toolkit's shape: SAELens' on-disk format.

Each site becomes a folder SAELens' ``SAE.load_from_disk`` layout: ``cfg.json`` (``d_in``,
``d_sae``, ``dtype``, ``architecture``, ``metadata`` with ``model_name`` / ``hook_name`` /
``sae_lens_version``, ...) and ``sae_weights.safetensors`` (``W_enc`` ``(d_in, d_sae)``,
``b_enc``, ``W_dec`` ``(d_sae, d_in)``, ``b_dec``). A codebook is not a linear-ReLU SAE, so its
architecture is ``"codebook"`` and the file also holds the LayerNorm (``ln_weight``,
``ln_bias``); with ``d_sae = G * C`` latents (code ``c`` of group ``g`` is latent ``g * C +
c``):

* ``encode(x)``: ``LayerNorm(x)`` (per group, or over the whole width, as the layer), scores
  ``x_n @ W_enc + b_enc`` where column ``g*C + c`` of ``W_enc`` is the code in group ``g``'s
  slice (divided by its norm for ``cosine``; ``b_enc = -|c|^2 / 2`` for ``euclidean``, so the
  score ranks as ``-|x - c|^2``), the top ``k`` of each group, each chosen latent set to the
  slot weight (``1/k`` for ``mean``, 1 for ``sum``), the others 0;
* ``decode(f) = f @ W_dec + b_dec``: the codebook's output (``b_dec`` is zero).

So ``decode(encode(x))`` is the layer's output and the nonzero latents of ``encode(x)`` are
its codes. :class:`CodebookSAE` is that object (``encode``, ``decode``, ``forward``,
``load_from_disk``); SAELens itself could not be installed beside this project's pins
(sae-lens 6.54 needs transformer-lens < 4; 6.51 installs beside transformer-lens 4.3 but fails
to import with it), so SAELens has no ``"codebook"`` class registered here: its tools read the
folder once such a class is registered with ``sae_lens.register_sae_class``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CodebookError
from .io import read_json, write_json

ARCHITECTURE = "codebook"
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
SAELENS_FORMAT = "6.0.0"
"""The SAELens config version written (``metadata.sae_lens_version``: 6.x layout)."""

TL_HOOKS = {"attn_heads": ("blocks.{i}.attn.hook_z", "hook_z"),
            "attn_out": ("blocks.{i}.hook_attn_out", "none"),
            "mlp_out": ("blocks.{i}.hook_mlp_out", "none"),
            "mlp_hidden": ("blocks.{i}.mlp.hook_post", "none"),
            "residual": ("blocks.{i}.hook_resid_post", "none")}
"""Placement -> (TransformerLens hook name, SAELens ``reshape_activations``)."""


def site_tensors(layer: Any) -> dict[str, Tensor]:
    """The SAELens tensors of a codebook layer (see the module docstring), float32."""
    c = layer.config
    g, n, dg = c.groups, c.num_codes, c.group_dim
    book = layer.codebook.detach().float().cpu()  # (G, C, dg)
    enc = book / book.norm(dim=-1, keepdim=True).clamp_min(1e-12) \
        if c.similarity == "cosine" else book
    w_enc = torch.zeros(c.dim, g * n)
    w_dec = torch.zeros(g * n, c.dim)
    for i in range(g):
        w_enc[i * dg:(i + 1) * dg, i * n:(i + 1) * n] = enc[i].T
        w_dec[i * n:(i + 1) * n, i * dg:(i + 1) * dg] = book[i]
    b_enc = -0.5 * book.square().sum(-1).reshape(-1) if c.similarity == "euclidean" \
        else torch.zeros(g * n)
    out = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": torch.zeros(c.dim)}
    if layer.ln is not None:
        out["ln_weight"] = layer.ln.weight.detach().float().cpu().clone()
        out["ln_bias"] = layer.ln.bias.detach().float().cpu().clone()
    return out


def site_cfg(model: Any, site: str) -> dict[str, Any]:
    """The SAELens ``cfg.json`` of a site."""
    layer = model.site(site)
    c = layer.config
    spec = model.site_specs[site]
    tl_hook, reshape = TL_HOOKS.get(spec.placement, (None, "none"))
    ln = None
    if layer.ln is not None:
        ln = "group" if getattr(layer.ln, "groups", 1) > 1 else "whole"
    return {
        "d_in": c.dim, "d_sae": c.groups * c.num_codes, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": reshape, "architecture": ARCHITECTURE,
        "groups": c.groups, "num_codes": c.num_codes, "k": c.k,
        "slot_weight": 1.0 / c.k if c.combine == "mean" else 1.0,
        "similarity": c.similarity, "layernorm": ln,
        "layernorm_eps": float(getattr(layer.ln, "eps", 1e-5)) if ln else None,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT, "sae_lens_training_version": SAELENS_FORMAT,
            "model_name": model.base_info().get("name_or_path") or None,
            "hook_name": tl_hook.format(i=spec.layer) if tl_hook else None,
            "hook_head_index": None, "prepend_bos": True,
            "codebook_site": site, "hf_module": spec.module, "hf_hook": spec.hook,
        },
    }


def export_site(model: Any, site: str, folder: str | os.PathLike) -> Path:
    """Write ``site`` of ``model`` as an SAELens folder (written whole or not at all)."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    layer = model.site(site)  # unknown site: one line naming the sites
    cfg = site_cfg(model, site)
    tensors = site_tensors(layer)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / CFG_NAME).write_text(json.dumps(cfg, indent=2))
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


class CodebookSAE(nn.Module):
    """A codebook site as an SAE (encode / decode / forward), read from an SAELens folder."""

    def __init__(self, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        super().__init__()
        if cfg.get("architecture") != ARCHITECTURE:
            raise CodebookError(f"architecture {cfg.get('architecture')!r} is not "
                                f"{ARCHITECTURE!r}; load it with SAELens")
        self.cfg = cfg
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            self.register_buffer(key, tensors[key])
        self.ln_weight = tensors.get("ln_weight")
        self.ln_bias = tensors.get("ln_bias")

    @classmethod
    def load_from_disk(cls, path: str | os.PathLike, device: str = "cpu") -> CodebookSAE:
        from safetensors.torch import load_file

        p = Path(path)
        if not (p / CFG_NAME).is_file() or not (p / WEIGHTS_NAME).is_file():
            raise CodebookError(f"{p}: not an SAELens folder ({CFG_NAME}, {WEIGHTS_NAME})")
        return cls(read_json(p / CFG_NAME), load_file(str(p / WEIGHTS_NAME), device=device))

    def normalize(self, x: Tensor) -> Tensor:
        c = self.cfg
        if c["layernorm"] is None:
            return x
        g = c["groups"] if c["layernorm"] == "group" else 1
        xn = F.layer_norm(x.unflatten(-1, (g, -1)), (x.shape[-1] // g,),
                          eps=c["layernorm_eps"]).flatten(-2)
        return xn * self.ln_weight + self.ln_bias

    def encode(self, x: Tensor) -> Tensor:
        c = self.cfg
        scores = (self.normalize(x.float()) @ self.W_enc + self.b_enc)
        scores = scores.unflatten(-1, (c["groups"], c["num_codes"]))
        top = scores.topk(c["k"], dim=-1).indices
        acts = torch.zeros_like(scores).scatter_(-1, top, c["slot_weight"])
        return acts.flatten(-2)

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


# -------------------------------------------------------------------- command
def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("codebooks", help="folder written by save_codebooks")
    p.add_argument("out", help="folder to write one SAELens folder per site into")
    p.add_argument("--site", action="append",
                   help="a site to export (repeatable; default: every site)")
    p.add_argument("--base-model", help="the base model, if not recorded with the codebooks")


def run(args: argparse.Namespace) -> int:
    from .io import writable_dir
    from .model import CodebookModel

    if not Path(args.codebooks).is_dir():
        raise CodebookError(f"codebook folder {args.codebooks} not found")
    out = writable_dir(args.out)
    model = CodebookModel.from_pretrained(args.codebooks, base_model=args.base_model)
    sites = args.site or model.site_names
    for s in sites:
        model.site(s)  # every name checked before writing
    written = {s: str(export_site(model, s, out / s.replace(".", "_"))) for s in sites}
    write_json(out / "sites.json", written)
    print(json.dumps(written, indent=1))
    return 0
