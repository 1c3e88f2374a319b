"""The standard evaluation (CE loss recovered, KL, explained variance, L0, alive codes) against
naive computations on a tiny model: plain hooks on the base model, numpy formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model, tokens

from codebook_features.errors import CodebookError
from codebook_features.evaluation import evaluate_codebooks, flat_metrics, format_table
from codebook_features.evaluation.standard import KEYS, standard_evaluation
from codebook_features.model import CodebookModel
from codebook_features.report import write_code_density_plot

SITES = ["layers.0.attn_heads", "layers.1.attn_heads", "layers.0.mlp_out", "layers.1.mlp_out"]


def make_model(**kw) -> CodebookModel:
    torch.manual_seed(0)
    return CodebookModel(tiny_model("gpt_neox"), placements=["attn_heads", "mlp_out"],
                         num_codes=16, k=2, **kw)


def padded_data(rows: int = 6, seq: int = 16) -> dict[str, torch.Tensor]:
    """Rows whose last positions are padding (attention_mask 0, labels -100)."""
    ids = tokens(rows, seq, seed=1)
    mask = torch.ones_like(ids)
    for i in range(rows):
        mask[i, seq - i:] = 0  # row i has i padded positions
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@torch.no_grad()
def naive_logits(model: CodebookModel, ids: torch.Tensor, on: list[str],
                 replace: dict[str, torch.Tensor | None] | None = None) -> torch.Tensor:
    """Logits with the codebooks of ``on`` only, or (``replace``) with the base model and
    plain torch hooks setting those sites to a constant (None: zeros)."""
    if replace is None:
        for name, layer in model.sites.items():
            layer.bypass = name not in on
        try:
            return model(ids).logits
        finally:
            for layer in model.sites.values():
                layer.bypass = False
    handles = []
    for name, value in replace.items():
        spec = model.site_specs[name]
        mod = model.base_model.get_submodule(spec.module)

        def const(t, value=value):
            return torch.zeros_like(t) if value is None else value.to(t).expand(t.shape)

        if spec.hook == "pre":
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, c=const: (c(args[0]), *args[1:])))
        else:
            handles.append(mod.register_forward_hook(lambda m, args, out, c=const: c(out)))
    try:
        with model.codebooks_disabled():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def naive_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                 labels[:, 1:].reshape(-1), ignore_index=-100))


def naive_kl(base: torch.Tensor, other: torch.Tensor, labels: torch.Tensor) -> float:
    p = np.exp(base[:, :-1].double().numpy())
    p /= p.sum(-1, keepdims=True)
    q = np.exp(other[:, :-1].double().numpy())
    q /= q.sum(-1, keepdims=True)
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    return float(kl[(labels[:, 1:] != -100).numpy()].mean())


@torch.no_grad()
def site_inputs(model: CodebookModel, ids: torch.Tensor, on: list[str]) -> dict[str, torch.Tensor]:
    """Each site's raw input ``a`` with the codebooks of ``on`` in (``CodebookLayer.recorded``)."""
    for layer in model.sites.values():
        layer.recorded = []
    naive_logits(model, ids, on)
    out = {n: torch.cat([r.reshape(-1, layer.config.dim) for r in layer.recorded])
           for n, layer in model.sites.items()}
    for layer in model.sites.values():
        layer.recorded = None
    return out


def naive_activation_figures(model: CodebookModel, a: dict[str, torch.Tensor],
                             valid: torch.Tensor) -> tuple[float, float, float, float]:
    """Pooled (sse, variance, l0, alive codes / codes) of the sites in ``a`` (numpy)."""
    sse = var = l0 = alive = total = 0.0
    for name, acts in a.items():
        layer = model.site(name)
        c = layer.config
        with torch.no_grad():
            y = layer(acts)[valid].double().numpy()
            x = layer.normalize(acts)[valid].double().numpy()
            codes = layer.last_codes[valid].numpy()
        sse += ((y - x) ** 2).sum()
        var += ((x - x.mean(0)) ** 2).sum()
        l0 += np.mean([sum(len(set(codes[t, g])) for g in range(c.groups))
                       for t in range(len(codes))])
        alive += sum(len(np.unique(codes[:, g])) for g in range(c.groups))
        total += c.groups * c.num_codes
    return sse, var, l0, alive / total


def test_every_figure_matches_a_naive_computation():
    model = make_model()
    data = padded_data()
    ids, labels = data["input_ids"], data["labels"]
    valid = data["attention_mask"].reshape(-1).bool()
    r = standard_evaluation(model, data, batch_size=4)
    assert set(r["rows"]) == {*SITES, "all"}

    base = naive_logits(model, ids, [], {})
    ce_base = naive_ce(base, labels)
    # The site means over the non-padded tokens of the base model, for mean-ablation.
    acts0 = site_inputs(model, ids, [])
    means = {n: a[valid].double().mean(0).float() for n, a in acts0.items()}
    for row, on in [*[(s, [s]) for s in SITES], ("all", SITES)]:
        got = r["rows"][row]
        logits = naive_logits(model, ids, on)
        ce = naive_ce(logits, labels)
        ce_zero = naive_ce(naive_logits(model, ids, on, dict.fromkeys(on)), labels)
        ce_mean = naive_ce(naive_logits(model, ids, on, {n: means[n] for n in on}), labels)
        assert got["ce_loss"] == pytest.approx(ce, rel=1e-5), row
        assert got["ce_loss_base"] == pytest.approx(ce_base, rel=1e-5), row
        assert got["ce_loss_zero"] == pytest.approx(ce_zero, rel=1e-5), row
        assert got["ce_loss_mean"] == pytest.approx(ce_mean, rel=1e-5), row
        assert got["ce_loss_recovered_zero"] == pytest.approx(
            (ce_zero - ce) / (ce_zero - ce_base), rel=1e-3, abs=1e-3), row
        assert got["ce_loss_recovered_mean"] == pytest.approx(
            (ce_mean - ce) / (ce_mean - ce_base), rel=1e-3, abs=1e-3), row
        assert got["kl_div"] == pytest.approx(naive_kl(base, logits, labels), rel=1e-4), row
        acts = site_inputs(model, ids, on)
        sse, var, l0, alive = naive_activation_figures(
            model, {n: acts[n] for n in on}, valid)
        assert got["fvu"] == pytest.approx(sse / var, rel=1e-5), row
        assert got["explained_variance"] == pytest.approx(1 - sse / var, rel=1e-5), row
        assert got["l0"] == pytest.approx(l0), row
        assert got["alive_fraction"] == pytest.approx(alive), row
    # L0 of a plain top-k: groups * k (4 heads for attn_heads), summed over sites for all.
    assert [r["rows"][s]["l0"] for s in SITES] == [8, 8, 2, 2]
    assert r["rows"]["all"]["l0"] == 20
    assert r["base"]["loss"] == pytest.approx(ce_base, rel=1e-5)
    assert r["tokens"] == int((labels[:, 1:] != -100).sum())
    for site, h in r["code_density"].items():
        layer = model.site(site)
        assert sum(h["counts"]) + h["dead"] == h["codes"] == 16 * layer.config.groups
        assert h["dead"] == round((1 - r["rows"][site]["alive_fraction"]) * h["codes"])
        assert h["bin_edges"][-1] == 0 and h["bin_edges"][0] <= np.log10(1 / h["tokens"])
        assert h["tokens"] == int(valid.sum())


def test_identity_codebook_recovers_everything():
    """A codebook that returns its input (bypass, no LayerNorm): 100% recovered, KL 0,
    explained variance 1."""
    model = make_model(layernorm=False)
    for layer in model.sites.values():
        layer.bypass = True
    r = standard_evaluation(model, tokens(6, 16), batch_size=4)
    for row, got in r["rows"].items():
        assert got["ce_loss"] == pytest.approx(got["ce_loss_base"], rel=1e-6), row
        assert got["ce_loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4), row
        assert got["ce_loss_recovered_mean"] == pytest.approx(1.0, abs=1e-4), row
        assert got["kl_div"] == pytest.approx(0.0, abs=1e-7), row
        assert got["explained_variance"] == pytest.approx(1.0) and got["fvu"] == 0, row


def test_zero_and_mean_codebooks_recover_nothing():
    """A codebook whose codes are all zero is zero-ablation (0% against it); one whose codes
    are all the site's mean is mean-ablation (0% against that)."""
    model = make_model(layernorm=False, similarity="inner")
    ids = tokens(6, 16)
    for layer in model.sites.values():
        torch.nn.init.zeros_(layer.codebook)
    r = standard_evaluation(model, ids, batch_size=4)
    for row, got in r["rows"].items():
        assert got["ce_loss"] == got["ce_loss_zero"], row
        assert got["ce_loss_recovered_zero"] == 0.0, row
        assert got["fvu"] >= 1 and got["explained_variance"] <= 0, row

    acts = site_inputs(model, ids, [])
    with torch.no_grad():
        for name, layer in model.sites.items():
            mean = acts[name].double().mean(0).float()
            layer.codebook.copy_(mean.view(layer.config.groups, 1, -1).expand_as(layer.codebook))
    r = standard_evaluation(model, ids, batch_size=4)
    for row, got in r["rows"].items():
        assert got["ce_loss"] == pytest.approx(got["ce_loss_mean"], rel=1e-6), row
        assert got["ce_loss_recovered_mean"] == pytest.approx(0.0, abs=1e-3), row


def test_model_is_left_as_found():
    model = make_model()
    model.train()
    model.disable_codebooks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = dict(model.codebooks.items())
    standard_evaluation(model, tokens(6, 16), batch_size=4)
    assert model.training and not model.enabled
    assert dict(model.codebooks.items()) == layers  # the very same modules
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_too_small_evaluation_sets_get_one_line():
    model = make_model()
    with pytest.raises(CodebookError, match=r"layers.0.attn_heads: 4 tokens .* at least 8"):
        standard_evaluation(model, tokens(1, 4))
    with pytest.raises(CodebookError, match="at least 2 tokens"):
        standard_evaluation(model, tokens(4, 1))
    ids = tokens(4, 16)
    with pytest.raises(CodebookError, match="no token has a label"):
        standard_evaluation(model, {"input_ids": ids, "labels": torch.full_like(ids, -100)})


def test_evaluate_codebooks_table_logs_and_plot(tmp_path):
    model = make_model()
    m = evaluate_codebooks(model, padded_data(), batch_size=4)
    assert set(m["standard"]) == {*SITES, "all"}
    for row in m["standard"].values():
        assert set(KEYS) <= set(row)
    assert m["with_codebooks"]["loss"] == m["standard"]["all"]["ce_loss"]
    assert m["without_codebooks"]["loss"] == m["standard"]["all"]["ce_loss_base"]
    table = format_table(m)
    assert "| all |" in table and "CE rec. (zero)" in table
    assert sum(line.startswith("| layers.") for line in table.splitlines()) == len(SITES)
    # eval_metrics.json is written with sorted keys: the table still ends with all.
    again = format_table(json.loads(json.dumps(m, sort_keys=True))).splitlines()
    assert again[-1].startswith("| all |") and again[-5].startswith("| layers.0.attn_heads |")
    flat = flat_metrics(m)
    assert flat["eval_standard/all/kl_div"] == m["standard"]["all"]["kl_div"]
    write_code_density_plot(m["code_density"], tmp_path / "density.png")
    assert (tmp_path / "density.png").read_bytes()[:4] == b"\x89PNG"


def test_all_row_alone_is_the_same_all_row():
    """per_site=False (evaluations during training) measures only all, identically."""
    model = make_model()
    data = padded_data()
    full = standard_evaluation(model, data, batch_size=4)
    cheap = standard_evaluation(model, data, batch_size=4, per_site=False)
    assert set(cheap["rows"]) == {"all"} and cheap["rows"]["all"] == full["rows"]["all"]
    assert cheap["sites_together"] == full["sites_together"]
    assert set(cheap["code_density"]) == set(SITES)
