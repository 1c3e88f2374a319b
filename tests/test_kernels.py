"""The compiled kernels (``codebook_features.kernels``) against naive torch formulations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codebook_features import kernels

needs_kernel = pytest.mark.skipif(not kernels.available(),
                                  reason="the compiled kernel does not run on this machine")


def naive_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best first, ties broken by the lower index: a stable sort of the negated values."""
    order = torch.sort(-s.long() if s.dtype == torch.int16 else -s, dim=-1, stable=True).indices
    idx = order[..., :k]
    return s.gather(-1, idx), idx


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.int16])
@pytest.mark.parametrize("c,k", [(1000, 1), (1000, 6), (10000, 8), (10000, 20), (999, 3),
                                 (50, 4), (300, 70), (4096, 1), (37, 37)])
def test_topk_rows_matches_naive(dtype, c, k):
    gen = torch.Generator().manual_seed(c + k)
    s = torch.randn(64, c, generator=gen)
    if dtype == torch.int16:  # bfloat16 bit patterns, as the screen passes them
        s = s.to(torch.bfloat16).view(torch.int16)
    v, i = kernels.topk_rows(s, k)
    rv, ri = naive_topk(s, k)
    assert torch.equal(v, rv) and torch.equal(i, ri)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.int16])
@pytest.mark.parametrize("k", [1, 3, 12])
def test_topk_rows_ties_take_the_lower_index(dtype, k):
    """Few distinct values (every row full of ties): best first, then lower index first."""
    gen = torch.Generator().manual_seed(k)
    s = torch.randint(-3, 4, (50, 2000), generator=gen).to(dtype)
    v, i = kernels.topk_rows(s, k)
    rv, ri = naive_topk(s, k)
    assert torch.equal(v, rv) and torch.equal(i, ri)


@needs_kernel
def test_topk_rows_strided_rows_and_outputs():
    """Rows of a (G, r, C) block sliced out of a larger buffer; outputs written in place."""
    big = torch.randn(3, 40, 1500)
    s = big[:, 5:25]  # row stride 1500 within a group, groups 60000 apart: not one view
    assert not kernels.supports(s)
    s = big[1, 5:25]  # evenly spaced rows
    assert kernels.supports(s)
    vals = torch.empty(20, 5)
    idx = torch.empty(20, 5, dtype=torch.long)
    kernels.topk_rows(s, 5, vals, idx)
    rv, ri = naive_topk(s, 5)
    assert torch.equal(vals, rv) and torch.equal(idx, ri)
    with pytest.raises(ValueError, match="between 1 and the row length"):
        kernels.topk_rows(s, 1501)


@needs_kernel
def test_bf16_keys_matches_torch():
    gen = torch.Generator().manual_seed(1)
    book = torch.randn(3, 500, 48, generator=gen) * 3
    for unit in (True, False):
        kbt = torch.empty(3, 48, 500, dtype=torch.bfloat16)
        scale, dk, kn = kernels.bf16_keys(book, unit, kbt)
        keys = book / book.norm(dim=-1, keepdim=True) if unit else book
        want = keys.to(torch.bfloat16)
        # bfloat16 rounding of (book * scale): equal, or one bfloat16 ulp off where the float32
        # product and torch's quotient straddle a rounding boundary.
        diff = (kbt.transpose(1, 2).float() - want.float()).abs()
        assert (diff <= want.float().abs() * 2**-7).all()
        assert (diff == 0).float().mean() > 0.99
        torch.testing.assert_close(scale, 1 / book.norm(dim=-1) if unit else torch.ones(3, 500))
        kd = (book * scale.unsqueeze(-1)).double()  # float32 keys, as the kernel forms them
        torch.testing.assert_close(kn.double(), kd.norm(dim=-1), rtol=1e-6, atol=0)
        kb = kbt.transpose(1, 2).double()
        torch.testing.assert_close(dk.double(), (kd - kb).norm(dim=-1), rtol=1e-5, atol=1e-9)


@needs_kernel
@pytest.mark.parametrize("similarity", ["cosine", "inner", "euclidean"])
@pytest.mark.parametrize("k", [1, 5])
def test_screen_rows_certified_codes_are_exact(similarity, k):
    """One block of the compiled screen: every token it certifies has the float64 top-k (up
    to float32 near-ties) and its exact ranking score; ~all tokens are certified here."""
    gen = torch.Generator().manual_seed(k)
    n, g, c, dg = 300, 2, 700, 64
    # Short codes, so that the k best ranking scores are positive for every similarity (the
    # Euclidean bias -|c|^2/2 is small): the screen cannot certify negative ones.
    book = 0.1 * torch.randn(g, c, dg, generator=gen)
    x = torch.randn(n, g, dg, generator=gen)
    kbt = torch.empty(g, dg, c, dtype=torch.bfloat16)
    scale, dk, kn = kernels.bf16_keys(book, similarity == "cosine", kbt)
    bias = -0.5 * kn * kn if similarity == "euclidean" else None
    codes = torch.full((n, g, k), -1, dtype=torch.long)
    scores = torch.empty(n, g, k)
    ok = torch.zeros(n, g, dtype=torch.uint8)
    norms = torch.empty(n, g)
    for gi in range(g):
        s = x[:, gi].to(torch.bfloat16) @ kbt[gi]
        if bias is not None:
            s = s + bias[gi].to(torch.bfloat16)
        kernels.screen_rows(s.view(torch.int16), 0, gi, x, book,
                            scale if similarity == "cosine" else None, bias, k,
                            float(kn[gi].max()) * 1.01, float(dk[gi].max()) * 1.01,
                            None if bias is None else float(bias[gi].abs().max()) * 1.01,
                            4, codes, scores, ok, norms)
    assert ok.float().mean() > 0.97
    torch.testing.assert_close(norms, x.norm(dim=-1))
    keys = book.double() * scale.double().unsqueeze(-1) if similarity == "cosine" else book
    exact = torch.einsum("ngd,gcd->ngc", x.double(), keys.double())
    if bias is not None:
        exact = exact + bias.double()
    ref_v, ref_i = exact.topk(k, -1)
    good = ok.bool()
    got = exact.gather(-1, codes.clamp_min(0))
    torch.testing.assert_close(got[good], ref_v[good], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.double()[good], ref_v[good], rtol=1e-5, atol=1e-5)
    same = (codes.sort(-1).values == ref_i.sort(-1).values).all(-1)[good].float().mean()
    assert same > 0.999


needs_amx = pytest.mark.skipif(not kernels.amx(), reason="AMX tiles not usable here")


def _untile(kb: torch.Tensor, c: int, dg: int) -> torch.Tensor:
    """AMX key tiles (G, ncb, nq, 512) back to (G, ncb * 16, nq * 32) keys, by their layout:
    within a tile, 16 pairs of dimensions by 16 codes by the pair."""
    g, ncb, nq, _ = kb.shape
    t = kb.view(g, ncb, nq, 16, 16, 2).permute(0, 1, 4, 2, 3, 5)
    return t.reshape(g, ncb * 16, nq * 32)


@needs_kernel
def test_amx_key_tiles_hold_the_transposed_keys():
    """The tiled layout holds the same bfloat16 keys as the transposed one, zero padding, and
    the same scale, rounding error and norms (C and dg not multiples of 16 and 32)."""
    gen = torch.Generator().manual_seed(2)
    g, c, dg = 2, 333, 50
    book = torch.randn(g, c, dg, generator=gen)
    for unit in (True, False):
        kbt = torch.empty(g, dg, c, dtype=torch.bfloat16)
        ref = kernels.bf16_keys(book, unit, kbt)
        kb = torch.full(kernels.amx_tiles(g, c, dg), 7.0, dtype=torch.bfloat16)  # no zeros
        got = kernels.bf16_keys(book, unit, kb, tiles=True)
        keys = _untile(kb, c, dg)
        assert torch.equal(keys[:, :c, :dg], kbt.transpose(1, 2))
        assert (keys[:, c:] == 0).all() and (keys[:, :, dg:] == 0).all()
        for a, b in zip(ref, got, strict=True):
            assert torch.equal(a, b)


def _amx_screen(x, book, k, similarity):
    g, c, dg = book.shape
    kb = torch.empty(kernels.amx_tiles(g, c, dg), dtype=torch.bfloat16)
    scale, dk, kn = kernels.bf16_keys(book, similarity == "cosine", kb, tiles=True)
    bias = -0.5 * kn * kn if similarity == "euclidean" else None
    n = x.shape[0]
    out = (torch.full((n, g, k), -1, dtype=torch.long), torch.empty(n, g, k),
           torch.zeros(n, g, dtype=torch.uint8), torch.empty(n, g))
    kernels.amx_screen(x, kb, book, scale if similarity == "cosine" else None, bias, k,
                       kn.amax(-1) * 1.01, dk.amax(-1) * 1.01,
                       None if bias is None else bias.abs().amax(-1) * 1.01, 4, *out)
    return (*out, scale)


@needs_amx
@pytest.mark.parametrize("similarity", ["cosine", "inner", "euclidean"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_amx_screen_certified_codes_are_exact(similarity, k):
    """The AMX screen: every token it certifies has the float64 top-k (up to float32
    near-ties) and its exact ranking score; ~all are certified, negative scores included.
    Tokens (301) not a multiple of 16, codes (700) not of 64, width (40) not of 32; two
    threads give what one gives."""
    gen = torch.Generator().manual_seed(k)
    n, g, c, dg = 301, 2, 700, 40
    book = torch.randn(g, c, dg, generator=gen)
    x = torch.randn(n, g, dg, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        codes, scores, ok, norms, scale = _amx_screen(x, book, k, similarity)
        torch.set_num_threads(2)
        again = _amx_screen(x, book, k, similarity)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip((codes, scores, ok, norms), again, strict=False):
        assert torch.equal(a, b)
    assert ok.float().mean() > 0.97
    torch.testing.assert_close(norms, x.norm(dim=-1))
    keys = book.double() * scale.double().unsqueeze(-1) if similarity == "cosine" else book
    exact = torch.einsum("ngd,gcd->ngc", x.double(), keys.double())
    if similarity == "euclidean":
        exact = exact - 0.5 * book.double().square().sum(-1)
    ref_v, ref_i = exact.topk(k, -1)
    good = ok.bool()
    torch.testing.assert_close(exact.gather(-1, codes.clamp_min(0))[good], ref_v[good],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.double()[good], ref_v[good], rtol=1e-5, atol=1e-5)
    same = (codes.sort(-1).values == ref_i.sort(-1).values).all(-1)[good].float().mean()
    assert same > 0.999


@needs_amx
def test_amx_screen_refuses_uncertifiable_ties_and_bad_k():
    """Codes that all score alike overflow the re-score window: nothing is certified (the
    caller redoes them exactly). k above 16 is refused before the kernel runs."""
    book = torch.ones(1, 500, 32)
    x = torch.randn(40, 1, 32)
    ok = _amx_screen(x, book, 2, "inner")[2]
    assert not ok.any()
    with pytest.raises(ValueError, match="k <= min"):
        _amx_screen(x, book, 17, "inner")


@needs_kernel
def test_screen_window_overflow_is_redone(monkeypatch):
    """More near-equal codes than the screen's exact window holds (256): those tokens are
    handed back to exact search, and the answer is exact."""
    from codebook_features import snap

    calls: list[int] = []
    redo = snap.screen_kernel._redo
    monkeypatch.setattr(snap.screen_kernel, "_redo",  # where the compiled screen calls it
                        lambda x, *a: calls.append(len(x)) or redo(x, *a))
    gen = torch.Generator().manual_seed(8)
    centre = torch.randn(1, 1, 64, generator=gen)
    book = torch.cat([centre + 1e-5 * torch.randn(1, 600, 64, generator=gen),
                      torch.randn(1, 400, 64, generator=gen)], 1)
    x = centre.expand(50, 1, 64) + 1e-3 * torch.randn(50, 1, 64, generator=gen)
    res = snap.search(x, book, 2, "cosine", backend="bf16_screen")
    assert sum(calls) == 50
    ref = snap.search(x, book, 2, "cosine", backend="torch")
    torch.testing.assert_close(res.scores, ref.scores, rtol=1e-6, atol=1e-6)


def test_failed_build_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(RuntimeError, match="building topm.cpp failed"):
        kernels.build(tmp_path)
    assert not list(tmp_path.glob("*.so"))  # nothing half-written is left


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("CODEBOOK_FEATURES_KERNEL", "0")
    kernels._lib.cache_clear()
    try:
        assert not kernels.available()
        assert not kernels.supports(torch.zeros(4, 8))
    finally:
        monkeypatch.delenv("CODEBOOK_FEATURES_KERNEL")
        kernels._lib.cache_clear()


@needs_kernel
def test_build_is_cached_and_atomic(tmp_path):
    path = kernels.build(tmp_path)
    assert path.exists() and path.parent == tmp_path
    mtime = path.stat().st_mtime_ns
    assert kernels.build(tmp_path) == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporaries left


@needs_kernel
def test_search_with_kernel_equals_torch_only(monkeypatch):
    """The float32 torch search selects with the kernel; its codes equal the torch top-k's."""
    from codebook_features import snap

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 2, 32, generator=gen)
    book = F.normalize(torch.randn(2, 1000, 32, generator=gen), dim=-1)
    fast = snap.search(x, book, 3, "inner", chunk_mib=0.1, backend="torch")
    # float64 naive top-k: the same codes, best first, and their scores
    exact = torch.einsum("ngd,gcd->ngc", x.double(), book.double())
    ref_v, ref_i = naive_topk(exact, 3)
    assert torch.equal(fast.codes, ref_i)
    torch.testing.assert_close(fast.scores.double(), ref_v, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(kernels, "available", lambda: False)
    slow = snap.search(x, book, 3, "inner", chunk_mib=0.1, backend="torch")
    assert torch.equal(fast.codes, slow.codes) and torch.equal(fast.scores, slow.scores)


@needs_kernel
def test_rows_split_over_threads_give_the_same_answer():
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(1001, 700, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.topk_rows(s, 5)
        torch.set_num_threads(3)  # three parts: two on the pool, one here
        three = kernels.topk_rows(s, 5)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    assert torch.equal(one[1], naive_topk(s, 5)[1])


@needs_kernel
def test_row_kernels_match_torch():
    gen = torch.Generator().manual_seed(9)
    idx = torch.randint(300, (5000,), generator=gen)
    a, b = torch.randn(2, 700, 33, generator=gen)
    want = (a.double() - b.double()).pow(2).sum()
    torch.testing.assert_close(torch.tensor(kernels.sq_dist(a, b), dtype=torch.float64), want,
                               rtol=1e-6, atol=0)
    gy, y, x = torch.randn(3, 5000, 24, generator=gen)
    flat = torch.randint(300, (5000, 3), generator=gen)
    for kk, a in ((1, 0.0), (1, 0.4), (3, 0.4)):
        grad = torch.zeros(300, 24)
        row = 0.5 * (gy.double() + a * (y.double() - x.double()))  # naive: every slot
        want = torch.zeros(300, 24, dtype=torch.float64)
        for j in range(kk):
            want = want.index_add(0, flat[:, j], row)
        kernels.scatter_slots(grad, flat[:, :kk].contiguous(), gy, y, x, 0.5, a)
        torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="out of range"):
        kernels.scatter_slots(torch.zeros(300, 24), (idx + 1).view(-1, 1), gy, gy, gy, 1.0, 0.0)
    with pytest.raises(IndexError, match="out of range"):
        kernels.scatter_slots(torch.zeros(300, 24), (idx - 1).view(-1, 1), gy, gy, gy, 1.0, 0.0)


@needs_kernel
@pytest.mark.parametrize("k,combine", [(1, "mean"), (3, "mean"), (2, "sum")])
def test_layer_float32_matches_torch_only(monkeypatch, k, combine):
    """The layer (MSE, codebook gradient) with the row kernels equals the torch-only path in
    float32."""
    from codebook_features import CodebookLayer

    def run():
        torch.manual_seed(0)
        layer = CodebookLayer(dim=64, num_codes=300, k=k, combine=combine, groups=2,
                              mse_coeff=0.7)
        a = torch.randn(2, 500, 64, requires_grad=True)
        out = layer(a)
        (out * torch.linspace(-1, 1, 64)).sum().backward()
        return out, layer.last_mse, layer.codebook.grad, a.grad, layer.stats().fvu

    fast = run()
    monkeypatch.setattr(kernels, "available", lambda: False)
    slow = run()
    for f, s in zip(fast, slow, strict=True):
        torch.testing.assert_close(torch.as_tensor(f), torch.as_tensor(s), rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("k,combine", [(1, "mean"), (3, "mean"), (2, "sum")])
def test_layer_float32_with_kernels_matches_naive_float64(k, combine):
    """The float32 layer, kernels on (search, MSE, codebook gradient), against the naive
    full-matrix layer of tests/test_codebook.py run in float64 on the same weights."""
    import copy

    from test_codebook import naive_snap

    from codebook_features import CodebookLayer

    torch.manual_seed(0)
    layer = CodebookLayer(dim=64, num_codes=300, k=k, combine=combine, groups=2, mse_coeff=0.7)
    with torch.no_grad():
        layer.ln.weight.uniform_(0.5, 1.5)
        layer.ln.bias.uniform_(-0.2, 0.2)
    ref = copy.deepcopy(layer).double()
    a = torch.randn(2, 500, 64, requires_grad=True)
    r = torch.linspace(-1, 1, 64)
    out = layer(a)
    (out * r).sum().backward()

    a64 = a.detach().double().requires_grad_()
    res = naive_snap(ref, a64)
    ref_out, mse, ref_codes = res[0], res[1], res[2]
    beta = getattr(ref.config, "commitment_coeff", 0.0)
    loss = (ref_out * r.double()).sum() + 0.7 * mse
    if beta:
        loss = loss + beta * res[3]
    loss.backward()
    codes = layer.last_codes.reshape(-1, 2, k)
    assert torch.equal(codes.sort(-1).values, ref_codes.sort(-1).values)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.last_mse.double(), mse.detach(), rtol=1e-5, atol=0)
    for got, want in ((a.grad, a64.grad), (layer.codebook.grad, ref.codebook.grad),
                      (layer.ln.weight.grad, ref.ln.weight.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
