"""Every search backend against a naive full-matrix search; approximate and bf16 search."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codebook_features import CodebookError, CodebookLayer, kernels, snap

BACKENDS = ["torch", "faiss", "auto", "bf16_screen", "torch_bf16"]


def naive_search(x: torch.Tensor, book: torch.Tensor, k: int, similarity: str):
    """Full (N, C) similarity per group in float64, plain topk: (codes, scores, full sims)."""
    x, book = x.double(), book.double()
    if similarity == "cosine":
        sim = torch.einsum("ngd,gcd->ngc", F.normalize(x, dim=-1), F.normalize(book, dim=-1))
    elif similarity == "inner":
        sim = torch.einsum("ngd,gcd->ngc", x, book)
    else:
        sim = -(x.unsqueeze(2) - book.unsqueeze(0)).pow(2).sum(-1)
    v, i = sim.topk(k, -1)
    return i, v, sim


def assert_exact(codes, scores, x, book, k, similarity, atol=1e-4, agree=0.99):
    """Codes are the exact top-k up to near-ties; scores are the codes' true similarities."""
    ref_codes, ref_scores, sim = naive_search(x, book, k, similarity)
    assert codes.shape == ref_codes.shape and codes.dtype == torch.long
    # The true similarity of every chosen code matches the returned score ...
    got = sim.gather(-1, codes)
    torch.testing.assert_close(scores.double(), got, atol=atol, rtol=1e-4)
    # ... and the chosen codes' similarities are the k best (equal codes except near-ties).
    torch.testing.assert_close(got.sort(-1, descending=True).values, ref_scores, atol=atol,
                               rtol=1e-4)
    same = (codes.sort(-1).values == ref_codes.sort(-1).values).all(-1).float().mean()
    assert same > agree, float(same)


def problem(n=300, g=2, c=500, dg=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, g, dg, generator=gen, dtype=dtype)
    book = torch.randn(g, c, dg, generator=gen, dtype=dtype)
    return x, book


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", ["cosine", "inner", "euclidean"])
@pytest.mark.parametrize("g,c,k", [(1, 500, 1), (1, 500, 8), (3, 1000, 1), (3, 1000, 5),
                                   (2, 97, 3)])
def test_backend_matches_naive(backend, similarity, g, c, k):
    x, book = problem(g=g, c=c)
    res = snap.search(x, book, k, similarity, chunk_mib=0.05, backend=backend)
    if backend == "torch_bf16":  # approximate: exact scores, codes agree almost everywhere
        _, _, sim = naive_search(x, book, k, similarity)
        torch.testing.assert_close(res.scores.double(), sim.gather(-1, res.codes), atol=1e-4,
                                   rtol=1e-4)
        ref = naive_search(x, book, k, similarity)[0]
        agree = (res.codes.sort(-1).values == ref.sort(-1).values).all(-1).float().mean()
        assert agree > 0.97, float(agree)
        return
    assert_exact(res.codes, res.scores, x, book, k, similarity)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_float64_exact(backend):
    x, book = problem(dtype=torch.float64)
    res = snap.search(x, book, 4, "cosine", chunk_mib=0.05, backend=backend)
    assert res.scores.dtype == torch.float64
    ref, ref_scores, _ = naive_search(x, book, 4, "cosine")
    assert torch.equal(res.codes, ref)
    torch.testing.assert_close(res.scores, ref_scores)


@pytest.mark.parametrize("kernel", [True, False])
def test_auto_resolution(monkeypatch, kernel):
    monkeypatch.setattr(kernels, "available", lambda: kernel)
    cpu32 = torch.zeros(1, 1, 4)
    wide, narrow, thin = (torch.zeros(1, 4096, 256), torch.zeros(1, 4096, 128),
                          torch.zeros(4, 1000, 32))
    for vendor, flags, book, want in [
            ("GenuineIntel", {"amx_bf16"}, wide, "bf16_screen"),
            ("GenuineIntel", {"amx_bf16"}, narrow, "bf16_screen" if kernel else "torch"),
            ("GenuineIntel", {"amx_bf16"}, thin, "bf16_screen" if kernel else "torch"),
            ("GenuineIntel", {"amx_bf16"}, torch.zeros(8, 1000, 16), "torch"),
            ("GenuineIntel", set(), wide, "torch"),
            ("AuthenticAMD", set(), wide, "faiss" if snap.faiss_available() else "torch")]:
        monkeypatch.setattr(snap.backends, "_cpu_flags",  # where resolve_backend reads it
                            lambda v=vendor, f=flags: (v, frozenset(f)))
        assert snap.resolve_backend("auto", cpu32, book) == want, (vendor, flags, book.shape)
        assert snap.resolve_backend("auto", cpu32.double(), book) == "torch"
    with pytest.raises(ValueError, match="unknown search backend"):
        snap.resolve_backend("gpu", cpu32)
    with pytest.raises(ValueError, match="float32 CPU"):
        snap.search(cpu32.double(), torch.zeros(1, 3, 4, dtype=torch.float64), 1,
                    backend="faiss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: never the kernel
@pytest.mark.parametrize("c,k", [(10000, 8), (1000, 1), (1000, 3), (4096, 16), (997, 2)])
def test_topk_last_exact(c, k, dtype):
    gen = torch.Generator().manual_seed(c + k)
    s = torch.randn(2, 33, c, generator=gen, dtype=dtype)
    bs = snap.block_size(c, k)
    if dtype == torch.float64:
        assert not kernels.supports(s)  # the block-max path (bs) or torch's topk
    v, i = snap.topk_last(s, k, bs)
    rv, ri = s.topk(k, -1)
    assert torch.equal(i, ri) and torch.equal(v, rv)


def test_block_size_rules():
    assert snap.block_size(10000, 8) == 100
    assert snap.block_size(1000, 1) == 100
    assert snap.block_size(997, 1) is None  # prime: plain top-k
    assert snap.block_size(1000, 3) is None  # the k candidate blocks would hold > 1/4
    assert snap.block_size(10000, 200) is None


def test_torch_backend_chunked_bounded():
    """The torch backend never handles an N x C tensor, forward or backward."""
    torch.manual_seed(1)
    n, c = 512, 1000
    layer = CodebookLayer(dim=8, num_codes=c, k=2, chunk_mib=0.2, search_backend="torch")
    a = torch.randn(n, 8, requires_grad=True)
    with torch.profiler.profile(record_shapes=True) as prof:
        layer(a).sum().backward()
    biggest = max((torch.Size(s).numel() for e in prof.events() for s in e.input_shapes if s),
                  default=0)
    assert biggest < n * c / 4, biggest
    with torch.no_grad():
        ref = naive_search(layer.normalize(a).view(n, 1, 8), layer.codebook, 2, "cosine")[0]
    assert torch.equal(layer.last_codes.sort(-1).values, ref.sort(-1).values)


@pytest.mark.parametrize("k", [1, 4])
def test_layer_backends_same_outputs_and_gradients(k):
    """faiss and torch backends give the same codes, outputs and gradients in a layer."""
    torch.manual_seed(0)
    a = torch.randn(2, 50, 32)
    r = torch.randn(2, 50, 32)
    results = []
    for backend in ["torch", "faiss"]:
        torch.manual_seed(3)
        layer = CodebookLayer(dim=32, num_codes=300, k=k, groups=2, search_backend=backend)
        ai = a.clone().requires_grad_()
        out = layer(ai)
        (out * r).sum().backward()
        results.append((layer.last_codes, out, ai.grad, layer.codebook.grad, layer.ln.weight.grad,
                        layer.last_scores))
    for t, f in zip(*results, strict=True):
        torch.testing.assert_close(t, f, atol=1e-5, rtol=1e-5)


def test_bad_backend_setting():
    with pytest.raises(CodebookError, match="unknown search_backend"):
        CodebookLayer(dim=8, num_codes=4, search_backend="gpu")


# ------------------------------------------------------------------ approximate search


def clustered(n=2000, g=2, c=400, dg=16, seed=0):
    """Codes in well-separated clusters, inputs near random codes: the recall-friendly case."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(g, 20, dg, generator=gen) * 3
    book = centres.repeat_interleave(c // 20, 1) + 0.5 * torch.randn(g, c, dg, generator=gen)
    pick = torch.randint(c, (n, g), generator=gen)
    x = book[torch.arange(g), pick] + 0.1 * torch.randn(n, g, dg, generator=gen)
    return x, book


def recall(codes: torch.Tensor, exact: torch.Tensor) -> float:
    hits = (codes.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).float()
    return float(hits.mean())


@pytest.mark.parametrize("kind,params", [("hnsw", {}), ("ivf", {"nprobe": 4})])
@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
def test_approximate_recall(kind, params, similarity):
    pytest.importorskip("faiss")
    x, book = clustered()
    k = 4
    index = snap.ApproximateIndex(kind, similarity, **params)
    res = index.search(x, book, k)
    exact = snap.search(x, book, k, similarity, backend="torch")
    assert recall(res.codes, exact.codes) > 0.9
    _, _, sim = naive_search(x, book, k, similarity)
    torch.testing.assert_close(res.scores.double(), sim.gather(-1, res.codes), atol=1e-4,
                               rtol=1e-4)


def test_approximate_only_in_eval_and_rebuilt_on_change():
    pytest.importorskip("faiss")
    x, book = clustered(g=1, dg=16)
    layer = CodebookLayer(dim=16, num_codes=400, k=2, layernorm=False, similarity="cosine")
    with torch.no_grad():
        layer.codebook.copy_(book)
    layer.set_approximate("hnsw", ef_search=16)
    a = x.view(-1, 16)
    # Training mode ignores the approximation: the exact codes, and no index is built.
    layer.train()
    layer(a)
    exact = snap.search(a.view(-1, 1, 16), book, 2, "cosine", backend="torch").codes
    assert torch.equal(layer.last_codes, exact)
    assert layer.approximate._tag is None
    layer.eval()
    with torch.no_grad():
        layer(a)
    assert layer.approximate._tag is not None
    assert recall(layer.last_codes, exact) > 0.9
    # A changed codebook (in place, as an optimizer step does) rebuilds the index.
    with torch.no_grad():
        layer.codebook[0, :200] *= -1
    with torch.no_grad():
        layer(a)
    exact2 = snap.search(a.view(-1, 1, 16), layer.codebook.detach(), 2, "cosine").codes
    assert recall(layer.last_codes, exact2) > 0.9
    layer.set_approximate(None)
    with torch.no_grad():
        layer(a)
    assert torch.equal(layer.last_codes, exact2)
    with pytest.raises(CodebookError, match="unknown approximate search"):
        layer.set_approximate("lsh")


def test_approximate_missing_results_fall_back_to_exact():
    pytest.importorskip("faiss")
    x, book = clustered(g=1, c=400)
    # One IVF list probed and k larger than some lists: rows with missing codes are exact.
    index = snap.ApproximateIndex("ivf", "inner", nlist=10, nprobe=1)
    x = x[:200]
    res = index.search(x, book, 60)
    # The rows the index alone leaves short (FAISS pads them with -1) ...
    raw = index._indexes[0].search(x[:, 0].contiguous().numpy(), 60)[1]
    short = torch.from_numpy((raw < 0).any(-1))
    assert 0 < int(short.sum()) < 200, "the case under test must occur, and not everywhere"
    # ... are the exact top-k (float64 naive search), scores included; the others are the
    # index's own answer.
    assert_exact(res.codes[short], res.scores[short], x[short], book, 60, "inner", agree=0.999)
    assert torch.equal(res.codes[~short, 0], torch.from_numpy(raw[~short.numpy()]))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_workspace_reuse_across_shapes(backend):
    """The layer's reusable buffers give exact results as the token count changes."""
    torch.manual_seed(0)
    layer = CodebookLayer(dim=24, num_codes=200, k=3, groups=3, layernorm=False,
                          search_backend=backend, chunk_mib=0.01)
    for n in (50, 7, 120, 50):
        a = torch.randn(n, 24)
        with torch.no_grad():
            layer(a)
        ref = naive_search(a.view(n, 3, 8), layer.codebook.detach(), 3, "cosine")[0]
        assert torch.equal(layer.last_codes.sort(-1).values, ref.sort(-1).values)


@pytest.fixture(params=["amx", "kernel", "torch"])
def screen_impl(request, monkeypatch):
    """Runs a screen test with the compiled kernel's AMX scores, with its bfloat16 ``mm``
    scores, and with the torch-only screen."""
    if request.param == "amx" and not kernels.amx():
        pytest.skip("AMX tiles are not usable on this machine")
    if request.param == "kernel" and not kernels.available():
        pytest.skip("the compiled kernel is not available on this machine")
    if request.param == "kernel":
        monkeypatch.setenv("CODEBOOK_FEATURES_AMX", "0")
    if request.param == "torch":
        monkeypatch.setattr(kernels, "available", lambda: False)
    return request.param


def _count_redos(monkeypatch) -> list[int]:
    """Rows the bf16 screen hands back to exact search, call by call (either screen)."""
    calls: list[int] = []
    # Each spy sits in the module whose screen calls it: the torch screen's exact search, the
    # compiled screen's redo.
    for module, name in ((snap.screen, "_search_torch"), (snap.screen_kernel, "_redo")):
        exact = getattr(module, name)

        def spy(x, *args, exact=exact, **kwargs):
            calls.append(x.shape[0])
            return exact(x, *args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("similarity", ["cosine", "inner", "euclidean"])
def test_bf16_screen_certifies_or_redoes(monkeypatch, similarity, screen_impl):
    """Codes closer together than bfloat16 can tell apart (score gaps ~1e-4 relative; float32
    resolves them): the screen's ranking is wrong, the certificate must catch it and redo those
    tokens, and the answer is exact."""
    calls = _count_redos(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(1, 50, 64, generator=gen)
    book = centres.repeat_interleave(20, 1) + 1e-4 * torch.randn(1, 1000, 64, generator=gen)
    x = torch.randn(400, 1, 64, generator=gen)  # the best codes: copies of one centre
    res = snap.search(x, book, 3, similarity, backend="bf16_screen")
    if screen_impl == "torch":  # near-duplicate codes cannot be certified from the shortlist
        assert sum(calls) > 0
    # (The compiled screen re-scores every code within its error bound of the k-th: the 20
    # near-copies fit that window, so it certifies them without a redo.)
    assert_exact(res.codes, res.scores, x, book, 3, similarity, atol=1e-5, agree=0.98)
    # The same codes as float32 exact search (float64 differs on a few float32 near-ties,
    # gaps ~1e-7 relative, for both). The compiled screen scores cosine as (x . c) / |c| and
    # torch as x . (c / |c|) (and rounds the Euclidean bias -|c|^2/2 from a float64 norm):
    # the two roundings may swap such near-ties, and only those.
    ref = snap.search(x, book, 3, similarity, backend="torch").codes
    differ = (res.codes.sort(-1).values != ref.sort(-1).values).any(-1).any(-1)
    if screen_impl == "torch":
        assert not differ.any()
    else:
        assert differ.float().mean() < 0.05, float(differ.float().mean())
        sim = naive_search(x, book, 3, similarity)[2]
        mine = sim.gather(-1, res.codes)[differ].sort(-1).values
        theirs = sim.gather(-1, ref)[differ].sort(-1).values
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-6)


def test_bf16_screen_negative_scores(monkeypatch, screen_impl):
    """Every score negative: bfloat16 scores as int16 bit patterns order negatives backwards,
    so no token may be certified from them: all are redone. The AMX screen's float32 scores
    order them right and certify them. Either way the answer is exact."""
    calls = _count_redos(monkeypatch)
    gen = torch.Generator().manual_seed(4)
    book = torch.rand(2, 1000, 32, generator=gen) + 0.1
    x = -(torch.rand(300, 2, 32, generator=gen) + 0.1)
    res = snap.search(x, book, 2, "cosine", backend="bf16_screen")
    assert sum(calls) == (0 if screen_impl == "amx" else 300)
    assert_exact(res.codes, res.scores, x, book, 2, "cosine")


def test_bf16_screen_certifies_most_tokens(monkeypatch, screen_impl):
    """On well-separated random data almost every token is certified by the screen alone."""
    calls = _count_redos(monkeypatch)
    x, book = problem(n=2000, g=2, c=2000, dg=64, seed=5)
    res = snap.search(x, book, 4, "cosine", chunk_mib=0.5, backend="bf16_screen")
    assert sum(calls) < 0.05 * 2000, sum(calls)
    assert_exact(res.codes, res.scores, x, book, 4, "cosine")
