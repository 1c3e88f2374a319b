"""The code index and its browser under bad conditions: long documents indexed whole, damaged
shards found on open and rebuilt by `index`, `browse` refusing what it cannot serve, and
requests that ask for too much."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from tiny_models import assert_same_index, story_codebooks

from codebook_features.analysis import CodeIndex, build_index
from codebook_features.analysis.index import META_NAME, shard_file
from codebook_features.cli import main
from codebook_features.errors import CodebookError
from codebook_features.io import read_json

HEADS = "layers.0.attn_heads"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ixrobust")
    corpus, tok, model = story_codebooks(root, num_stories=30, seed=4)
    assert main(["index", str(root / "cb"), "--files", str(corpus), "--out",
                 str(root / "idx"), "--shard-tokens", "300"]) == 0
    yield {"root": root, "corpus": corpus, "tok": tok, "model": model, "index": root / "idx",
           "codebooks": root / "cb"}
    torch.set_num_threads(threads)


def last_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err
    return lines[-1]


# ---------------------------------------------------------------- long documents
def test_long_documents_are_indexed_whole_in_windows(built, tmp_path):
    """A document longer than max_length: every token indexed; the codes of each window
    are those of the model run on that window alone (naive: one forward per window)."""
    model, tok = built["model"], built["tok"]
    texts = [line for line in built["corpus"].read_text().splitlines() if line.strip()]
    long_doc = " ".join(texts[:6])
    docs = [texts[7], long_doc, texts[8]]
    L = 16
    path = build_index(model, tok, docs, tmp_path / "ix", max_length=L, batch_size=2)
    ids = [tok(t)["input_ids"] for t in docs]
    assert len(ids[1]) > 3 * L
    with CodeIndex.open(path) as ix:
        assert ix.num_tokens == sum(len(i) for i in ids)  # nothing cut
        assert np.diff(ix.doc_rows).tolist() == [len(i) for i in ids]
        layer = model.site(HEADS)
        for start in range(0, len(ids[1]), L):
            window = ids[1][start:start + L]
            with torch.no_grad():
                model(input_ids=torch.tensor([window]))
            want = layer.last_codes.reshape(len(window), -1)
            for p in (0, len(window) - 1):
                got = np.asarray(ix.codes_at(1, start + p)[HEADS]).reshape(-1)
                assert got.tolist() == want[p].tolist(), (start, p)
        # the neuron baseline runs the same windows: one row per indexed token
        acts = ix.neuron_activations(model, tok, HEADS)
        assert acts.shape[0] == ix.num_tokens


def test_cli_index_keeps_documents_beyond_the_model_positions(built, tmp_path):
    """`index` on a document longer than the model's 256 positions indexes all of it."""
    text = " ".join(line for line in built["corpus"].read_text().splitlines() if line.strip())
    n = len(built["tok"](text)["input_ids"])
    assert n > 256
    f = tmp_path / "long.txt"
    f.write_text(text + "\n")
    assert main(["index", str(built["codebooks"]), "--files", str(f), "--out",
                 str(tmp_path / "ix")]) == 0
    with CodeIndex.open(tmp_path / "ix") as ix:
        assert ix.num_docs == 1 and ix.num_tokens == n


# ---------------------------------------------------------------- damaged shards
@pytest.mark.parametrize("damage", ["truncated grid", "garbage parquet", "changed counts"])
def test_damaged_shard_is_found_on_open_and_rebuilt_by_index(built, tmp_path, capsys,
                                                             damage):
    ix = tmp_path / "idx"
    shutil.copytree(built["index"], ix)
    meta = read_json(ix / META_NAME)
    assert len(meta["shards"]) >= 2 and all("checks" in s for s in meta["shards"])
    if damage == "truncated grid":
        f = ix / shard_file(1, "grid")
        f.write_bytes(f.read_bytes()[:200])
    elif damage == "garbage parquet":
        f = ix / shard_file(1, "codes")
        f.write_bytes(b"not parquet at all" * (f.stat().st_size // 18 + 1))
    else:  # same size, other bytes: only the checksum tells
        f = ix / shard_file(1, "counts")
        a = np.load(f)
        a[0] += 1
        np.save(f, a)
    with pytest.raises(CodebookError, match=rf"shard 1 is damaged \({f.name} .*\); rerun "
                       r"`codebook-features index`"):
        CodeIndex.open(ix)
    capsys.readouterr()
    assert main(["search", str(ix), "--site", HEADS, "--code", "1"]) == 2
    assert "shard 1 is damaged" in last_line(capsys.readouterr().err)
    # the same `index` command repairs it: the damaged shard rebuilt, the others kept
    kept = (ix / shard_file(0, "grid")).stat().st_mtime_ns
    assert main(["index", str(built["codebooks"]), "--files", str(built["corpus"]), "--out",
                 str(ix), "--shard-tokens", "300"]) == 0
    err = capsys.readouterr().err
    assert f"shard 1 of {ix} is damaged ({f.name}" in err and "rebuilding it" in err
    assert (ix / shard_file(0, "grid")).stat().st_mtime_ns == kept
    assert_same_index(ix, built["index"])
    CodeIndex.open(ix).close()


# ---------------------------------------------------------------- search -n
def test_search_topics_honours_n(built, capsys):
    with CodeIndex.open(built["index"]) as ix:
        topics = ix.topic_codes(HEADS, 0.05)
    assert len(topics) > 1
    capsys.readouterr()
    assert main(["search", str(built["index"]), "--site", HEADS, "--topics", "0.05", "-n",
                 "1", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    first = next(iter(topics))
    assert list(out) == [str(first)] and out[str(first)] == [list(r) for r in topics[first]]
    assert main(["search", str(built["index"]), "--site", HEADS, "--topics", "0.05", "-n",
                 "1"]) == 0
    assert f"({len(topics)} of 30 documents; the first 1 shown)" in capsys.readouterr().out


# ---------------------------------------------------------------- browse refusals
def test_browse_refuses_before_serving(built, tmp_path, capsys):
    def err_of(*args):
        capsys.readouterr()
        assert main(["browse", *args]) == 2
        return last_line(capsys.readouterr().err)

    ix = str(built["index"])
    assert "--port 99999: not a port; pass one of 1-65535" in err_of(ix, "--port", "99999")
    assert "--port 0: not a port" in err_of(ix, "--port", "0")
    assert "no code index there" in err_of(str(tmp_path / "missing"))
    (tmp_path / "notindex").mkdir()
    assert "no code index there" in err_of(str(tmp_path / "notindex"))
    bad = tmp_path / "cb"
    shutil.copytree(built["codebooks"], bad)
    (bad / "codebooks.safetensors").write_bytes(b"\0" * 50)
    assert "cannot read safetensors" in err_of(ix, "--model", str(bad), "--port", "1")


# ---------------------------------------------------------------- untrusted requests
@pytest.fixture(scope="module")
def client(built):
    from starlette.testclient import TestClient

    from codebook_features.browser import create_app

    with TestClient(create_app(built["index"])) as c:
        yield c


def _error(r, status=400):
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_requests_are_bounded_and_checked(client):
    from codebook_features.browser import app as A

    assert "at most 1000" in _error(client.get("/api/regex", params={
        "site": HEADS, "regex": "a" * (A.MAX_TEXT + 1)}))
    assert "at most 1000" in _error(client.get("/api/token", params={
        "site": HEADS, "token": "a" * (A.MAX_TEXT + 1)}))
    for name, value in (("n", "0"), ("n", "501"), ("n", "1" * 40), ("code", "-1"),
                        ("group", "-3"), ("window", "65")):
        params = {"site": HEADS, "code": "1", name: value}
        assert _error(client.get("/api/code", params=params)), (name, value)
    assert "out of range" in _error(client.get("/api/codes_at", params={"doc": -1, "pos": 0}))
    big = {"prompt": "x" * (A.MAX_BODY + 10), "codes": [f"{HEADS}:1"]}
    assert "request body is over" in _error(client.post("/api/steer", json=big))
    too_many = {"prompt": "x", "codes": [f"{HEADS}:1"] * (A.MAX_STEER_CODES + 1)}
    assert f"at most {A.MAX_STEER_CODES}" in _error(client.post("/api/steer", json=too_many))
    for bad in ({"temperature": "hot"}, {"temperature": 1e9}, {"temperature": True},
                {"seed": 2 ** 70}, {"max_new_tokens": 10_000}, {"num_samples": 99},
                {"prompt": 5}, {"positions": ["x"]}, {"mode": ["append"]}):
        body = {"prompt": "x", "codes": [f"{HEADS}:1"], **bad}
        assert _error(client.post("/api/steer", json=body)), bad


def test_catastrophic_regex_is_stopped(client, monkeypatch):
    """A pattern that backtracks exponentially ends with a 400 line, not a stuck server."""
    from codebook_features.browser import app as A

    monkeypatch.setattr(A, "REGEX_SECONDS", 0.2)
    slow = r"([a-z ]|[a-z ][a-z ])*[0-9#]"  # exponential backtracking on every word run
    err = _error(client.get("/api/regex", params={"site": HEADS, "regex": slow}))
    assert "took longer than 0.2 s" in err and "simplify the pattern" in err
    ok = client.get("/api/regex", params={"site": HEADS, "regex": r"\bonce\b"})
    assert ok.status_code == 200 and ok.json()["positives"] > 0


def test_only_its_own_files_are_served(client):
    for url in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
                "/static/%2e%2e/%2e%2e/errors.py", "/../pyproject.toml", "/static//etc/passwd"):
        r = client.get(url)
        assert r.status_code == 404, url
        assert "import" not in r.text and "root:" not in r.text
    assert client.get("/static/app.js").status_code == 200


def test_browse_listens_on_loopback_by_default():
    from codebook_features.cli import build_parser

    args = build_parser().parse_args(["browse", "idx"])
    assert args.host == "127.0.0.1"
