"""CodebookLayer against a naive full-matrix implementation written here, plus its features."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from codebook_features import CodebookConfig, CodebookError, CodebookLayer

# --------------------------------------------------------------------------- naive reference


def naive_snap(layer: CodebookLayer, a: torch.Tensor, ablate: dict | None = None):
    """Full similarity matrix, explicit one-hot combine, autograd for every gradient.

    Returns (output with straight-through gradient, reconstruction term (lambda = 1),
    codes (N, G, k)). The reconstruction term is the paper's (sum over the site's features,
    mean over tokens) or, with ``mse_reduction="mean"``, the per-element mean; a
    ``commitment_coeff`` pulls the input toward its codes; ``codes_lm_grad=False`` keeps the
    downstream gradient off the codes.
    """
    c = layer.config
    dg = c.group_dim
    if layer.ln is None:
        x = a
    elif c.layernorm_scope == "group":  # one LayerNorm per group's slice, written out
        w, b = layer.ln.weight, layer.ln.bias
        x = torch.cat([F.layer_norm(a[..., g * dg:(g + 1) * dg], (dg,), w[g * dg:(g + 1) * dg],
                                    b[g * dg:(g + 1) * dg]) for g in range(c.groups)], -1)
    else:
        x = F.layer_norm(a, (c.dim,), layer.ln.weight, layer.ln.bias)
    n = x.reshape(-1, c.dim).shape[0]
    xg = x.reshape(n, c.groups, c.group_dim)
    ys, all_codes = [], []
    for g in range(c.groups):
        book = layer.codebook[g]
        xs = xg[:, g]
        if c.similarity == "cosine":
            sim = (xs / xs.norm(dim=-1, keepdim=True)) @ (book / book.norm(dim=-1, keepdim=True)).T
        elif c.similarity == "inner":
            sim = xs @ book.T
        else:
            sim = -torch.cdist(xs, book).pow(2)
        codes = sim.detach().topk(c.k, dim=-1).indices
        onehot = torch.zeros(n, c.num_codes, dtype=a.dtype)
        w = 1.0 / c.k if c.combine == "mean" else 1.0
        for i in range(n):
            for j in range(c.k):
                code = int(codes[i, j])
                if ablate and code in ablate.get(g, ()):
                    continue
                onehot[i, code] += w
        ys.append(onehot @ book)
        all_codes.append(codes)
    y = torch.stack(ys, 1)
    out = (y if c.codes_lm_grad else y.detach()) + xg - xg.detach()
    sq = (y - xg.detach()).pow(2).sum()
    mse = sq / n if c.mse_reduction == "sum" else sq / xg.numel()
    commit = (xg - y.detach()).pow(2).sum()  # the commitment term: reaches x only
    return out.reshape(a.shape), mse, torch.stack(all_codes, 1), commit


def make_layer(**kw) -> CodebookLayer:
    torch.manual_seed(kw.pop("seed", 0))
    cfg = dict(dim=24, num_codes=40, k=3, groups=1, dead_code_window=5)
    cfg.update(kw)
    layer = CodebookLayer(CodebookConfig(**cfg)).double()
    with torch.no_grad():  # non-trivial affine so its gradients are tested
        if layer.ln is not None:
            layer.ln.weight.uniform_(0.5, 1.5)
            layer.ln.bias.uniform_(-0.2, 0.2)
    return layer


def sorted_codes(codes: torch.Tensor) -> torch.Tensor:
    return codes.sort(-1).values


# ------------------------------------------------------------------- forward and backward


@pytest.mark.parametrize("similarity", ["cosine", "inner", "euclidean"])
@pytest.mark.parametrize("combine", ["mean", "sum"])
@pytest.mark.parametrize("groups,k", [(1, 1), (1, 3), (4, 2)])
def test_matches_naive(similarity, combine, groups, k):
    _check_naive(dict(similarity=similarity, combine=combine, groups=groups, k=k))


@pytest.mark.parametrize("settings", [
    dict(layernorm_scope="site"), dict(mse_reduction="mean"),
    dict(commitment_coeff=0.3), dict(commitment_coeff=0.25, codes_lm_grad=False),
    dict(mse_coeff=0.0, commitment_coeff=0.5), dict(codes_lm_grad=False, k=1, combine="sum"),
])
@pytest.mark.parametrize("groups", [1, 4])
def test_settings_match_naive(settings, groups):
    """Each setting of the authors' code (their LayerNorm per group or ours per site, the
    paper's lambda or the per-element one, commitment, vqvae) against the naive layer."""
    _check_naive({"k": 2, "groups": groups, **settings})


def _check_naive(settings: dict) -> None:
    groups, k = settings["groups"], settings["k"]
    lam = settings.setdefault("mse_coeff", 0.7)
    layer = make_layer(**settings)
    beta = layer.config.commitment_coeff
    a = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 9, 24, dtype=torch.float64)

    out = layer(a)
    (out * r).sum().backward()
    got = [a.grad.clone(), layer.codebook.grad.clone(), layer.ln.weight.grad.clone(),
           layer.ln.bias.grad.clone()]
    codes = layer.last_codes.reshape(-1, groups, k)

    a.grad = None
    layer.zero_grad()
    ref_out, mse, ref_codes, commit = naive_snap(layer, a)
    ((ref_out * r).sum() + lam * mse + beta * commit).backward()
    want = [a.grad, layer.codebook.grad, layer.ln.weight.grad, layer.ln.bias.grad]

    assert torch.equal(sorted_codes(codes), sorted_codes(ref_codes))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(layer.last_mse, mse.detach())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    # only chosen codes receive gradient
    chosen = torch.zeros(groups, 40, dtype=torch.bool)
    for g in range(groups):
        chosen[g, codes[:, g].reshape(-1)] = True
    assert (layer.codebook.grad.abs().sum(-1) > 0).eq(chosen).all()


def test_scores_are_true_similarities():
    layer = make_layer(k=2)
    a = torch.randn(5, 24, dtype=torch.float64)
    layer(a)
    x = layer.normalize(a)
    best = layer.codebook[0, layer.last_codes[:, 0, 0]]
    torch.testing.assert_close(layer.last_scores[:, 0, 0], F.cosine_similarity(x, best, dim=-1))


def test_chunked_equals_unchunked_and_bounded():
    torch.manual_seed(1)
    n, c = 512, 1000
    big = CodebookLayer(dim=8, num_codes=c, k=2, chunk_mib=1024)
    small = CodebookLayer(dim=8, num_codes=c, k=2, chunk_mib=0.2)  # 52 rows per chunk
    small.load_state_dict(big.state_dict())
    a = torch.randn(n, 8)
    ya = big(a.clone().requires_grad_())
    with torch.profiler.profile(record_shapes=True) as prof:
        a2 = a.clone().requires_grad_()
        yb = small(a2)
        yb.sum().backward()
    assert torch.equal(big.last_codes, small.last_codes)
    torch.testing.assert_close(ya, yb)
    # Neither the chunked forward nor the backward ever handles an N x C tensor.
    biggest = max((torch.Size(s).numel() for e in prof.events() for s in e.input_shapes if s),
                  default=0)
    assert biggest < n * c / 4, biggest


def test_grouped_equals_separate_layers():
    """A grouped layer is G separate layers on the slices, each with its own LayerNorm and
    the same lambda: the authors' GroupCodebookLayer (their per-group MSE terms add up to the
    paper's sum over the whole width)."""
    g = 4
    grouped = make_layer(groups=g, k=2)
    parts = [make_layer(dim=6, groups=1, k=2, seed=i) for i in range(g)]
    with torch.no_grad():
        for i, p in enumerate(parts):
            p.codebook.copy_(grouped.codebook[i : i + 1])
            p.ln.weight.copy_(grouped.ln.weight[6 * i : 6 * (i + 1)])
            p.ln.bias.copy_(grouped.ln.bias[6 * i : 6 * (i + 1)])
    a = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    out = grouped(a)
    out.pow(2).sum().backward()
    a_sep = a.detach().clone().requires_grad_()
    outs = [p(a_sep[..., 6 * i : 6 * (i + 1)]) for i, p in enumerate(parts)]
    torch.cat(outs, -1).pow(2).sum().backward()
    torch.testing.assert_close(out, torch.cat(outs, -1))
    for i, p in enumerate(parts):
        torch.testing.assert_close(grouped.last_codes[..., i, :], p.last_codes[..., 0, :])
        torch.testing.assert_close(grouped.codebook.grad[i], p.codebook.grad[0])
        torch.testing.assert_close(grouped.ln.weight.grad[6 * i : 6 * (i + 1)], p.ln.weight.grad)
    torch.testing.assert_close(a.grad, a_sep.grad)


# --------------------------------------------------------------------------- statistics


def test_statistics_match_naive():
    layer = make_layer(groups=2, k=2)
    layer.train()
    batches = [torch.randn(10, 24, dtype=torch.float64) for _ in range(3)]
    codes, xs, ys = [], [], []
    for b in batches:
        y = layer(b)
        codes.append(layer.last_codes.reshape(-1, 2, 2))
        xs.append(layer.normalize(b).detach())
        ys.append(y.detach())
    s = layer.stats()
    allc = torch.cat(codes)
    counts = torch.zeros(2, 40)
    for row in allc:
        for g in range(2):
            for code in row[g]:
                counts[g, code] += 1
    assert torch.equal(layer.code_counts.float(), counts)
    torch.testing.assert_close(s.activation_frequency, counts / 30)
    ent = []
    for g in range(2):
        p = counts[g][counts[g] > 0] / counts[g].sum()
        ent.append(float(-(p * p.log()).sum()))
    assert s.usage_entropy == pytest.approx(sum(ent) / 2)
    x, y = torch.cat(xs), torch.cat(ys)
    assert s.mse == pytest.approx(float((y - x).pow(2).mean()))
    assert s.fvu == pytest.approx(float((y - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()))
    assert s.tokens == 30 and s.active_codes == int((counts > 0).sum())


def test_eval_mode_does_not_count():
    layer = make_layer().eval()
    layer(torch.randn(4, 24, dtype=torch.float64))
    assert int(layer.code_counts.sum()) == 0 and int(layer.step) == 0


def test_dead_codes_and_replacement():
    layer = make_layer(groups=2, k=1, dead_code_window=3)
    layer.train()
    fixed = torch.randn(6, 24, dtype=torch.float64)
    for _ in range(2):
        layer(fixed)
    assert not layer.dead_codes().any()  # window not yet passed
    for _ in range(2):
        layer(fixed)
    used = torch.zeros(2, 40, dtype=torch.bool)
    for g in range(2):
        used[g, layer.last_codes[:, g, 0]] = True
    assert torch.equal(layer.dead_codes(), ~used)
    before = layer.codebook.detach().clone()
    snapshot = {k: v.clone() for k, v in layer.state_dict().items()}
    inputs = layer.normalize(fixed).detach().reshape(6, 2, 12)
    n = layer.replace_dead_codes(generator=torch.Generator().manual_seed(0), noise=0.0)
    assert n == int((~used).sum())
    assert not layer.dead_codes().any()
    after = layer.codebook.detach()
    assert torch.equal(after[used], before[used])  # live codes untouched
    for g in range(2):  # each replaced code is one of that group's recent inputs
        for code in (~used[g]).nonzero().flatten():
            assert (inputs[:, g] - after[g, code]).abs().amax(-1).min() < 1e-12
    # Same generator, same result: what every process of a distributed run relies on.
    twin = make_layer(groups=2, k=1, dead_code_window=3)
    twin.load_state_dict(snapshot)
    twin.replace_dead_codes(inputs=inputs, generator=torch.Generator().manual_seed(0), noise=0.0)
    torch.testing.assert_close(twin.codebook, layer.codebook)


def test_replace_needs_inputs():
    with pytest.raises(CodebookError, match="no recent inputs"):
        make_layer().replace_dead_codes()


@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
def test_kmeans_init_grouped(similarity):
    torch.manual_seed(0)
    groups, codes, dg = 2, 8, 6
    centres = torch.randn(groups, codes, dg) * 4
    labels = torch.randint(codes, (2000, groups))
    acts = torch.stack([centres[g][labels[:, g]] for g in range(groups)], 1)
    acts = (acts + 0.05 * torch.randn_like(acts)).reshape(2000, groups * dg)
    layer = CodebookLayer(dim=groups * dg, num_codes=codes, k=1, groups=groups,
                          similarity=similarity, layernorm=False)
    layer(acts)
    mse_random = float(layer.last_mse)
    layer.kmeans_init(acts, iters=25, nredo=20)
    layer(acts)
    assert float(layer.last_mse) < 0.01 * mse_random
    # Every group's codes are the means of the inputs assigned to them (a k-means fixed point).
    x = acts.reshape(2000, groups, dg)
    for g in range(groups):
        assigned = layer.last_codes[:, g, 0]
        for code in range(codes):
            members = x[assigned == code, g]
            if len(members):
                torch.testing.assert_close(layer.codebook[g, code].detach(), members.mean(0))


def test_kmeans_needs_enough_points():
    with pytest.raises(CodebookError, match="at least num_codes"):
        make_layer().float().kmeans_init(torch.randn(10, 24))


# ------------------------------------------------------------------------ interventions


def test_replace_append_at_positions():
    layer = make_layer(k=2, combine="mean")
    a = torch.randn(2, 5, 24, dtype=torch.float64)
    with torch.no_grad():
        base = layer(a)
        orig = layer.last_codes.clone()
        layer.replace_code(7, slot=-1, positions=[1, 3])
        out = layer(a)
    codes = layer.last_codes
    assert (codes[:, [1, 3], 0, 1] == 7).all()
    assert torch.equal(codes[:, [0, 2, 4]], orig[:, [0, 2, 4]])
    assert torch.equal(codes[..., 0], orig[..., 0])
    book = layer.codebook.detach()[0]
    torch.testing.assert_close(out[:, 1], (book[orig[:, 1, 0, 0]] + book[7]) / 2)
    torch.testing.assert_close(out[:, 0], base[:, 0])

    layer.clear_interventions()
    layer.append_code([5, 9], positions=[-1])
    with torch.no_grad():
        out = layer(a)
    assert layer.last_codes.shape[-1] == 4
    assert torch.equal(layer.last_codes[:, 4, 0, 2:], torch.tensor([[5, 9], [5, 9]]))
    want = (book[orig[:, 4, 0, 0]] + book[orig[:, 4, 0, 1]] + book[5] + book[9]) / 4
    torch.testing.assert_close(out[:, 4], want)
    torch.testing.assert_close(out[:, :4], base[:, :4])


def test_ablate_matches_naive():
    layer = make_layer(groups=2, k=3)
    a = torch.randn(6, 24, dtype=torch.float64)
    with torch.no_grad():
        layer(a)
    victims = layer.last_codes[0, 1, :2].tolist()
    layer.ablate_codes(victims, group=1)
    with torch.no_grad():
        out = layer(a)
        ref, _, _, _ = naive_snap(layer, a, ablate={1: set(victims)})
    torch.testing.assert_close(out, ref)


def test_bypass_returns_input_but_reads_codes():
    layer = make_layer()
    a = torch.randn(4, 24, dtype=torch.float64)
    layer.bypass = True
    assert torch.equal(layer(a), a)
    assert layer.last_codes.shape == (4, 1, 3)


@pytest.mark.parametrize("call,match", [
    (lambda l: l.replace_code(40), "do not exist"),
    (lambda l: l.append_code(3, group=1), "group 1 does not exist"),
    (lambda l: l.replace_code(1, slot=3), "slot 3"),
    (lambda l: l.ablate_codes([]), "do not exist"),
])
def test_bad_interventions(call, match):
    with pytest.raises(CodebookError, match=match):
        call(make_layer())


# ---------------------------------------------------------------------------- save/load


def test_save_load_round_trip(tmp_path):
    layer = make_layer(groups=2, k=2, similarity="euclidean").float().train()
    layer(torch.randn(8, 24))
    layer.save(tmp_path / "cb")
    back = CodebookLayer.load(tmp_path / "cb")
    assert back.config == layer.config
    for k, v in layer.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    a = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(a), layer.eval()(a), rtol=0, atol=0)


def test_load_rejects_mismatch(tmp_path):
    layer = make_layer().float()
    layer.save(tmp_path / "cb")
    cfg = json.loads((tmp_path / "cb" / "codebook_config.json").read_text())
    cfg["num_codes"] = 41
    (tmp_path / "cb" / "codebook_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CodebookError, match="'codebook' has shape"):
        CodebookLayer.load(tmp_path / "cb")
    cfg.update(num_codes=40, layernorm=False)
    (tmp_path / "cb" / "codebook_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CodebookError, match="unexpected"):
        CodebookLayer.load(tmp_path / "cb")
    cfg.update(layernorm=True, colour="red")
    (tmp_path / "cb" / "codebook_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CodebookError, match="unknown codebook config keys"):
        CodebookLayer.load(tmp_path / "cb")
    (tmp_path / "cb" / "codebook_config.json").write_text("{broken")
    with pytest.raises(CodebookError, match="not valid JSON"):
        CodebookLayer.load(tmp_path / "cb")


def test_load_rejects_corrupt_weights(tmp_path):
    make_layer().float().save(tmp_path / "cb")
    w = tmp_path / "cb" / "codebook.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CodebookError, match="corrupt"):
        CodebookLayer.load(tmp_path / "cb")


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,match", [
    (dict(k=0), "k=0 must be between 1 and num_codes"),
    (dict(k=41), "k=41 must be between 1 and num_codes=40"),
    (dict(groups=5), "groups=5 do not divide the width dim=24"),
    (dict(similarity="l1"), "unknown similarity"),
    (dict(combine="max"), "unknown combine"),
    (dict(num_codes=0), "num_codes must be a positive integer"),
])
def test_bad_settings(kw, match):
    with pytest.raises(CodebookError, match=match):
        CodebookConfig(dim=24, num_codes=kw.pop("num_codes", 40), **kw)


def test_wrong_width():
    with pytest.raises(CodebookError, match="has width 23, but the codebook expects width 24"):
        make_layer(name="layers.3.mlp")(torch.randn(2, 23, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_named(bad):
    layer = make_layer(name="layers.2.attn_heads")
    a = torch.randn(2, 3, 24, dtype=torch.float64)
    a[1, 2, 5] = bad
    with pytest.raises(CodebookError, match=r"layers\.2\.attn_heads: input contains NaN or inf"):
        layer(a)
    assert layer.last_codes is None  # no codes were emitted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_check_against_elementwise(dtype):
    """The sum-first finiteness check agrees with isfinite().all(), including inputs whose
    sum overflows although every element is finite, and +inf/-inf that would cancel."""
    from codebook_features.codebook import _all_finite

    big = torch.finfo(dtype).max
    cases = [torch.randn(64, 8), torch.full((64, 8), big), torch.tensor([big, big, -big])]
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(64, 8)
        t[3, 2] = bad
        cases.append(t)
    both = torch.randn(10)
    both[1], both[2] = float("inf"), -float("inf")
    cases.append(both)
    for t in cases:
        t = t.to(dtype)
        assert _all_finite(t) == bool(torch.isfinite(t).all())


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_counts_statistics_once(reentrant):
    """A checkpointed layer recomputes its forward in the backward; the statistics and the
    gradients must equal those of a plain forward."""
    from torch.utils.checkpoint import checkpoint

    plain, ckpt = make_layer(k=2).train(), make_layer(k=2).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(30, 24, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(xa).pow(2).sum().backward()
    checkpoint(ckpt, xb, use_reentrant=reentrant).pow(2).sum().backward()
    for name in ("code_counts", "tokens_seen", "step", "sse", "sum_x", "sum_x2"):
        assert torch.equal(getattr(plain, name), getattr(ckpt, name)), name
    assert torch.allclose(plain.codebook.grad, ckpt.codebook.grad)
    assert torch.allclose(xa.grad, xb.grad)
