"""Open checkpoints saved by the authors' own package (PyPI ``codebook-features`` 0.1.2).

Their ``save_pretrained`` folder (the format of the models released with the paper) holds
``config.json`` (the codebook settings only: ``codebook_at``, ``k_codebook``, ``loss``, ...)
and ``pytorch_model.bin`` or ``model.safetensors``: the whole finetuned model, base weights
under ``model.`` (with ``module_layer.`` segments where they wrapped a module) and each
codebook under ``...codebook_layer.``. :func:`load` turns it into an equivalent
:class:`~codebook_features.model.CodebookModel` on the checkpoint's finetuned base weights.
The settings map (DESIGN section 2b) is :data:`PLACEMENTS`, :data:`SIMILARITIES` and
:func:`loss_settings`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CodebookError

PLACEMENTS = {"attn_preproj": "attn_heads", "attn": "attn_out", "mlp": "mlp_out",
              "mlp_mid": "mlp_hidden", "transformer_block": "residual"}
"""Their ``codebook_at`` -> our placement."""
UNSUPPORTED = {"qkv": "codebooks on the query/key/value projections",
               "attn_plus_mlp": "one codebook on the sum of attention and MLP outputs"}
SIMILARITIES = {"inner_product": "cosine", "euclidean": "euclidean"}
"""Their ``similarity_metric`` -> ours (their inner product ranks by x . c/|c|)."""
FAMILIES = {  # model type -> (layers' path, module of each of their placements in a layer)
    "gpt_neox": ("gpt_neox.layers", {"attn_preproj": "attention.", "attn": "attention.",
                                     "mlp": "mlp.", "mlp_mid": "mlp.act.",
                                     "transformer_block": ""}),
    "gpt2": ("transformer.h", {"attn_preproj": "attn.", "attn": "attn.", "mlp": "mlp.",
                               "mlp_mid": "mlp.act.", "transformer_block": ""}),
    "gpt_neo": ("transformer.h", {"attn_preproj": "attn.attention.", "attn": "attn.attention.",
                                  "mlp": "mlp.", "mlp_mid": "mlp.act.",
                                  "transformer_block": ""}),
}
"""The families their code supports."""
RELEASED_BASES: dict[str, Any] = {
    "taufeeque/TinyStories-1Layer-21M-Codebook": "roneneldan/TinyStories-1Layer-21M",
    "taufeeque/pythia410m_wikitext_attn_codebook_model": "EleutherAI/pythia-410m-deduped",
    # Their TokFSM model: built from a config in their train_fsm_model.py (no hub base).
    "taufeeque/TokFSM_k1_codebook_model": dict(
        model_type="gpt_neox", vocab_size=11, hidden_size=128, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=512, rotary_emb_base=10000,
        bos_token_id=10, eos_token_id=10, max_position_embeddings=128),
}
"""The base architecture of each released model, for when no ``base_model`` is given."""
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_authors_folder(folder: Path) -> bool:
    """Whether ``folder`` is their ``save_pretrained`` output (a codebook ``config.json``)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "codebook_at" in cfg


def loss_settings(loss: str) -> dict[str, Any]:
    """Their ``loss`` -> our settings: ``base`` (lambda 0), ``aeloss`` (lambda 1),
    ``fullaeloss[-beta]`` (plus a commitment term, beta 0.25 by default) and ``vqvae[-beta]``
    (the codes get the reconstruction gradient only)."""
    name, _, beta_text = str(loss).partition("-")
    try:
        beta = float(beta_text) if beta_text else 0.25
    except ValueError:
        raise CodebookError(f"loss {loss!r}: cannot read its coefficient") from None
    table = {"base": dict(mse_coeff=0.0), "aeloss": dict(mse_coeff=1.0),
             "fullaeloss": dict(mse_coeff=1.0, commitment_coeff=beta),
             "vqvae": dict(mse_coeff=1.0, commitment_coeff=beta, codes_lm_grad=False)}
    if name not in table or (beta_text and name in ("base", "aeloss")):
        raise CodebookError(f"loss {loss!r} has no counterpart; theirs are base, aeloss, "
                            "fullaeloss[-beta] and vqvae[-beta]")
    return {"mse_reduction": "sum", **table[name]}


def _per_site(cfg: dict[str, Any], key: str, n: int) -> list[Any]:
    value = cfg.get(key, 1)
    values = list(value) if isinstance(value, list | tuple) else [value] * n
    if len(values) != n:
        raise CodebookError(f"config.json: {key} has {len(values)} entries for {n} "
                            "codebook_at entries; the checkpoint is corrupt")
    return values


def model_config(cfg: dict[str, Any], heads: int | None, num_layers: int):
    """Our :class:`CodebookModelConfig` for their config dict."""
    from .model_config import CodebookModelConfig

    at = cfg["codebook_at"]
    at = [at] if isinstance(at, str) else list(at)
    bad = [a for a in at if a not in PLACEMENTS]
    if bad:
        known = {a: UNSUPPORTED[a] for a in bad if a in UNSUPPORTED}
        what = "; ".join(f"{a}: {d}" for a, d in known.items()) or ", ".join(bad)
        raise CodebookError(f"codebook_at {bad} has no counterpart here ({what}); supported: "
                            f"{', '.join(PLACEMENTS)}")
    if "attn" in at and "attn_preproj" in at:
        raise CodebookError("codebook_at lists both attn and attn_preproj, which their code "
                            "nests in one module; such a checkpoint cannot be read unambiguously")
    sim = cfg.get("similarity_metric", "inner_product")
    if sim not in SIMILARITIES:
        raise CodebookError(f"similarity_metric {sim!r} has no counterpart; theirs are "
                            f"{', '.join(SIMILARITIES)}")
    overrides: dict[str, dict[str, Any]] = {}
    for a, kind, groups, k, codes in zip(at, _per_site(cfg, "codebook_type", len(at)),
                                         _per_site(cfg, "num_codebooks", len(at)),
                                         _per_site(cfg, "k_codebook", len(at)),
                                         _per_site(cfg, "num_codes", len(at)), strict=True):
        if kind == "vanilla":
            groups = 1
        elif groups == -1:
            groups = heads
        overrides[PLACEMENTS[a]] = {"groups": int(groups), "k": int(k), "num_codes": int(codes)}
    layers = cfg.get("layers_to_snap", "all")
    layers = None if layers == "all" else sorted({int(i) % num_layers for i in layers})
    replace = (cfg.get("codebook_kwargs") or {}).get("replace_after_steps", 0)
    return CodebookModelConfig(
        placements=[PLACEMENTS[a] for a in at], layers=layers, similarity=SIMILARITIES[sim],
        combine="mean", layernorm=True, layernorm_scope="group",
        num_codes=overrides[PLACEMENTS[at[0]]]["num_codes"],
        overrides=overrides, **({"dead_code_window": int(replace)} if replace else {}),
        **loss_settings(cfg.get("loss", "aeloss")))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read without executing pickled code."""
    from safetensors.torch import load_file

    index = next((folder / f"{w}.index.json" for w in WEIGHT_FILES
                  if (folder / f"{w}.index.json").is_file()), None)
    if index is not None:  # sharded
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            raise CodebookError(f"{index}: not a valid weight index; the download is "
                                "corrupt, fetch it again") from None
    else:
        files = [w for w in WEIGHT_FILES if (folder / w).is_file()][:1]
    if not files:
        raise CodebookError(f"{folder}: has their config.json but no model.safetensors or "
                            "pytorch_model.bin; the checkpoint is incomplete")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        try:
            if name.endswith(".safetensors"):
                tensors.update(load_file(str(path)))
            else:
                tensors.update(torch.load(path, map_location="cpu", weights_only=True))
        except FileNotFoundError:
            raise CodebookError(f"{path}: file not found; the checkpoint is incomplete") from None
        except Exception as e:  # noqa: BLE001 - torch.load raises UnpicklingError, EOFError,
            # RuntimeError, ... for a bad file; safetensors its SafetensorError
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CodebookError(f"{path}: cannot read the weights ({first}); the file is "
                                "truncated or corrupt, or holds more than tensors: fetch it "
                                "again") from None
    return tensors


def _base_model(base: Any, source: str, base_kwargs: dict[str, Any]) -> nn.Module:
    """The base architecture (weights are the checkpoint's): a model, a config, a dict of
    config values, or a name whose config is read (its weights are never downloaded)."""
    import transformers as T

    if base is None:
        base = RELEASED_BASES.get(source)
        if base is None:
            raise CodebookError(f"{source}: their checkpoint does not name its base model; "
                                "pass base_model= (a model, config or hub name, e.g. "
                                "EleutherAI/pythia-410m-deduped)")
    if isinstance(base, nn.Module):
        return base
    if isinstance(base, dict):
        base = T.AutoConfig.for_model(**base)
    if not isinstance(base, T.PretrainedConfig):
        from .model_config import load_base_config
        base = load_base_config(base)
    return T.AutoModelForCausalLM.from_config(base, **base_kwargs)


def _split(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                      dict[str, torch.Tensor]]:
    """(base weights, codebook tensors), both without the ``model.`` prefix and the
    ``module_layer.`` segments of their wrappers."""
    base, books = {}, {}
    for key, value in tensors.items():
        k = key[len("model."):] if key.startswith("model.") else key
        k = k.replace("module_layer.", "")
        (books if "codebook_layer." in k else base)[k] = value
    return base, books


def _renamed(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights under the names this transformers gives them (e.g. GPT-NeoX's old ``embed_out``
    is ``lm_head`` from transformers 5 on), by transformers' own renaming table where it has
    one (older releases use the old names and need none)."""
    try:
        from transformers.modeling_utils import get_model_conversion_mapping

        renames = [t for t in get_model_conversion_mapping(model)
                   if type(t).__name__ == "WeightRenaming"]
    except (ImportError, AttributeError, TypeError):
        return weights
    out = {}
    for key, value in weights.items():
        for t in renames:
            new, hit = t.rename_source_key(key)
            key = new if hit is not None else key
        out[key] = value
    return out


def _load_base_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    weights = _renamed(model, weights)
    own = model.state_dict()
    for k, v in weights.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise CodebookError(f"{source}: base weight {k} has shape {tuple(v.shape)} but the "
                                f"given base model's is {tuple(own[k].shape)}; pass the base "
                                "model the checkpoint was finetuned from")
    # Buffers that older transformers saved (attention masks, rotary frequencies) are rebuilt.
    params = {n for n, _ in model.named_parameters()}
    extra = [k for k in weights if k not in own and not _old_buffer(k, weights)]
    tied = {k for k in own if k not in weights and _is_tied(model, k)}
    missing = [k for k in own if k not in weights and k in params and k not in tied]
    if extra or missing:
        raise CodebookError(f"{source}: the base model does not fit the checkpoint (weights "
                            f"missing from it: {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                            f"not in the base: {extra[:3]}{'...' if len(extra) > 3 else ''}); "
                            "pass the base model the checkpoint was finetuned from")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    if tied:
        model.tie_weights()


def _old_buffer(key: str, weights: dict[str, torch.Tensor]) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in ("masked_bias", "inv_freq") or (
        last == "bias" and key[: -len("bias")] + "weight" not in weights)


def _is_tied(model: nn.Module, key: str) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return bool(tie and out is not None and key.endswith("weight") and
                out.weight is model.get_input_embeddings().weight and
                dict(model.named_parameters(remove_duplicate=False)).get(key) is out.weight)


def load(model_cls: type, folder: Path, source: str, base_model: Any = None,
         **base_kwargs: Any):
    """A ``model_cls`` (:class:`CodebookModel`) equal to their checkpoint in ``folder``
    (``source``: the name it was asked for, a hub id or a path), on its finetuned base
    weights, in eval mode."""
    from . import sites

    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CodebookError(f"{folder / 'config.json'}: cannot read it ({e})") from None
    weights = read_weights(folder)
    base = _base_model(base_model, source, base_kwargs)
    mtype = sites.model_type(base)
    if mtype not in FAMILIES:
        raise CodebookError(f"{source}: their code supports GPT-2, GPT-Neo and GPT-NeoX; the "
                            f"given base model is {mtype!r}")
    n_layers = sites.num_layers(base)
    base_weights, books = _split(weights)
    _load_base_weights(base, base_weights, source)
    heads = sites.find_sites(base, ["attn_heads"], [0])[0].heads
    model = model_cls(base, model_config(cfg, heads, n_layers))
    layers_path, where = FAMILIES[mtype]
    ours_to_theirs = {v: k for k, v in PLACEMENTS.items()}
    used: set[str] = set()
    for name, layer in model.sites.items():
        spec = model.site_specs[name]
        module = where[ours_to_theirs[spec.placement]]
        _fill(layer, books, f"{layers_path}.{spec.layer}.{module}codebook_layer.", source, used)
    left = sorted(set(books) - used)
    if left:
        raise CodebookError(f"{source}: codebook tensors {left[:3]} are not at any site its "
                            "config lists; the checkpoint and its config.json do not match")
    return model.train(False)


def _fill(layer: Any, books: dict[str, torch.Tensor], prefix: str, source: str,
          used: set[str]) -> None:
    c = layer.config
    if c.groups == 1 and f"{prefix}codebook.weight" in books:
        keys = {"book": [f"{prefix}codebook.weight"], "w": [f"{prefix}ln.weight"],
                "b": [f"{prefix}ln.bias"]}
    else:
        keys = {"book": [f"{prefix}codebook.{g}.codebook.weight" for g in range(c.groups)],
                "w": [f"{prefix}codebook.{g}.ln.weight" for g in range(c.groups)],
                "b": [f"{prefix}codebook.{g}.ln.bias" for g in range(c.groups)]}
    missing = [k for ks in keys.values() for k in ks if k not in books]
    if missing:
        raise CodebookError(f"{source}: codebook {c.name} needs {missing[0]}, which the "
                            "checkpoint lacks; the base model's layout or the checkpoint "
                            "does not match")
    book = torch.stack([books[k] for k in keys["book"]])
    w = torch.cat([books[k] for k in keys["w"]])
    b = torch.cat([books[k] for k in keys["b"]])
    if tuple(book.shape) != tuple(layer.codebook.shape) or w.numel() != c.dim:
        raise CodebookError(f"{source}: codebook {c.name} has shape {tuple(book.shape)} in the "
                            f"checkpoint but {tuple(layer.codebook.shape)} at this base "
                            "model's site; pass the base model the checkpoint was made for")
    with torch.no_grad():
        layer.codebook.copy_(book)
        layer.ln.weight.copy_(w)
        layer.ln.bias.copy_(b)
    used.update(k for ks in keys.values() for k in ks)
