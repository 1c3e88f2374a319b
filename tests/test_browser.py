"""The code browser: every API endpoint (good and bad input) through Starlette's TestClient,
then the page end to end in headless Chromium against `codebook-features browse`."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import transformers as T
from tiny_models import story_codebooks

from codebook_features.analysis import CodeIndex, build_index
from codebook_features.io import read_json, write_json
from codebook_features.model import CodebookModel

HEADS = "layers.0.attn_heads"
MLP = "layers.0.mlp_out"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny story model with codebooks saved, and its index (which records the codebooks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("browser")
    corpus, tok, model = story_codebooks(root, num_stories=60, seed=5)
    texts = [line for line in corpus.read_text().splitlines() if line.strip()]
    build_index(model, tok, texts, root / "idx", shard_tokens=800, batch_size=8,
                codebooks=root / "cb")
    yield {"root": root, "index": root / "idx", "codebooks": root / "cb", "model": model,
           "tok": tok}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(built):
    from starlette.testclient import TestClient

    from codebook_features.browser import create_app

    with TestClient(create_app(built["index"])) as c:  # the model: recorded in the index
        yield c


def _ok(r):
    assert r.status_code == 200, r.text
    return r.json()


def _error(r, status=400):
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert msg and "\n" not in msg
    return msg


def test_api(built, client):
    info = _ok(client.get("/api/info"))
    assert info["model"] and info["model_error"] is None
    assert [s["name"] for s in info["sites"]] == [HEADS, MLP]
    with CodeIndex.open(built["index"], model=built["model"], tokenizer=built["tok"]) as ix:
        assert info["num_tokens"] == ix.num_tokens
        got = _ok(client.get("/api/regex", params={"site": HEADS, "regex": r"\bonce\b",
                                                    "n": 5}))
        want = ix.regex_search(r"\bonce\b", HEADS, n=5)
        assert [(m["group"], m["code"], m["precision"], m["recall"]) for m in got["matches"]] \
            == [(m.group, m.code, m.precision, m.recall) for m in want]
        assert got["positives"] == ix.regex_positions(r"\bonce\b").num_rows
        tokens = _ok(client.get("/api/token", params={"site": MLP, "token": "dragon"}))
        assert [(m["group"], m["code"]) for m in tokens["matches"]] == \
            [(m.group, m.code) for m in ix.token_search("dragon", MLP, n=50)]
        g, c = want[0].group, want[0].code
        page = _ok(client.get("/api/code", params={"site": HEADS, "group": g, "code": c,
                                                   "n": 4}))
        stats = ix.code_stats(HEADS, c, g)
        assert page["stats"]["count"] == stats.count
        assert page["stats"]["tokens"] == [list(t) for t in stats.tokens]
        assert page["stats"]["next_tokens"] == [list(t) for t in stats.next_tokens]
        assert stats.predicted_next_tokens  # the model's own next-token guesses
        assert page["stats"]["predicted_next_tokens"] == \
            [list(t) for t in stats.predicted_next_tokens]
        ctx = page["contexts"]
        assert len(ctx) == min(4, stats.count)
        for x in ctx:  # the firing token is one of the pieces, at its position
            assert x["position"] in [t["pos"] for t in x["tokens"]]
            hit = next(t for t in x["tokens"] if t["pos"] == x["position"])
            assert hit["text"].endswith(x["token"])
        at = _ok(client.get("/api/codes_at", params={"doc": ctx[0]["doc"],
                                                     "pos": ctx[0]["position"]}))
        assert {s["name"]: s["groups"] for s in at["sites"]} == \
            ix.codes_at(ctx[0]["doc"], ctx[0]["position"])
        assert c in at["sites"][0]["groups"][g]
        sim = _ok(client.get("/api/similar", params={"site": HEADS, "group": g, "code": c,
                                                     "n": 3}))
        assert [(s["code"], pytest.approx(s["similarity"])) for s in sim["similar"]] == \
            ix.similar_codes(HEADS, c, group=g, n=3, model=built["model"])
    neur = _ok(client.get("/api/regex", params={"site": MLP, "regex": r"\bonce\b", "n": 3,
                                                "neurons": 1}))
    assert all(0 <= m["neuron_precision"] <= 1 for m in neur["matches"])
    # the neurons were computed at start, for every site in one pass, and equal a fresh run
    b = client.app.state.browser
    assert set(b._neurons) == {HEADS, MLP}
    with CodeIndex.open(built["index"], model=built["model"]) as ix:
        fresh = ix.neuron_activations(built["model"], built["tok"], MLP,
                                      max_tokens=b.neuron_tokens)
        want = ix.regex_search(r"\bonce\b", MLP, n=3, neurons=fresh)
    assert [m["neuron_precision"] for m in neur["matches"]] == \
        pytest.approx([m.neuron_precision for m in want])
    body = {"prompt": "Once upon a time,", "codes": [f"{HEADS}:{g}:{c}", f"{MLP}:5"],
            "max_new_tokens": 6, "num_samples": 2, "seed": 1}
    out = _ok(client.post("/api/steer", json=body))
    assert len(out["unsteered"]) == len(out["steered"]) == 2
    assert out["codes"] == [f"{HEADS}:{g}:{c}", f"{MLP}:0:5"]
    from codebook_features.steering import parse_steer_code, steer_generate

    assert out["steered"] == steer_generate(
        built["model"], built["tok"], body["prompt"], [parse_steer_code(s) for s in
                                                       body["codes"]],
        max_new_tokens=6, num_samples=2, seed=1)


def test_api_bad_input(client):
    bad = [
        (("/api/regex", {"site": HEADS, "regex": "(dragon"}), "does not compile"),
        (("/api/regex", {"site": HEADS, "regex": ""}), "empty"),
        (("/api/regex", {"site": "layers.9.mlp_out", "regex": "x"}), "unknown site"),
        (("/api/regex", {"regex": "x"}), "missing parameter 'site'"),
        (("/api/regex", {"site": HEADS, "regex": "x", "n": "many"}), "not an integer"),
        (("/api/regex", {"site": HEADS, "regex": "x", "n": 0}), "out of range"),
        (("/api/token", {"site": HEADS, "token": " "}), "empty"),
        (("/api/code", {"site": HEADS, "group": 0, "code": 32}), "code 32 out of range"),
        (("/api/code", {"site": HEADS, "group": 9, "code": 1}), "group 9 out of range"),
        (("/api/code", {"site": "nope", "code": 1}), "unknown site"),
        (("/api/similar", {"site": MLP, "group": 0, "code": -1}), "out of range"),
        (("/api/codes_at", {"doc": 10_000, "pos": 0}), "not in the index"),
        (("/api/codes_at", {"doc": 0, "pos": 10_000}), "position 10000"),
    ]
    for (url, params), words in bad:
        assert words in _error(client.get(url, params=params)), (url, params)
    steer = [
        ({"prompt": "x", "codes": []}, "no codes"),
        ({"prompt": "x", "codes": ["garbage"]}, "SITE:GROUP:CODE"),
        ({"prompt": "x", "codes": [f"{HEADS}:0:99"]}, "code 99 out of range"),
        ({"prompt": "x", "codes": ["layers.5.mlp_out:1"]}, "unknown site"),
        ({"prompt": "x", "codes": [f"{MLP}:1"], "mode": "sideways"}, "mode"),
        ({"prompt": 3, "codes": [f"{MLP}:1"]}, "prompt must be a string"),
        ({"prompt": "x", "codes": [f"{MLP}:1"], "max_new_tokens": 0}, "out of range"),
        ([1, 2], "JSON object"),
    ]
    for body, words in steer:
        assert words in _error(client.post("/api/steer", json=body)), body
    assert "not JSON" in _error(client.post("/api/steer", content=b"{not json"))
    assert "no such API endpoint" in _error(client.get("/api/nothing"), 404)
    assert _ok(client.get("/api/info"))["num_docs"] > 0  # still serving
    page = client.get("/")
    assert page.status_code == 200 and "Code browser" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_api_without_model_or_index(built, tmp_path):
    from starlette.testclient import TestClient

    from codebook_features.browser import create_app

    idx = tmp_path / "idx"
    shutil.copytree(built["index"], idx)
    meta = read_json(idx / "meta.json")
    write_json(idx / "meta.json", {**meta, "codebooks": str(tmp_path / "gone")})
    with TestClient(create_app(idx)) as c:
        info = _ok(c.get("/api/info"))
        assert not info["model"] and "is gone" in info["model_error"]
        assert "needs the model" in _error(c.get("/api/similar", params={
            "site": HEADS, "code": 1}))
        assert "needs the model" in _error(c.post("/api/steer", json={
            "prompt": "x", "codes": [f"{HEADS}:1"]}))
        assert _ok(c.get("/api/code", params={"site": HEADS, "code": 1}))["stats"]
    # An index built before predictions were recorded: the statistics come without them.
    import pyarrow.parquet as pq

    old = tmp_path / "old"
    shutil.copytree(built["index"], old)
    for sh in meta["shards"]:
        f = old / sh["files"]["tokens"]
        pq.write_table(pq.read_table(f).drop_columns(["pred_id"]), f)
        sh.pop("checks", None)  # nor the file checks recorded since
    write_json(old / "meta.json", {k: v for k, v in meta.items() if k != "predictions"})
    with TestClient(create_app(old)) as c:
        stats = _ok(c.get("/api/code", params={"site": HEADS, "code": 1}))["stats"]
        assert stats["predicted_next_tokens"] is None and "next_tokens" in stats
    # Codebooks of another model: the index still serves, model features say why not.
    other = tmp_path / "other"
    base = T.AutoModelForCausalLM.from_pretrained(built["root"] / "model")
    CodebookModel(base, placements=["mlp_out"], num_codes=32, k=2).save_codebooks(
        other, base_model_name=str(built["root"] / "model"))
    with TestClient(create_app(built["index"], model=other)) as c:
        info = _ok(c.get("/api/info"))
        assert not info["model"] and "the model the index was built with" in \
            info["model_error"]
        assert "the model the index was built with" in _error(c.post("/api/steer", json={
            "prompt": "x", "codes": [f"{HEADS}:1"]}))
    # Codebooks of the same shapes but other weights (`browse --model`): refused by their
    # fingerprint, the index still serves.
    torch.manual_seed(1234)
    base = T.AutoModelForCausalLM.from_pretrained(built["root"] / "model")
    CodebookModel(base, placements=["attn_heads", "mlp_out"], num_codes=32, k=2).save_codebooks(
        tmp_path / "same_shape", base_model_name=str(built["root"] / "model"))
    with TestClient(create_app(built["index"], model=tmp_path / "same_shape")) as c:
        info = _ok(c.get("/api/info"))
        assert not info["model"] and "other codebook weights" in info["model_error"]
        assert "rebuild the index" in info["model_error"]
        assert "other codebook weights" in _error(c.get("/api/similar", params={
            "site": HEADS, "code": 1}))
        assert _ok(c.get("/api/code", params={"site": HEADS, "code": 1}))["stats"]
    # A half-written index: every call answers the one-line reason, the server lives on.
    write_json(idx / "meta.json", {**meta, "complete": False})
    with TestClient(create_app(idx)) as c:
        assert "incomplete" in _error(c.get("/api/info"))
        assert "incomplete" in _error(c.get("/api/regex", params={"site": HEADS,
                                                                  "regex": "x"}))
        write_json(idx / "meta.json", meta)  # finished meanwhile: the next call opens it
        assert _ok(c.get("/api/info"))["num_docs"] == meta["num_docs"]
    write_json(idx / "meta.json", {**meta, "version": 1})
    with TestClient(create_app(idx)) as c:
        assert "format version 1" in _error(c.get("/api/info"))
    with TestClient(create_app(tmp_path / "nothing")) as c:
        assert "no code index there" in _error(c.get("/api/info"))


# ------------------------------------------------------------------ end to end
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need_browser():
    """Playwright and Debian's Chromium; in CI their absence fails the test."""
    why = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        why = "the playwright package is not installed (pip install -e '.[dev]')"
    if why is None and not Path(CHROMIUM).is_file():
        why = f"{CHROMIUM} is missing (run scripts/setup-browser.sh)"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {why}")
        pytest.skip(why)


@pytest.fixture
def server(built):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "codebook_features", "browse",
                             str(built["index"]), "--model", str(built["codebooks"]),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/api/info", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"browse did not start: {proc.stdout.read()[-2000:]}")
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _count_items(rows):
    """A code page's list of (token, count) as the page writes it."""
    import json

    return [f"{json.dumps(t, ensure_ascii=False)} × {n}" for t, n in rows]


def test_page_end_to_end(built, server, tmp_path):
    _need_browser()
    from playwright.sync_api import expect, sync_playwright

    with CodeIndex.open(built["index"], tokenizer=built["tok"]) as ix:
        by_token = ix.token_search("the", MLP, n=50)  # a whole token here
        assert by_token
        g_tok, c_tok = by_token[0].group, by_token[0].code
        tok_stats = ix.code_stats(MLP, c_tok, g_tok, top=10)
    assert tok_stats.predicted_next_tokens

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(server)
            page.wait_for_selector("body[data-ready='1']")
            # Bad regex: the message is shown, the page keeps working.
            page.fill("#query", "(dragon")
            page.click("#search-btn")
            expect(page.locator("#error")).to_contain_text("does not compile")
            # Regex search -> a code -> its contexts, firing token highlighted.
            page.select_option("#site", HEADS)
            page.fill("#query", r"\bonce\b")
            page.click("#search-btn")
            rows = page.locator("#results tbody tr")
            expect(rows.first).to_be_visible()
            expect(page.locator("#error")).to_be_hidden()
            code = rows.first.locator("td").nth(1).inner_text()
            rows.first.click()
            expect(page.locator("#code-title")).to_contain_text(f"code {code}")
            hits = page.locator("#contexts .tok.hit")
            expect(hits.first).to_be_visible()
            assert hits.count() == page.locator("#contexts .ctx").count()
            # A token -> the codes at that position, every site.
            doc, pos = hits.first.get_attribute("data-doc"), hits.first.get_attribute("data-pos")
            hits.first.click()
            table = page.locator("#codes-at tbody tr")
            expect(table.first).to_be_visible()
            assert table.count() == 2 + 1  # attn_heads (2 groups: heads) + mlp_out
            expect(page.locator("#codes-at-context .tok.here")).to_have_attribute(
                "data-pos", pos)
            assert page.locator("#codes-at-context .tok.here").get_attribute("data-doc") == doc
            group = int(rows.first.locator("td").nth(0).inner_text())
            expect(table.nth(group).locator(".code-link", has_text=re.compile(f"^{code}$"))
                   ).to_have_count(1)
            # Token search: type a token, the codes that fire on it, in the index's order.
            page.select_option("#search-mode", "token")
            page.select_option("#site", MLP)
            page.fill("#query", "the")
            page.click("#search-btn")
            expect(page.locator("#search-summary")).to_contain_text(
                f"{len(by_token)} codes")
            rows = page.locator("#results tbody tr")
            expect(rows).to_have_count(len(by_token))
            assert [(int(rows.nth(i).locator("td").nth(0).inner_text()),
                     int(rows.nth(i).locator("td").nth(1).inner_text()))
                    for i in range(len(by_token))] == [(m.group, m.code) for m in by_token]
            # Open the best one: its statistics, the model's predicted next tokens included.
            rows.first.click()
            expect(page.locator("#code-title")).to_have_text(
                f"{MLP} — group {g_tok}, code {c_tok}")
            expect(page.locator("#code-freq")).to_contain_text(
                f"fires on {tok_stats.count} tokens")
            expect(page.locator("#code-tokens li")).to_have_text(
                _count_items(tok_stats.tokens))
            expect(page.locator("#code-next li")).to_have_text(
                _count_items(tok_stats.next_tokens))
            expect(page.locator("#code-pred-box")).to_be_visible()
            expect(page.locator("#code-pred-box h3")).to_have_text("predicted next")
            expect(page.locator("#code-pred li")).to_have_text(
                _count_items(tok_stats.predicted_next_tokens))
            expect(page.locator("#contexts .tok.hit").first).to_be_visible()
            # Steer from a prompt with that code.
            page.click("#add-steer")
            expect(page.locator("#steer-codes .chip")).to_have_count(1)
            page.fill("#steer-prompt", "Once upon a time,")
            page.fill("#steer-tokens", "8")
            page.click("#steer-btn")
            expect(page.locator("#steer-out-steered li")).to_have_count(2)
            expect(page.locator("#steer-out-unsteered li")).to_have_count(2)
            assert page.locator("#steer-out-steered li").first.inner_text().startswith(
                "Once upon a time,")
            shot = tmp_path / "browser.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("CODEBOOK_SCREENSHOT_DIR"):
                out = Path(os.environ["CODEBOOK_SCREENSHOT_DIR"])
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, out / "browser.png")
        finally:
            browser.close()


def test_browse_port_in_use(built, capsys):
    from codebook_features.cli import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["browse", str(built["index"]), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot listen on 127.0.0.1:{port} (Address already in use); " \
                  "pass another --port or --host"
