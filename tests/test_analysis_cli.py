"""`codebook-features index` and `search` on saved codebooks and a generated corpus."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as T
from tiny_models import assert_same_index, story_codebooks

from codebook_features.analysis import CodeIndex
from codebook_features.cli import main
from codebook_features.io import read_json, write_json
from codebook_features.model import CodebookModel

HEADS = "layers.0.attn_heads"
MLP = "layers.0.mlp_out"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Codebooks saved, and their index built by the CLI (which records the codebooks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    corpus, tok, model = story_codebooks(root, num_stories=40, seed=3)
    assert main(["index", str(root / "cb"), "--files", str(corpus), "--out",
                 str(root / "idx"), "--shard-tokens", "500"]) == 0
    yield {"root": root, "corpus": corpus, "tok": tok, "model": model, "index": root / "idx",
           "codebooks": root / "cb"}
    torch.set_num_threads(threads)


def _search(capsys, index, *args):
    """Run `search`, return (exit status, stdout, stderr lines)."""
    capsys.readouterr()
    code = main(["search", str(index), *args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def _rows(table: str) -> list[list[str]]:
    """Whitespace-split rows of a table printed by `search`, header first."""
    lines = table.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] in (
        ["group", "code"], ["doc", "pos"], ["site", "group"], ["code", "cosine"],
        ["doc", "group"]))
    return [line.split() for line in lines[start:]]


def test_index_then_search(built, capsys):
    index = CodeIndex.open(built["index"])
    assert index.num_docs == 40
    assert index.meta["codebooks"] == str(built["codebooks"].resolve())  # for `browse`
    index.close()

    code, out, _ = _search(capsys, built["index"], "--site", HEADS, "--regex", r"\bonce\b",
                           "-n", "3", "--json", "--no-neurons")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 3 and rows[0]["precision"] >= rows[-1]["precision"]
    c = rows[0]["code"]
    code, out, _ = _search(capsys, built["index"], "--site", HEADS, "--code", str(c),
                           "--group", str(rows[0]["group"]), "--json")
    got = json.loads(out)
    assert code == 0 and got["stats"]["count"] == rows[0]["fired"] and got["contexts"]
    assert _search(capsys, built["index"], "--site", HEADS, "--topics", "0.3")[0] == 0
    # bad input: one line, exit 2
    assert main(["search", str(built["index"]), "--site", "layers.9.mlp_out",
                 "--code", "1"]) == 2
    assert main(["search", str(built["index"]), "--site", HEADS, "--regex", "(unclosed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)


def test_index_streaming_dataset_max_docs(built, capsys, tmp_path):
    cb, corpus = str(built["codebooks"]), str(built["corpus"])
    # --streaming reads the files as a stream: the same index as the prepared dataset.
    assert main(["index", cb, "--files", corpus, "--streaming", "--out", str(tmp_path / "s"),
                 "--shard-tokens", "500"]) == 0
    assert "indexed 40 documents" in capsys.readouterr().out
    assert_same_index(built["index"], tmp_path / "s")
    # --max-docs: the first documents, streamed or not; --dataset: a local dataset folder.
    folder = tmp_path / "ds"
    folder.mkdir()
    shutil.copy(corpus, folder / "stories.txt")
    with CodeIndex.open(built["index"]) as full:
        want = [full.codes_at(d, 3) for d in range(7)]
    for source in (["--files", corpus], ["--dataset", str(folder)]):
        for stream in ([], ["--streaming"]):
            out = tmp_path / f"m{len(source[1])}{len(stream)}"
            assert main(["index", cb, *source, *stream, "--max-docs", "7", "--out", str(out),
                         "--shard-tokens", "500"]) == 0, (source, stream)
            assert "indexed 7 documents" in capsys.readouterr().out
            with CodeIndex.open(out) as ix:
                assert ix.num_docs == 7 and [ix.codes_at(d, 3) for d in range(7)] == want
    assert main(["index", cb, "--files", corpus, "--streaming", "--text-column", "story",
                 "--out", str(tmp_path / "bad")]) == 2
    assert main(["index", cb, "--files", corpus, "--max-docs", "0", "--out",
                 str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # answered before the model loads
    assert len(err) == 2 and "no column 'story'" in err[0] and "--max-docs 0" in err[1]


def test_search_regex_and_token_tables_with_neuron_baseline(built, capsys):
    model, tok = built["model"], built["tok"]
    with CodeIndex.open(built["index"], model=model) as ix:
        neurons = ix.neuron_activations(model, tok, HEADS, max_tokens=300)
        want_regex = ix.regex_search(r"\bthe\b", HEADS, n=5, neurons=neurons)
        want_token = ix.token_search("the", HEADS, n=5, neurons=neurons)
        positives = len(ix.regex_rows(r"\bthe\b"))
        num_tokens = ix.num_tokens
    assert any(m.neuron_precision for m in want_regex)
    # The model recorded in the index loads: the neuron baseline is a column.
    for query, want in ((["--regex", r"\bthe\b"], want_regex),
                        (["--token", " the"], want_token)):
        code, out, err = _search(capsys, built["index"], "--site", HEADS, *query, "-n", "5",
                                 "--neuron-tokens", "300")
        assert code == 0 and not err, err
        rows = _rows(out)
        assert rows[0] == ["group", "code", "precision", "recall", "fired", "hits", "neuron",
                           "precision"]
        assert [[int(r[0]), int(r[1]), float(r[2]), float(r[3]), int(r[4]), int(r[5]),
                 float(r[6])] for r in rows[1:]] == [
            [m.group, m.code, pytest.approx(m.precision, abs=5e-4),
             pytest.approx(m.recall, abs=5e-4), m.fired, m.hits,
             pytest.approx(m.neuron_precision, abs=5e-4)] for m in want]
        assert f"of {num_tokens} tokens" in out and "first" in out
    assert f"regex '\\bthe\\b': {positives} of {num_tokens} tokens" in \
        _search(capsys, built["index"], "--site", HEADS, "--regex", r"\bthe\b",
                "--neuron-tokens", "300")[1]
    # --json carries the baseline too; --model names the codebooks explicitly.
    code, out, _ = _search(capsys, built["index"], "--site", HEADS, "--regex", r"\bthe\b",
                           "-n", "5", "--neuron-tokens", "300", "--json", "--model",
                           str(built["codebooks"]))
    assert [r["neuron_precision"] for r in json.loads(out)] == pytest.approx(
        [m.neuron_precision for m in want_regex])
    # --no-neurons: no column, no model loaded.
    code, out, _ = _search(capsys, built["index"], "--site", HEADS, "--regex", r"\bthe\b",
                           "-n", "5", "--no-neurons")
    assert code == 0 and _rows(out)[0] == ["group", "code", "precision", "recall", "fired",
                                           "hits"]
    assert [(int(r[0]), int(r[1])) for r in _rows(out)[1:]] == [
        (m.group, m.code) for m in want_regex]


def test_search_code_at_similar_topics(built, capsys):
    model, index = built["model"], built["index"]
    with CodeIndex.open(index, model=model) as ix:
        stats = ix.code_stats(HEADS, 3, group=1)
        contexts = ix.top_contexts(HEADS, 3, group=1, n=4)
        at = ix.codes_at(2, 5)
        token = next(t["text"] for t in ix.windows([(2, 5)], 0)[0])
        similar = ix.similar_codes(MLP, 7, n=4)
        topics = ix.topic_codes(HEADS, 0.2, group=1)
    # --code: statistics, then top contexts with the token marked
    code, out, _ = _search(capsys, index, "--site", HEADS, "--code", "3", "--group", "1",
                           "-n", "4")
    assert code == 0 and out.startswith(f"code 3 (group 1) of {HEADS}: fires on "
                                        f"{stats.count} of ")
    assert f"{stats.tokens[0][0]!r} {stats.tokens[0][1]}" in out
    # the tokens after it in the text, and the model's own predicted next tokens
    lines = out.splitlines()
    assert lines[2] == "next in text:   " + ", ".join(f"{t!r} {c}" for t, c in
                                                   stats.next_tokens)
    assert stats.predicted_next_tokens
    assert lines[3] == "predicted next: " + ", ".join(f"{t!r} {c}" for t, c in
                                                   stats.predicted_next_tokens)
    code, js, _ = _search(capsys, index, "--site", HEADS, "--code", "3", "--group", "1",
                          "--json")
    assert code == 0 and [tuple(x) for x in json.loads(js)["stats"][
        "predicted_next_tokens"]] == stats.predicted_next_tokens
    rows = _rows(out)
    assert [(int(r[0]), int(r[1])) for r in rows[1:]] == [(c.doc, c.position) for c in contexts]
    assert all(f"[[{c.token}]]" in out for c in contexts)
    # --at DOC POS: every site's codes, group by group
    code, out, _ = _search(capsys, index, "--at", "2", "5")
    assert code == 0 and f"document 2, token 5 {token!r}" in out
    got = {(r[0], int(r[1])): [int(x) for x in r[2:]] for r in _rows(out)[1:]}
    assert got == {(s, g): codes for s, groups in at.items() for g, codes in enumerate(groups)}
    code, out, _ = _search(capsys, index, "--at", "2", "5", "--site", MLP, "--json")
    assert code == 0 and json.loads(out)["codes"] == {MLP: at[MLP]}
    assert json.loads(out)["token"] == token
    # --similar: cosine neighbours, through the model recorded in the index or --model
    for extra in ([], ["--model", str(built["codebooks"])]):
        code, out, _ = _search(capsys, index, "--site", MLP, "--similar", "7", "-n", "4",
                               *extra)
        assert code == 0
        assert [(int(r[0]), float(r[1])) for r in _rows(out)[1:]] == [
            (c, pytest.approx(v, abs=5e-4)) for c, v in similar]
    # --topics with a group
    code, out, _ = _search(capsys, index, "--site", HEADS, "--topics", "0.2", "--group", "1",
                           "-n", "1000")
    assert code == 0 and topics
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in _rows(out)[1:]] == [
        (d, g, c) for d, rows in topics.items() for g, c, _ in rows]


def test_search_bad_input(built, capsys, tmp_path):
    index = built["index"]
    bad = [
        (["--site", "layers.9.mlp_out", "--at", "0", "1"], "unknown site 'layers.9.mlp_out'"),
        (["--site", HEADS, "--code", "32"], "code 32 out of range"),
        (["--site", HEADS, "--similar", "99"], "code 99 out of range"),
        (["--site", HEADS, "--code", "1", "--group", "2"], "group 2 out of range"),
        (["--site", HEADS, "--regex", "(unclosed"], "does not compile"),
        (["--site", HEADS, "--token", "   "], "the token is empty"),
        (["--at", "0", "9999"], "position 9999 is not in document 0"),
        (["--at", "40", "0"], "document 40 is not in the index"),
        (["--at", "0", "1", "--group", "5"], "group 5 out of range"),
        (["--regex", "x"], "this query needs --site"),
        (["--site", HEADS, "--topics", "1.5"], "min_share"),
        (["--site", HEADS, "--regex", "x", "-n", "0"], "-n 0"),
    ]
    for args, words in bad:
        code, out, err = _search(capsys, index, *args)
        assert code == 2 and out == "" and len(err) == 1, (args, err)
        assert err[0].startswith("error: ") and words in err[0], (args, err)
    # Without the model: --similar and --neurons say why; the regex search still answers.
    gone = tmp_path / "idx"
    shutil.copytree(index, gone)
    meta = read_json(gone / "meta.json")
    write_json(gone / "meta.json", {**meta, "codebooks": str(tmp_path / "gone")})
    for args in (["--similar", "1"], ["--regex", "once", "--neurons"]):
        code, out, err = _search(capsys, gone, "--site", HEADS, *args)
        assert code == 2 and len(err) == 1 and "needs the model" in err[0], err
        assert "gone; pass --model CODEBOOKS_DIR" in err[0]
    code, out, err = _search(capsys, gone, "--site", HEADS, "--regex", "once")
    assert code == 0 and "neuron" not in _rows(out)[0]
    assert err and err[0].startswith("note: no neuron baseline")
    # Codebooks of the same shapes with other weights: refused by fingerprint.
    torch.manual_seed(99)
    base = T.AutoModelForCausalLM.from_pretrained(built["root"] / "model")
    CodebookModel(base, placements=["attn_heads", "mlp_out"], num_codes=32, k=2).save_codebooks(
        tmp_path / "other", base_model_name=str(built["root"] / "model"))
    for args in (["--similar", "1"], ["--regex", "once"]):
        code, _, err = _search(capsys, index, "--site", HEADS, *args, "--model",
                               str(tmp_path / "other"))
        assert code == 2 and len(err) == 1 and "other codebook weights" in err[0], err


def test_search_code_old_index_without_predictions(built, capsys, tmp_path):
    """An index built before the model's predictions were recorded (no pred_id column):
    --code prints its statistics without the predicted-next line."""
    import pyarrow.parquet as pq

    old = tmp_path / "old"
    shutil.copytree(built["index"], old)
    meta = read_json(old / "meta.json")
    for s in meta["shards"]:
        f = old / s["files"]["tokens"]
        pq.write_table(pq.read_table(f).drop_columns(["pred_id"]), f)
        s.pop("checks", None)  # nor the file checks recorded since
    del meta["predictions"]
    write_json(old / "meta.json", meta)
    code, out, err = _search(capsys, old, "--site", HEADS, "--code", "3", "--group", "1")
    assert code == 0 and not err
    assert "next in text:" in out and "predicted next" not in out
    code, out, _ = _search(capsys, old, "--site", HEADS, "--code", "3", "--group", "1",
                           "--json")
    assert code == 0 and json.loads(out)["stats"]["predicted_next_tokens"] is None
