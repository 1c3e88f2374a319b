"""The code browser: a JSON API over a code index (and, optionally, its model) plus one page.

``create_app(index, model=None)`` returns a Starlette application:

    GET  /                      the page (static/index.html, plain JS and CSS)
    GET  /api/info              the index (sites, sizes) and whether a model is loaded
    GET  /api/regex             codes of a site by precision/recall on a regex's matches
    GET  /api/token             the same against the positions of one token
    GET  /api/code              a code: frequency, tokens, the tokens after it in the text, the
                                next tokens the model predicts there, top contexts (tokens)
    GET  /api/similar           the nearest codes of the same codebook group (needs the model)
    GET  /api/codes_at          the codes at one token, every site
    POST /api/steer             unsteered and steered continuations of a prompt (needs it too)

Every answer is JSON; bad input gives status 400 and ``{"error": "one line"}``, anything else
that fails 500 and the same shape, and the server keeps serving. Every request is untrusted:
each parameter is checked (type and range), and the work one request can ask for is bounded
(rows returned, context windows, text lengths, a time limit on each regex, steering codes,
samples and tokens, the request body's size); only the page and its own static files are
served; ``browse`` listens on the loopback address unless told otherwise. Queries run on the index's
Parquet files (DuckDB) and its memory-mapped code grid (see :mod:`..analysis.index`); one
lock serialises them, since a DuckDB connection serves one query at a time; another lock
serialises the model's work (steering, similar codes), so a generation does not hold up index
queries.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import CodebookError

STATIC = Path(__file__).with_name("static")
MAX_N = 500
"""Most rows one query returns."""
MAX_TEXT = 1_000
"""Longest regex or token text a query may give (characters)."""
REGEX_SECONDS = 5.0
"""Time one regex query may take over the whole index."""
MAX_PROMPT = 4_000
"""Longest steering prompt (characters)."""
MAX_STEER_CODES = 32
"""Most codes one steering request may force on."""
MAX_BODY = 64 << 10
"""Largest request body (bytes)."""
NEURON_WARM_BYTES = 256 << 20
"""Neuron activations of every site are computed at start when they fit in this."""


class Browser:
    """The state behind the API: the index (opened lazily, so a page can report why it does
    not open) and the model with its tokenizer (None when not given or not loadable)."""

    def __init__(self, index: str | os.PathLike, model: str | os.PathLike | None = None,
                 neuron_tokens: int = 10_000) -> None:
        self.path = Path(index)
        self.model_dir = None if model is None else Path(model)
        self.neuron_tokens = int(neuron_tokens)
        self.lock = threading.RLock()
        self.model_lock = threading.RLock()
        self._open_lock = threading.Lock()
        self._index: Any = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.model_error: str | None = None
        self._model_tried = False
        self._neurons: dict[str, Any] = {}

    # ----------------------------------------------------------------- loading
    @property
    def index(self) -> Any:
        """The open CodeIndex; raises the CodebookError that explains why it does not open."""
        from ..analysis import CodeIndex

        with self._open_lock:
            if self._index is None:
                self._index = CodeIndex.open(self.path)
                self._load_model()
        return self._index

    def _load_model(self) -> None:
        """Load the model given, or the one recorded in the index; keep the reason if none."""
        if self._model_tried:
            return
        self._model_tried = True
        meta = self._index.meta
        where = self.model_dir
        if where is None and meta.get("codebooks"):
            where = Path(meta["codebooks"])
            if not where.is_dir():
                self.model_error = (f"no model: the index names codebooks at {where}, which "
                                    "is gone; start with --model CODEBOOKS_DIR")
                return
        if where is None:
            self.model_error = ("no model loaded: start with --model CODEBOOKS_DIR for "
                                "steering, similar codes and the neuron baseline")
            return
        try:
            from transformers import AutoTokenizer

            from ..analysis.index import check_model
            from ..model import CodebookModel

            model = CodebookModel.from_pretrained(where).eval()
            check_model(meta, model, self.path)
            name = meta.get("tokenizer") or model.base_info()["name_or_path"]
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = model
            if self._index.tokenizer is None:  # names predicted tokens absent from the text
                self._index.tokenizer = self.tokenizer
        except CodebookError as e:
            self.model_error = f"model not loaded: {e}"
        except Exception as e:  # a broken folder, a missing tokenizer: the index still serves
            self.model_error = f"model not loaded from {where}: {type(e).__name__}: {one_line(e)}"

    def warm_up(self) -> None:
        """Open the index (and load the model) now; a failure is kept for the page to show."""
        try:
            ix = self.index
            ix.doc_rows, ix.counts, ix.vocab  # noqa: B018 - the caches the first queries need
            ix._token_columns()
            ix.predictions  # noqa: B018 - None for an index without predictions
            for i in range(len(ix.meta["shards"])):
                ix._shard_text(i)
            self._warm_neurons(ix)
        except CodebookError:
            pass

    def _warm_neurons(self, ix: Any) -> None:
        """Every site's neuron activations from one pass of the model, when they fit in
        NEURON_WARM_BYTES (else each site's are computed on its first neuron query)."""
        if self.model is None:
            return
        dims = sum(self.model.site(site).config.dim for site in ix.sites)
        if 4 * dims * min(self.neuron_tokens, ix.num_tokens) > NEURON_WARM_BYTES:
            return
        with self.model_lock:
            self._neurons.update(ix.neuron_activations_at(
                self.model, self.tokenizer, list(ix.sites), batch_size=16,
                max_tokens=self.neuron_tokens))

    def need_model(self, what: str) -> Any:
        self.index  # noqa: B018 - opening the index loads the model
        if self.model is None:
            raise CodebookError(f"{what} needs the model; {self.model_error}")
        return self.model

    def neurons(self, site: str) -> Any:
        """Neuron activations of ``site`` on the index's first ``neuron_tokens`` tokens."""
        self.need_model("the neuron baseline")
        if site not in self._neurons:
            self._neurons[site] = self.index.neuron_activations(
                self.model, self.tokenizer, site, batch_size=16, max_tokens=self.neuron_tokens)
        return self._neurons[site]

    def close(self) -> None:
        if self._index is not None:
            self._index.close()


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:500] + ("..." if len(text) > 500 else "")


# ------------------------------------------------------------------ parameters
def _str(params: Any, name: str, default: str | None = None, limit: int = MAX_TEXT) -> str:
    v = params.get(name, default)
    if v is None:
        raise CodebookError(f"missing parameter {name!r}")
    if not isinstance(v, str):
        raise CodebookError(f"parameter {name} must be a string")
    if len(v) > limit:
        raise CodebookError(f"parameter {name} is {len(v)} characters long; at most {limit}")
    return v


def _int(params: Any, name: str, default: int | None = None, lo: int | None = None,
         hi: int | None = None) -> int:
    v = params.get(name, default)
    if v is None or v == "":
        raise CodebookError(f"missing parameter {name!r}")
    if isinstance(v, bool) or not isinstance(v, int | str) or (
            isinstance(v, str) and len(v) > 30):
        raise CodebookError(f"parameter {name}={str(v)[:40]!r} is not an integer")
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise CodebookError(f"parameter {name}={v!r} is not an integer") from None
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        raise CodebookError(f"parameter {name}={n} out of range [{lo}, {hi}]")
    return n


def _bool(params: Any, name: str) -> bool:
    return str(params.get(name, "")).lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------- handlers
def _match_rows(matches: list[Any]) -> list[dict[str, Any]]:
    return [asdict(m) for m in matches]


def info(b: Browser, q: Any) -> dict[str, Any]:
    ix = b.index
    meta = ix.meta
    return {"index": str(b.path), "num_tokens": ix.num_tokens, "num_docs": ix.num_docs,
            "sites": meta["sites"], "base_model": meta["base_model"],
            "model": b.model is not None, "model_error": b.model_error,
            "neuron_tokens": b.neuron_tokens}


def regex(b: Browser, q: Any) -> dict[str, Any]:
    site, pattern = _str(q, "site"), _str(q, "regex")
    if not pattern:
        raise CodebookError("the regex is empty; type a pattern")
    n = _int(q, "n", 50, 1, MAX_N)
    neurons = b.neurons(site) if _bool(q, "neurons") else None
    ix = b.index
    rows = len(ix.regex_rows(pattern, timeout=REGEX_SECONDS))  # cached for regex_search
    return {"positives": rows, "matches": _match_rows(
        ix.regex_search(pattern, site, n=n, neurons=neurons))}


def token(b: Browser, q: Any) -> dict[str, Any]:
    site, tok = _str(q, "site"), _str(q, "token")
    n = _int(q, "n", 50, 1, MAX_N)
    neurons = b.neurons(site) if _bool(q, "neurons") else None
    return {"matches": _match_rows(b.index.token_search(tok, site, n=n, neurons=neurons))}


def code(b: Browser, q: Any) -> dict[str, Any]:
    site = _str(q, "site")
    group, c = _int(q, "group", 0, 0), _int(q, "code", None, 0)
    n = _int(q, "n", 20, 1, MAX_N)
    window = _int(q, "window", 8, 0, 64)
    ix = b.index
    stats = ix.code_stats(site, c, group, top=10)
    contexts = ix.top_contexts(site, c, group, n=n, window=window)
    pieces = ix.windows([(x.doc, x.position) for x in contexts], window)
    return {"site": site, "group": group, "code": c, "stats": asdict(stats),
            "contexts": [{**asdict(x), "tokens": p} for x, p in zip(contexts, pieces,
                                                                     strict=True)]}


def similar(b: Browser, q: Any) -> dict[str, Any]:
    site = _str(q, "site")
    group, c = _int(q, "group", 0, 0), _int(q, "code", None, 0)
    n = _int(q, "n", 10, 1, 100)
    model = b.need_model("similar codes")
    rows = b.index.similar_codes(site, c, group=group, n=n, model=model)
    return {"similar": [{"code": i, "similarity": s} for i, s in rows]}


def codes_at(b: Browser, q: Any) -> dict[str, Any]:
    doc, pos = _int(q, "doc", None, 0), _int(q, "pos", None, 0)
    window = _int(q, "window", 8, 0, 64)
    ix = b.index
    codes = ix.codes_at(doc, pos)
    tokens = ix.windows([(doc, pos)], window)[0]
    token = next(t["text"] for t in tokens if t["pos"] == pos)
    return {"doc": doc, "position": pos, "token": token, "tokens": tokens,
            "sites": [{"name": s, "groups": g} for s, g in codes.items()]}


async def steer(b: Browser, request: Request) -> dict[str, Any]:
    import json

    raw = bytearray()
    async for chunk in request.stream():  # read no more than MAX_BODY, whatever it claims
        raw += chunk
        if len(raw) > MAX_BODY:
            raise CodebookError(f"the request body is over {MAX_BODY} bytes")
    try:
        body = json.loads(bytes(raw))
    except ValueError:
        raise CodebookError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise CodebookError("the request body must be a JSON object")
    await _in_thread(b, lambda: b.index)  # opened (and the model loaded) under the index lock
    return await _in_thread(b, lambda: _steer(b, body), model=True)


def _steer(b: Browser, body: dict[str, Any]) -> dict[str, Any]:
    from ..steering import parse_steer_code, steer_generate

    model = b.need_model("steering")
    specs = body.get("codes") or []
    if not isinstance(specs, list) or not specs:
        raise CodebookError("no codes to steer with; add codes from a code's page")
    if len(specs) > MAX_STEER_CODES:
        raise CodebookError(f"{len(specs)} codes to steer with; at most {MAX_STEER_CODES}")
    codes = [parse_steer_code(_str({"code": s}, "code", limit=200)) for s in specs]
    for c in codes:
        b.index._code(c.site, c.code, c.group)  # unknown site/group/code: one line
    prompt = _str(body, "prompt", "", limit=MAX_PROMPT)
    positions = body.get("positions", "all")
    if isinstance(positions, list):
        if len(positions) > 1024 or not all(isinstance(p, int) and not isinstance(p, bool)
                                            and 0 <= p < 1 << 20 for p in positions):
            raise CodebookError("positions must be all, prompt, generated, or a list of at "
                                "most 1024 token positions")
    else:
        positions = _str(body, "positions", "all", limit=20)
    opts = {"mode": _str(body, "mode", "append", limit=20),
            "positions": positions,
            "max_new_tokens": _int(body, "max_new_tokens", 40, 1, 200),
            "num_samples": _int(body, "num_samples", 1, 1, 8),
            "seed": _int(body, "seed", 0, 0, 2**63 - 1)}
    t = body.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 100:
        raise CodebookError("temperature must be a number in (0, 100]")
    opts["temperature"] = float(t)
    plain = steer_generate(model, b.tokenizer, prompt, [], **opts)
    steered = steer_generate(model, b.tokenizer, prompt, codes, **opts)
    return {"prompt": prompt, "codes": [str(c) for c in codes], "unsteered": plain,
            "steered": steered}


# ---------------------------------------------------------------- application
async def _in_thread(b: Browser, fn: Callable[[], Any], model: bool = False) -> Any:
    from starlette.concurrency import run_in_threadpool

    def locked() -> Any:
        with b.model_lock if model else b.lock:
            return fn()

    return await run_in_threadpool(locked)


def _endpoint(b: Browser, handler: Callable[..., Any], is_async: bool = False,
              model: bool = False) -> Any:
    async def run(request: Request) -> JSONResponse:
        try:
            if is_async:
                out = await handler(b, request)
            else:
                out = await _in_thread(b, lambda: handler(b, request.query_params), model)
            return JSONResponse(out)
        except CodebookError as e:
            return JSONResponse({"error": one_line(e)}, status_code=400)
        except Exception as e:  # the server keeps serving whatever a query hits
            return JSONResponse({"error": f"internal error: {type(e).__name__}: "
                                          f"{one_line(e)}"}, status_code=500)

    return run


async def _not_found(request: Request) -> JSONResponse:
    return JSONResponse({"error": f"no such API endpoint: {request.url.path}"}, status_code=404)


def create_app(index: str | os.PathLike, model: str | os.PathLike | None = None,
               neuron_tokens: int = 10_000) -> Starlette:
    """The browser application for the code index at ``index``; ``model``: the codebooks
    folder (default: the one recorded in the index, if any)."""
    b = Browser(index, model, neuron_tokens)

    async def page(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    routes = [
        Route("/", page),
        Route("/api/info", _endpoint(b, info)),
        Route("/api/regex", _endpoint(b, regex)),
        Route("/api/token", _endpoint(b, token)),
        Route("/api/code", _endpoint(b, code)),
        Route("/api/similar", _endpoint(b, similar, model=True)),
        Route("/api/codes_at", _endpoint(b, codes_at)),
        Route("/api/steer", _endpoint(b, steer, is_async=True), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/api/{rest:path}", _not_found, methods=["GET", "POST"]),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await _in_thread(b, b.warm_up)  # open the index and load the model before serving
        yield
        b.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.browser = b
    return app
