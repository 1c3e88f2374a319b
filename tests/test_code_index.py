"""Code index and its queries, checked against naive loops over the model's own codes."""

from __future__ import annotations

import re
import shutil
import warnings
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import transformers as T
from tiny_models import assert_same_index

from codebook_features.analysis import CodeIndex, best_neuron_precision, build_index
from codebook_features.analysis.index import (
    META_NAME,
    codebook_fingerprint,
    layer_fingerprint,
    shard_file,
    site_fingerprints,
)
from codebook_features.errors import CodebookError
from codebook_features.experiments.stories import (
    generate_stories,
    tiny_story_model_config,
    train_story_tokenizer,
)
from codebook_features.io import read_json, write_json
from codebook_features.model import CodebookModel

NUM_DOCS = 50
SITE = "layers.1.mlp_out"
HEADS = "layers.0.attn_heads"
PATTERN = r"dragon\w*|flowers?"


def _model(tok, num_codes: int = 64, seed: int = 0) -> CodebookModel:
    torch.manual_seed(seed)
    cfg = tiny_story_model_config(tok, hidden_size=32, num_layers=2, num_heads=4)
    base = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    return CodebookModel(base, placements=["attn_heads", "mlp_out"], num_codes=num_codes, k=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared machine
    stories = generate_stories(num_stories=200, seed=0)
    tok = train_story_tokenizer(stories, vocab_size=400)
    model = _model(tok)
    texts = [s["text"] for s in stories[:NUM_DOCS]]
    path = tmp_path_factory.mktemp("index") / "idx"
    build_index(model, tok, texts, path, shard_tokens=1000, batch_size=4)
    # Reference: one forward per document, read straight from the layers.
    ref = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_offsets_mapping=True)
            out = model(input_ids=torch.tensor([enc["input_ids"]]))
            pieces = tok.convert_ids_to_tokens(enc["input_ids"])
            toks = [(i, text[s:e] if e > s else p, s, e)
                    for i, (s, e), p in zip(enc["input_ids"], enc["offset_mapping"], pieces,
                                            strict=True)]
            ref.append({"text": text, "tokens": toks,
                        # the model's own next-token guess at each position (codebooks on)
                        "pred": [int(torch.argmax(v)) for v in out.logits[0]],
                        "codes": {n: l.last_codes[0].tolist() for n, l in model.sites.items()},
                        "scores": {n: l.last_scores[0].tolist() for n, l in model.sites.items()}})
    index = CodeIndex.open(path, model=model)
    yield {"tok": tok, "model": model, "texts": texts, "path": path, "ref": ref, "index": index}
    index.close()
    torch.set_num_threads(threads)


def _occurrences(ref, site, group, code):
    """(score, doc, pos) of every firing of a code, from the reference forwards."""
    out = []
    for d, r in enumerate(ref):
        for p, groups in enumerate(r["codes"][site]):
            for slot, c in enumerate(groups[group]):
                if c == code:
                    out.append((r["scores"][site][p][group][slot], d, p))
    return out


def _frequent_codes(ref, site, group=0, count=3):
    c = Counter(code for r in ref for g in r["codes"][site] for code in g[group])
    return [code for code, _ in c.most_common()][:count] + [min(c, key=lambda x: (c[x], x))]


def test_layout_and_stored_codes(setup):
    path, ref, index = setup["path"], setup["ref"], setup["index"]
    meta = read_json(path / META_NAME)
    assert meta["complete"] and len(meta["shards"]) >= 4
    assert meta["num_docs"] == NUM_DOCS
    assert meta["num_tokens"] == sum(len(r["tokens"]) for r in ref)
    assert [s["name"] for s in meta["sites"]] == setup["model"].site_names
    assert meta["sites"][0] == {"name": HEADS, "groups": 4, "k": 2, "num_codes": 64}
    assert meta["base_model"] == setup["model"].base_info()
    ends = [0] + [s["end_doc"] for s in meta["shards"]]
    assert [s["first_doc"] for s in meta["shards"]] == ends[:-1] and ends[-1] == NUM_DOCS
    assert all(s["tokens"] >= 1000 for s in meta["shards"][:-1])  # whole docs, closed at 1000
    # Every stored code equals the per-document forward's (batching and padding change none).
    rows = []
    for s in meta["shards"]:
        rows.extend(pq.read_table(path / s["files"]["codes"]).to_pylist())
    sites = index.sites
    assert len(rows) == sum(len(r["tokens"]) * (4 * 2 + 4 * 2 + 2 + 2) for r in ref)
    for row in rows:
        site = sites[row["site"]]
        r = ref[row["doc"]]
        assert r["codes"][site][row["pos"]][row["grp"]][row["slot"]] == row["code"]
        assert row["score"] == pytest.approx(
            r["scores"][site][row["pos"]][row["grp"]][row["slot"]], abs=1e-5)
    table = index.tokens()
    assert table.num_rows == meta["num_tokens"]
    assert table.column("token").to_pylist() == [t[1] for r in ref for t in r["tokens"]]
    toks = pq.read_table(path / shard_file(0, "tokens")).to_pylist()
    first = ref[0]["tokens"]
    assert [(t["token_id"], t["token"], t["start"], t["end"]) for t in toks[:len(first)]] \
        == first


def test_codes_at(setup):
    ref, index = setup["ref"], setup["index"]
    for d in (0, 7, NUM_DOCS - 1):
        for p in (0, 3, len(ref[d]["tokens"]) - 1):
            got = index.codes_at(d, p)
            assert got == {site: ref[d]["codes"][site][p] for site in index.sites}
    with pytest.raises(CodebookError, match="not in the index"):
        index.codes_at(NUM_DOCS, 0)
    with pytest.raises(CodebookError, match="position"):
        index.codes_at(0, 10_000)


def test_top_contexts(setup):
    ref, index = setup["ref"], setup["index"]
    for site, group in ((SITE, 0), (HEADS, 2)):
        for code in _frequent_codes(ref, site, group):
            occ = _occurrences(ref, site, group, code)
            got = index.top_contexts(site, code, group=group, n=5, window=3)
            assert len(got) == min(5, len(occ))
            scores = [c.score for c in got]
            assert scores == sorted(scores, reverse=True)
            kept = {(c.doc, c.position) for c in got}
            rest = [s for s, d, p in occ if (d, p) not in kept]
            assert not rest or max(rest) <= min(scores) + 1e-5
            for c in got:
                r = ref[c.doc]
                toks = r["tokens"]
                _, token, start, end = toks[c.position]
                before = [t for t in toks[max(c.position - 3, 0):c.position]]
                after = toks[c.position + 1:c.position + 4]
                assert (c.doc, c.position) in {(d, p) for _, d, p in occ}
                assert c.token == token
                assert c.before == (r["text"][min([t[2] for t in before] + [start]):start])
                assert c.after == (r["text"][end:max([t[3] for t in after] + [end])])


def test_code_stats(setup):
    ref, index = setup["ref"], setup["index"]
    total = sum(len(r["tokens"]) for r in ref)
    for code in _frequent_codes(ref, SITE):
        on, nxt = Counter(), Counter()
        names = {}
        for _, d, p in _occurrences(ref, SITE, 0, code):
            toks = ref[d]["tokens"]
            on[toks[p][0]] += 1
            names[toks[p][0]] = toks[p][1]
            if p + 1 < len(toks):
                nxt[toks[p + 1][0]] += 1
                names[toks[p + 1][0]] = toks[p + 1][1]
        count = sum(on.values())
        st = index.code_stats(SITE, code, top=5)
        assert st.count == count and st.frequency == pytest.approx(count / total)
        best = sorted(on.items(), key=lambda x: (-x[1], x[0]))[:5]
        assert st.tokens == [(names[t], n) for t, n in best]
        best = sorted(nxt.items(), key=lambda x: (-x[1], x[0]))[:5]
        assert st.next_tokens == [(names[t], n) for t, n in best]


def _naive_predicted(ref, site, code, top=5):
    """The model's top-1 next tokens where a code fires, by a loop over the reference
    forwards: [(text, count)], text = the smallest text the id has in the corpus, or
    "<id N>" (the test's in-memory tokenizer cannot be loaded again by the index)."""
    texts = {}
    for r in ref:
        for i, text, _, _ in r["tokens"]:
            texts[i] = min(texts.get(i, text), text)
    pred = Counter()
    for d, p in {(d, p) for _, d, p in _occurrences(ref, site, 0, code)}:
        pred[ref[d]["pred"][p]] += 1
    best = sorted(pred.items(), key=lambda x: (-x[1], x[0]))[:top]
    return [(texts.get(t, f"<id {t}>"), n) for t, n in best]


def test_code_stats_predicted_next_tokens(setup, tmp_path):
    """code_stats reports the model's own top-1 next-token predictions where a code fires,
    recorded per token at build time (pred_id), equal to a naive loop over the argmax of a
    per-document forward; an index without the column omits them."""
    ref, index, path = setup["ref"], setup["index"], setup["path"]
    stored = np.concatenate([pq.read_table(path / s["files"]["tokens"]).column("pred_id")
                             .to_numpy() for s in read_json(path / META_NAME)["shards"]])
    assert stored.dtype == np.int32
    assert stored.tolist() == [p for r in ref for p in r["pred"]]
    assert index.has_predictions and index.predictions.tolist() == stored.tolist()
    seen = set()
    for site in (SITE, HEADS):
        for code in _frequent_codes(ref, site):
            st = index.code_stats(site, code, top=5)
            want = _naive_predicted(ref, site, code)
            assert st.predicted_next_tokens == want and want
            seen.update(t for t, _ in want)
    # Predicted tokens that never occur in the text: "<id N>" without a tokenizer (this
    # test's is in memory only), the tokenizer's text with one.
    unseen = [t for t in seen if t.startswith("<id ")]
    assert unseen
    with CodeIndex.open(path, tokenizer=setup["tok"]) as ix:
        for site in (SITE, HEADS):
            for code in _frequent_codes(ref, site):
                got = ix.code_stats(site, code, top=5).predicted_next_tokens
                want = _naive_predicted(ref, site, code)
                assert [n for _, n in got] == [n for _, n in want]
                for (text, _), (w, _) in zip(got, want, strict=True):
                    if w.startswith("<id "):
                        i = int(w[4:-1])
                        assert text in (setup["tok"].decode([i]),
                                        setup["tok"].convert_ids_to_tokens(i))
                    else:
                        assert text == w
    # the predictions differ from the corpus's next tokens (it is an untrained model)
    assert any(index.code_stats(SITE, c, top=5).predicted_next_tokens
               != index.code_stats(SITE, c, top=5).next_tokens
               for c in _frequent_codes(ref, SITE))
    # An index built before predictions were recorded: no column, no predictions, the rest
    # of the statistics unchanged.
    old = tmp_path / "old"
    shutil.copytree(path, old)
    meta = read_json(old / META_NAME)
    for s in meta["shards"]:
        f = old / s["files"]["tokens"]
        pq.write_table(pq.read_table(f).drop_columns(["pred_id"]), f)
        s.pop("checks", None)  # nor the file checks recorded since
    del meta["predictions"]
    write_json(old / META_NAME, meta)
    code = _frequent_codes(ref, SITE)[0]
    with CodeIndex.open(old) as ix:
        assert not ix.has_predictions and ix.predictions is None
        st = ix.code_stats(SITE, code, top=5)
        assert st.predicted_next_tokens is None
        new = index.code_stats(SITE, code, top=5)
        assert (st.count, st.tokens, st.next_tokens) == (new.count, new.tokens,
                                                         new.next_tokens)
    # Resuming such an index keeps its shards' columns alike (no pred_id in the new shards).
    meta["shards"] = meta["shards"][:2]
    meta["complete"] = False
    write_json(old / META_NAME, meta)
    build_index(setup["model"], setup["tok"], setup["texts"], old, shard_tokens=1000,
                batch_size=4)
    with CodeIndex.open(old) as ix:
        assert ix.num_docs == NUM_DOCS and ix.predictions is None
        assert ix.code_stats(SITE, code, top=5).predicted_next_tokens is None


def _naive_positives(ref, pattern):
    pos = set()
    for d, r in enumerate(ref):
        spans = [m.span() for m in re.finditer(pattern, r["text"]) if m.end() > m.start()]
        for p, (_, _, s, e) in enumerate(r["tokens"]):
            if any(s < me and ms < e for ms, me in spans):
                pos.add((d, p))
    return pos


def _naive_scores(ref, site, positives):
    """(precision, recall, group, code) of every code with a hit, sorted as the index sorts
    them, and the fired / hits counters."""
    fired, hits = Counter(), Counter()
    for d, r in enumerate(ref):
        for p, groups in enumerate(r["codes"][site]):
            for g, codes in enumerate(groups):
                for c in codes:
                    fired[g, c] += 1
                    hits[g, c] += (d, p) in positives
    want = sorted(((hits[gc] / fired[gc], hits[gc] / len(positives), *gc)
                   for gc in fired if hits[gc]), key=lambda x: (-x[0], -x[1], x[2], x[3]))
    return want, fired, hits


def test_regex_search(setup):
    ref, index = setup["ref"], setup["index"]
    positives = _naive_positives(ref, PATTERN)
    assert len(positives) > 10
    want, fired, hits = _naive_scores(ref, SITE, positives)
    got = index.regex_search(PATTERN, SITE)
    assert [(m.group, m.code) for m in got] == [(w[2], w[3]) for w in want]
    for m, w in zip(got, want, strict=True):
        assert m.precision == pytest.approx(w[0]) and m.recall == pytest.approx(w[1])
        assert (m.fired, m.hits) == (fired[m.group, m.code], hits[m.group, m.code])
    assert [(m.group, m.code) for m in index.regex_search(PATTERN, SITE, n=2)] == \
        [(w[2], w[3]) for w in want[:2]]
    assert index.regex_search(r"zzzqqq", SITE) == []

    # Best neuron at the same recall, against a brute force over thresholds.
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(index.num_tokens, 4, generator=g)
    acts[:, 0] += 3.0 * torch.tensor(  # neuron 0 leans to the positives
        [float((d, p) in positives) for d, r in enumerate(ref) for p in range(len(r["tokens"]))])
    top = index.regex_search(PATTERN, SITE, n=3, neurons=acts)
    mask = np.array([(d, p) in positives for d, r in enumerate(ref)
                     for p in range(len(r["tokens"]))])
    for m in top:
        best = 0.0
        for j in range(acts.shape[1]):
            order = sorted(range(len(mask)), key=lambda i: -float(acts[i, j]))
            h = 0
            for cnt, i in enumerate(order, 1):
                h += mask[i]
                if h / mask.sum() >= m.recall - 1e-12:
                    best = max(best, h / cnt)
                    break
        assert m.neuron_precision == pytest.approx(best)
    assert best_neuron_precision(acts.numpy(), mask, [1.0])[0] > 0
    model, tok = setup["model"], setup["tok"]
    neurons = index.neuron_activations(model, tok, SITE, batch_size=5)
    assert neurons.shape == (index.num_tokens, 32)
    model.site(SITE).recorded = []
    model(input_ids=torch.tensor([[t[0] for t in ref[1]["tokens"]]]))
    first = len(ref[0]["tokens"])
    torch.testing.assert_close(neurons[first:first + len(ref[1]["tokens"])],
                               model.site(SITE).recorded[-1][0], atol=1e-5, rtol=1e-5)
    model.site(SITE).recorded = None
    real = index.regex_search(PATTERN, SITE, n=3, neurons=neurons)
    assert all(0 < m.neuron_precision <= 1 for m in real)
    with pytest.raises(CodebookError, match="neurons of shape"):
        index.regex_search(PATTERN, SITE, neurons=acts[:10])


def test_topic_codes(setup):
    ref, index = setup["ref"], setup["index"]
    for share in (0.1, 0.3):
        want = {}
        for d, r in enumerate(ref):
            c = Counter((g, code) for groups in r["codes"][SITE]
                        for g, codes in enumerate(groups) for code in codes)
            n = len(r["tokens"])
            rows = sorted(((g, code, cnt / n) for (g, code), cnt in c.items()
                           if cnt / n >= share), key=lambda x: (-x[2], x[0], x[1]))
            if rows:
                want[d] = rows
        got = index.topic_codes(SITE, min_share=share)
        assert got.keys() == want.keys()
        for d in want:
            assert [(g, c) for g, c, _ in got[d]] == [(g, c) for g, c, _ in want[d]]
            assert [s for *_, s in got[d]] == pytest.approx([s for *_, s in want[d]])
    assert index.topic_codes(SITE, 0.1)  # the tiny model has codes that cover a document
    got = index.topic_codes(HEADS, 0.05, group=1)
    assert got and all(g == 1 for rows in got.values() for g, _, _ in rows)


def test_similar_codes(setup):
    model, index = setup["model"], setup["index"]
    book = model.site(HEADS).codebook.detach()[1]
    sims = [(float(torch.nn.functional.cosine_similarity(book[5], book[j], dim=0)), j)
            for j in range(book.shape[0]) if j != 5]
    want = sorted(sims, key=lambda x: -x[0])[:4]
    got = index.similar_codes(HEADS, 5, group=1, n=4)
    assert [c for c, _ in got] == [j for _, j in want]
    assert [s for _, s in got] == pytest.approx([s for s, _ in want], abs=1e-5)
    assert index.similar_codes(HEADS, 5, group=1, n=4, model=model.site(HEADS)) == got
    with pytest.raises(CodebookError, match="does not hold"):
        index.similar_codes(HEADS, 5, model=model.site(SITE))


def test_resume_after_lost_shard(setup, tmp_path):
    src, tok, model, texts = setup["path"], setup["tok"], setup["model"], setup["texts"]
    path = tmp_path / "idx"
    shutil.copytree(src, path)
    meta = read_json(path / META_NAME)
    lost = meta["shards"][2]
    meta["shards"] = [s for s in meta["shards"] if s["id"] != 2]
    meta["complete"] = False
    write_json(path / META_NAME, meta)
    (path / lost["files"]["codes"]).write_bytes(b"half-written")  # an interrupted write
    with pytest.raises(CodebookError, match="incomplete"):
        CodeIndex.open(path)
    kept = {f: (path / f).stat().st_mtime_ns for s in meta["shards"] for f in s["files"].values()}
    build_index(model, tok, texts, path, shard_tokens=1000, batch_size=4)
    assert read_json(path / META_NAME) == read_json(src / META_NAME)
    assert {f: (path / f).stat().st_mtime_ns for f in kept} == kept  # skipped, not rewritten
    with CodeIndex.open(path, model=model) as again:
        d = lost["first_doc"]
        assert again.codes_at(d, 1) == setup["index"].codes_at(d, 1)
        assert again.regex_search(PATTERN, SITE) == setup["index"].regex_search(PATTERN, SITE)
    (path / shard_file(1, "docs")).unlink()  # a listed shard lost a file: rewritten
    with pytest.raises(CodebookError,
                       match=r"shard 1 is damaged \(shard-00001.docs.parquet is missing\)"):
        CodeIndex.open(path)
    build_index(model, tok, texts, path, shard_tokens=1000, batch_size=4)
    with CodeIndex.open(path) as again:
        assert again.top_contexts(SITE, 3) == setup["index"].top_contexts(SITE, 3)
    with pytest.raises(CodebookError, match="another model, tokenizer or settings"):
        build_index(model, tok, texts, path, shard_tokens=500, batch_size=4)


def test_dataset_input(setup, tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"story": setup["texts"][:6]})
    with pytest.raises(CodebookError, match="no column 'text'"):
        build_index(setup["model"], setup["tok"], ds, tmp_path / "a")
    build_index(setup["model"], setup["tok"], ds, tmp_path / "b", text_column="story",
                batch_size=3)
    with CodeIndex.open(tmp_path / "b") as ix:
        assert ix.num_docs == 6 and len(ix.meta["shards"]) == 1
        assert ix.codes_at(5, 4) == setup["index"].codes_at(5, 4)


def test_streaming_input(setup, tmp_path):
    """A streaming IterableDataset, or a generator, gives the index of the in-memory list,
    read a batch at a time (bounded memory)."""
    from datasets import Dataset, IterableDataset

    model, tok, texts, path = setup["model"], setup["tok"], setup["texts"], setup["path"]
    stream = Dataset.from_dict({"text": texts}).to_iterable_dataset()
    assert isinstance(stream, IterableDataset)
    build_index(model, tok, stream, tmp_path / "a", shard_tokens=1000, batch_size=4)
    assert_same_index(path, tmp_path / "a")
    # A stream whose columns are unknown until read, with another text column.
    gen = IterableDataset.from_generator(lambda: ({"id": i, "story": t}
                                                  for i, t in enumerate(texts[:9])))
    assert gen.column_names is None
    build_index(model, tok, gen, tmp_path / "b", text_column="story", batch_size=4)
    with CodeIndex.open(tmp_path / "b") as ix:
        assert ix.num_docs == 9 and ix.codes_at(8, 3) == setup["index"].codes_at(8, 3)
    with pytest.raises(CodebookError, match="no column 'text'"):
        build_index(model, tok, gen, tmp_path / "c")
    with pytest.raises(CodebookError, match="no column 'text'"):
        build_index(model, tok, Dataset.from_dict({"story": texts}).to_iterable_dataset(),
                    tmp_path / "c")
    # A generator of strings is read lazily: never more than a shard and a batch ahead of
    # the shards written.
    out, batch, ahead = tmp_path / "g", 4, []

    def lazily():
        for i, t in enumerate(texts):
            done = read_json(out / META_NAME)["shards"] if (out / META_NAME).exists() else []
            ahead.append(i - (done[-1]["end_doc"] if done else 0))
            yield t

    build_index(model, tok, lazily(), out, shard_tokens=1000, batch_size=batch)
    assert_same_index(path, out)
    meta = read_json(out / META_NAME)
    per_shard = max(s["end_doc"] - s["first_doc"] for s in meta["shards"])
    assert len(ahead) == NUM_DOCS and max(ahead) < per_shard + batch < NUM_DOCS
    with pytest.raises(CodebookError, match="texts must be strings, got int"):
        build_index(model, tok, iter([texts[0], 3]), tmp_path / "h")


def test_errors(setup, tmp_path):
    index, tok = setup["index"], setup["tok"]
    with pytest.raises(CodebookError, match=r"regex '\(dragon' does not compile"):
        index.regex_search("(dragon", SITE)
    with pytest.raises(CodebookError, match="unknown site 'layers.9.mlp_out'"):
        index.regex_search("dragon", "layers.9.mlp_out")
    with pytest.raises(CodebookError, match="unknown site"):
        index.top_contexts("nope", 1)
    with pytest.raises(CodebookError, match="code 64 out of range"):
        index.code_stats(SITE, 64)
    with pytest.raises(CodebookError, match="group 1 out of range"):
        index.top_contexts(SITE, 1, group=1)
    with pytest.raises(CodebookError, match="window >= 0"):
        index.top_contexts(SITE, 1, window=-1)
    with pytest.raises(CodebookError, match="min_share"):
        index.topic_codes(SITE, 0.0)
    with pytest.raises(CodebookError, match="meta.json missing"):
        CodeIndex.open(tmp_path / "nothing")
    with pytest.raises(CodebookError, match="num_codes"):
        CodeIndex.open(setup["path"], model=_model(tok, num_codes=32))
    torch.manual_seed(0)
    wide = T.AutoModelForCausalLM.from_config(
        tiny_story_model_config(tok, hidden_size=48, num_layers=2, num_heads=4))
    with pytest.raises(CodebookError, match="hidden_size 32, this model has 48"):
        CodeIndex.open(setup["path"], model=CodebookModel(wide, placements=["attn_heads",
                                                                            "mlp_out"]))
    other = CodebookModel(_model(tok).remove_hooks(), placements=["mlp_out"], num_codes=64, k=2)
    with pytest.raises(CodebookError, match="lacks"):
        CodeIndex.open(setup["path"], model=other)
    with pytest.raises(CodebookError, match="similar_codes needs the codebook"):
        CodeIndex.open(setup["path"]).similar_codes(SITE, 1)
    with pytest.raises(CodebookError, match="fast tokenizer"):
        build_index(setup["model"], object(), ["x"], tmp_path / "c")
    with pytest.raises(CodebookError, match="list of strings"):
        build_index(setup["model"], tok, "just one string", tmp_path / "d")


def test_codebook_fingerprint(setup, tmp_path):
    """An index refuses a model whose codebooks have the same shapes but other weights."""
    path, tok, model, texts = setup["path"], setup["tok"], setup["model"], setup["texts"]
    meta = read_json(path / META_NAME)
    assert meta["site_fingerprints"] == site_fingerprints(model)
    assert meta["codebook_fingerprint"] == codebook_fingerprint(meta["site_fingerprints"])
    assert meta["codebook_fingerprint"].startswith("sha256:")
    # The same weights (another object, reloaded from a save) are accepted.
    same = _model(tok)
    model.save_codebooks(tmp_path / "cb")
    reloaded = CodebookModel.from_pretrained(tmp_path / "cb", base_model=_model(tok).remove_hooks())
    for m in (same, reloaded):
        CodeIndex.open(path, model=m).close()
    # One code vector nudged, or one LayerNorm bias: refused, naming both fingerprints.
    with torch.no_grad():
        same.site(SITE).codebook[0, 3, 0] += 1e-3
    want, got = meta["site_fingerprints"][SITE], layer_fingerprint(same.site(SITE))
    assert got != want  # the cache sees the in-place change
    with pytest.raises(CodebookError) as e:
        CodeIndex.open(path, model=same)
    msg = str(e.value)
    assert "\n" not in msg and want in msg and got in msg and SITE in msg
    assert "pass the model the index was built with" in msg and "rebuild the index" in msg
    with torch.no_grad():
        reloaded.site(HEADS).ln.bias += 0.1
    with pytest.raises(CodebookError, match=f"site {HEADS} has fingerprint"):
        CodeIndex.open(path, model=reloaded)
    other = _model(tok, seed=1)  # a fresh random model of the same shapes
    with pytest.raises(CodebookError, match="other codebook weights"):
        CodeIndex.open(path, model=other)
    # Every other pairing of the index with a model checks too.
    index = setup["index"]
    with pytest.raises(CodebookError, match="other codebook weights"):
        index.neuron_activations(other, tok, SITE, max_tokens=50)
    with pytest.raises(CodebookError, match="other codebook weights"):
        index.similar_codes(SITE, 3, model=other)
    with pytest.raises(CodebookError, match="other codebook weights"):
        index.similar_codes(HEADS, 3, model=other.site(HEADS))
    assert index.similar_codes(HEADS, 3, model=_model(tok).site(HEADS)) == \
        index.similar_codes(HEADS, 3)
    # Resuming an interrupted build with other weights is refused, nothing rewritten.
    part = tmp_path / "part"
    shutil.copytree(path, part)
    write_json(part / META_NAME, {**meta, "complete": False, "shards": meta["shards"][:2]})
    with pytest.raises(CodebookError, match="fingerprint"):
        build_index(other, tok, texts, part, shard_tokens=1000, batch_size=4)
    assert read_json(part / META_NAME)["shards"] == meta["shards"][:2]
    # An index from before fingerprints: opens with a warning, not an error.
    old = tmp_path / "old"
    shutil.copytree(path, old)
    write_json(old / META_NAME, {k: v for k, v in meta.items()
                                 if k not in ("codebook_fingerprint", "site_fingerprints")})
    with pytest.warns(UserWarning, match="no codebook fingerprint"):
        with CodeIndex.open(old, model=other) as ix:
            assert ix.codes_at(0, 1) == index.codes_at(0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CodeIndex.open(old).close()  # no model, nothing to check


def test_token_search_and_windows(setup):
    ref, index = setup["ref"], setup["index"]
    for token in ("dragon", " the", "."):
        want_pos = {(d, p) for d, r in enumerate(ref) for p, t in enumerate(r["tokens"])
                    if t[1].strip() == token.strip()}
        assert want_pos
        want = _naive_scores(ref, HEADS, want_pos)[0]
        got = index.token_search(token, HEADS)
        assert [(m.group, m.code) for m in got] == [(w[2], w[3]) for w in want]
        assert [m.precision for m in got] == pytest.approx([w[0] for w in want])
        assert [m.recall for m in got] == pytest.approx([w[1] for w in want])
    with pytest.raises(CodebookError, match="empty"):
        index.token_search("  ", HEADS)
    # Windows: pieces joined give the document's text around the token.
    for d, p in ((0, 0), (3, 5), (NUM_DOCS - 1, len(ref[NUM_DOCS - 1]["tokens"]) - 1)):
        toks = ref[d]["tokens"]
        (w,) = index.windows([(d, p)], window=4)
        lo, hi = max(p - 4, 0), min(p + 4, len(toks) - 1)
        assert [x["pos"] for x in w] == list(range(lo, hi + 1))
        for x in w:
            _, piece, s, e = toks[x["pos"]]
            prev = [t[3] for t in toks[:x["pos"]] if t[3] > t[2]]
            start = prev[-1] if prev and x["pos"] > lo else s
            assert x["text"] == (ref[d]["text"][start:e] if e > s else piece)
    with pytest.raises(CodebookError, match="not in the index"):
        index.windows([(NUM_DOCS, 0)])


def test_neuron_baseline_on_first_documents(setup):
    ref, index, model, tok = setup["ref"], setup["index"], setup["model"], setup["tok"]
    some = index.neuron_activations(model, tok, SITE, max_tokens=200)
    ndocs = next(i for i in range(1, NUM_DOCS + 1)
                 if sum(len(r["tokens"]) for r in ref[:i]) >= 200)
    rows = sum(len(r["tokens"]) for r in ref[:ndocs])
    full = index.neuron_activations(model, tok, SITE)
    torch.testing.assert_close(some, full[:rows])
    positives = _naive_positives(ref, PATTERN)
    mask = np.array([(d, p) in positives for d, r in enumerate(ref)
                     for p in range(len(r["tokens"]))])[:rows]
    got = index.regex_search(PATTERN, SITE, n=4, neurons=some)
    assert [m.neuron_precision for m in got] == pytest.approx(
        best_neuron_precision(some, mask, [m.recall for m in got]))
    with pytest.raises(CodebookError, match="neurons of shape"):
        index.regex_search(PATTERN, SITE, neurons=some[:-1])
    # every site from one pass equals each site on its own
    both = index.neuron_activations_at(model, tok, [SITE, HEADS], max_tokens=200)
    torch.testing.assert_close(both[SITE], some)
    torch.testing.assert_close(both[HEADS],
                               index.neuron_activations(model, tok, HEADS, max_tokens=200))


def test_regex_positions_whole_shard_search_equals_per_document(setup):
    ref, index = setup["ref"], setup["index"]
    # Joined-shard fast path, a match across two documents (falls back), anchors and
    # lookarounds (per document), a pattern that also matches newlines.
    for pattern in (PATTERN, r"\.\s*[A-Z]\w*", r"^\w+", r"\w+\.?$", r"(?<=\. )[A-Z]\w+",
                    r"[^a-z]+", r"\bthe\b", r"(?i)ONCE"):
        index._regex_cache.clear()
        got = index.regex_positions(pattern)
        want = _naive_positives(ref, pattern)
        assert set(zip(got.column("doc").to_pylist(), got.column("pos").to_pylist(),
                       strict=True)) == want, pattern
        assert got.num_rows == len(want)
