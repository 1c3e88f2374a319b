"""Code index at scale: build time, memory and disk, then the latency of every browser query.

Builds an index of ``--tokens`` tokens (default 1M) of generated stories with a tiny randomly
initialised GPT-NeoX (8 layers, codebooks on ``attn_heads`` and ``mlp_out`` of every layer:
16 sites, k=8) through the real ``build_index`` path, then times every HTTP endpoint of the
code browser (``codebook-features browse``) on it through Starlette's TestClient: the median
and the max over ``--runs`` runs, and the first (cold) call. Prints JSON lines.

    .venv/bin/python benchmarks/index_scale.py                 # 1M tokens
    .venv/bin/python benchmarks/index_scale.py --quick         # 50k tokens, 3 runs
    .venv/bin/python benchmarks/index_scale.py --out runs/scale  # keep (and reuse) the index

With ``--out`` the model, codebooks and index stay there; a second run reuses a complete
index (its build figures are read back from ``build.json``) and an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def emit(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


def rss_mib() -> float:
    """Resident memory of this process now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples this process's resident memory every ``interval`` seconds; ``peak`` in MiB."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def disk_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def build(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Generate stories, save a random story model with codebooks, index the stories."""
    import torch
    import transformers as T

    from codebook_features.analysis import build_index
    from codebook_features.experiments.stories import (
        generate_stories,
        tiny_story_model_config,
        train_story_tokenizer,
    )
    from codebook_features.model import CodebookModel

    done = out / "build.json"
    if done.is_file() and (out / "index" / "meta.json").is_file():
        meta = json.loads((out / "index" / "meta.json").read_text())
        if meta.get("complete") and meta.get("num_tokens", 0) >= args.build_tokens:
            return {**json.loads(done.read_text()), "reused": True}
    torch.manual_seed(0)
    # About 70 tokens per story: generate enough, index until the token budget is reached.
    stories = generate_stories(num_stories=max(args.build_tokens // 50, 100), seed=0)
    texts = [s["text"] for s in stories]
    tok = train_story_tokenizer(texts[:2000], vocab_size=1024)
    cfg = tiny_story_model_config(tok, hidden_size=args.hidden, num_layers=args.layers,
                                  num_heads=args.heads)
    base = T.GPTNeoXForCausalLM(cfg).eval()
    base.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    model = CodebookModel(base, placements=args.placements.split(","),
                          num_codes=args.num_codes, k=args.k).eval()
    model.save_codebooks(out / "codebooks", base_model_name=str((out / "model").resolve()))
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    total, n = 0, 0
    while n < len(texts) and total < args.build_tokens:
        total += lengths[n]
        n += 1
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        build_index(model, tok, texts[:n], out / "index", shard_tokens=args.shard_tokens,
                    batch_size=args.batch_size, codebooks=out / "codebooks")
    seconds = time.perf_counter() - t0
    meta = json.loads((out / "index" / "meta.json").read_text())
    rows = meta["num_tokens"] * sum(s["groups"] * s["k"] for s in meta["sites"])
    res = {"event": "build", "tokens": meta["num_tokens"], "docs": meta["num_docs"],
           "sites": len(meta["sites"]), "code_rows": rows,
           "placements": args.placements, "layers": args.layers, "heads": args.heads,
           "k": args.k, "num_codes": args.num_codes, "shard_tokens": args.shard_tokens,
           "seconds": round(seconds, 1), "tokens_per_s": round(meta["num_tokens"] / seconds),
           "peak_rss_mib": round(peak.peak),
           "peak_rss_lifetime_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                          / 1024),
           "disk_mib": round(disk_mib(out / "index")), "torch_threads": threads}
    done.write_text(json.dumps(res))
    return res


def tile(src: Path, dst: Path, tokens: int) -> dict[str, Any]:
    """An index of at least ``tokens`` tokens made of copies of ``src``'s shards, document ids
    shifted per copy (same layout and sizes as a real one; the grids are hard links)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    meta = json.loads((src / "meta.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    shards, docs, total, sid = [], 0, 0, 0
    while total < tokens:
        for sh in meta["shards"]:
            shift = docs - sh["first_doc"]
            files = {}
            for kind, name in sh["files"].items():
                new = name.replace(f"shard-{sh['id']:05d}", f"shard-{sid:05d}")
                files[kind] = new
                if (dst / new).exists():
                    continue
                if name.endswith(".npy"):
                    os.link(src / name, dst / new)
                    continue
                t = pq.read_table(src / name)
                i = t.schema.get_field_index("doc")
                t = t.set_column(i, "doc", pc.add(t.column("doc"), shift))
                pq.write_table(t, dst / new, row_group_size=131_072, compression="zstd")
            shards.append({**sh, "id": sid, "first_doc": docs,
                           "end_doc": sh["end_doc"] + shift, "files": files})
            docs, total, sid = sh["end_doc"] + shift, total + sh["tokens"], sid + 1
            if total >= tokens:
                break
    meta = {**meta}
    meta.update(shards=shards, num_docs=docs, num_tokens=total, complete=True)
    (dst / "meta.json").write_text(json.dumps(meta))
    return {"event": "tiled", "from_tokens": int(meta_tokens(src)), "tokens": total,
            "docs": docs, "shards": len(shards), "disk_mib": round(disk_mib(dst))}


def meta_tokens(index: Path) -> int:
    return sum(s["tokens"] for s in json.loads((index / "meta.json").read_text())["shards"])


def queries(index: Path, model_dir: Path | None, runs: int) -> None:
    """Time every browser endpoint on ``index`` (the model loaded if ``model_dir``)."""
    from starlette.testclient import TestClient

    from codebook_features.analysis import CodeIndex
    from codebook_features.browser.app import create_app

    with CodeIndex.open(index) as ix:
        sites = ix.sites
        site = sites[-1]  # the last layer's mlp_out
        regex_site = sites[0]
    t0 = time.perf_counter()
    app = create_app(index, model=model_dir)
    client = TestClient(app)
    client.__enter__()
    emit(event="open", seconds=round(time.perf_counter() - t0, 3),
         model=model_dir is not None, rss_mib=round(rss_mib()))

    def get(url: str, **params: Any) -> Any:
        r = client.get(url, params=params)
        if r.status_code != 200:
            raise SystemExit(f"{url} {params}: {r.status_code} {r.text}")
        return r.json()

    def post(url: str, body: dict[str, Any]) -> Any:
        r = client.post(url, json=body)
        if r.status_code != 200:
            raise SystemExit(f"{url}: {r.status_code} {r.text}")
        return r.json()

    fresh_count = [0]

    def fresh(pattern: str) -> str:
        fresh_count[0] += 1
        return "(?:" * fresh_count[0] + pattern + ")" * fresh_count[0]

    top = get("/api/regex", site=site, regex=r"\bdragons?\b", n=50)["matches"]
    code = top[0] if top else {"group": 0, "code": 0}
    ctx = get("/api/code", site=site, group=code["group"], code=code["code"])["contexts"]
    doc, pos = (ctx[0]["doc"], ctx[0]["position"]) if ctx else (0, 1)
    calls: list[tuple[str, Any]] = [
        ("info", lambda: get("/api/info")),
        # Each run a new pattern string (same matches): the index's regex cache never hits.
        ("regex", lambda: get("/api/regex", site=site, regex=fresh(r"\bdragons?\b"), n=50)),
        ("regex_common", lambda: get("/api/regex", site=regex_site, regex=fresh(r"\bthe\b"),
                                     n=50)),
        ("regex_cached", lambda: get("/api/regex", site=regex_site, regex=r"\bthe\b", n=50)),
        ("regex_neurons", lambda: get("/api/regex", site=site, regex=r"\bdragons?\b", n=50,
                                      neurons=1)),
        ("token", lambda: get("/api/token", site=site, token="dragon", n=50)),
        ("code", lambda: get("/api/code", site=site, group=code["group"], code=code["code"])),
        ("code_heads", lambda: get("/api/code", site=regex_site, group=1, code=3)),
        ("codes_at", lambda: get("/api/codes_at", doc=doc, pos=pos)),
        ("similar", lambda: get("/api/similar", site=site, group=code["group"],
                                code=code["code"])),
        ("bad_regex", lambda: client.get("/api/regex", params={"site": site,
                                                                "regex": "(dragon"})),
    ]
    if model_dir is not None:
        body = {"prompt": "Once upon a time,", "codes": [f"{site}:{code['group']}:"
                                                         f"{code['code']}"],
                "max_new_tokens": 20, "num_samples": 1}
        calls.append(("steer_20_tokens", lambda: post("/api/steer", body)))
    else:
        calls = [c for c in calls if c[0] not in ("regex_neurons", "similar")]
    for name, call in calls:
        times = []
        for _ in range(runs + 1):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        warm = times[1:]
        emit(event="query", name=name, cold_ms=round(times[0] * 1000, 1),
             median_ms=round(statistics.median(warm) * 1000, 1),
             max_ms=round(max(warm) * 1000, 1), runs=len(warm))
    client.__exit__(None, None, None)
    emit(event="memory", rss_mib=round(rss_mib()),
         peak_rss_lifetime_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000, help="index size to query")
    p.add_argument("--build-tokens", type=int,
                   help="tokens to index with the model (default: --tokens); when fewer, the "
                        "built shards are copied (document ids shifted) up to --tokens")
    p.add_argument("--index", help="time the queries on this existing index instead (its "
                                   "recorded codebooks are loaded)")
    p.add_argument("--quick", action="store_true", help="50k tokens, 3 runs")
    p.add_argument("--out", help="folder for model, codebooks and index (default: temporary)")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--placements", default="attn_heads,mlp_out")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--num-codes", type=int, default=1024)
    p.add_argument("--shard-tokens", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-model", action="store_true", help="serve the index without a model")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.runs = min(args.tokens, 50_000), 3
    args.build_tokens = min(args.build_tokens or args.tokens, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.index:
            index = Path(args.index)
            meta = json.loads((index / "meta.json").read_text())
            model = None if args.no_model or not meta.get("codebooks") else \
                Path(meta["codebooks"])
        else:
            emit(**build(args, out))
            index, model = out / "index", None if args.no_model else out / "codebooks"
        if meta_tokens(index) < args.tokens:
            emit(**tile(index, out / "tiled", args.tokens))
            index = out / "tiled"
        queries(index, model, args.runs)


if __name__ == "__main__":
    main()
