"""``codebook-features index`` and ``codebook-features search``: the code index from the shell."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..cli import command


def _index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("codebooks", help="folder written by save_codebooks")
    p.add_argument("--out", required=True, help="index folder (created; an interrupted build "
                                               "resumes)")
    p.add_argument("--base", help="base model folder or hub name (default: the recorded one)")
    p.add_argument("--tokenizer", help="tokenizer (default: the base model's)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--files", nargs="+", help="local .txt / .jsonl / .parquet files")
    src.add_argument("--dataset", help="Hugging Face dataset name")
    p.add_argument("--config", help="dataset config name")
    p.add_argument("--split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-docs", type=int, help="index at most this many documents")
    p.add_argument("--shard-tokens", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=8)


@command("index", "run a codebook model over a corpus and store every token's codes",
         _index_options)
def _index(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ..data.text import load_text
    from ..model import CodebookModel
    from .index import build_index

    model = CodebookModel.from_pretrained(args.codebooks, base_model=args.base).eval()
    name = args.tokenizer or args.base or model.base_info()["name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(name)
    texts = load_text(args.dataset, args.files, args.config, args.split, args.text_column)
    if args.max_docs is not None:
        texts = texts.select(range(min(args.max_docs, len(texts))))
    build_index(model, tokenizer, texts, args.out, shard_tokens=args.shard_tokens,
                batch_size=args.batch_size, text_column=args.text_column,
                codebooks=args.codebooks)
    print(f"indexed {len(texts)} documents into {args.out}")
    return 0


def _search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index folder written by `codebook-features index`")
    p.add_argument("--site", required=True, help="site name, e.g. layers.0.attn_heads")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--regex", help="codes by precision/recall on the regex's matches")
    what.add_argument("--code", type=int, help="one code: statistics and top contexts")
    what.add_argument("--topics", type=float, metavar="MIN_SHARE",
                      help="codes firing on at least this share of a document's tokens")
    p.add_argument("--group", type=int, default=0)
    p.add_argument("-n", type=int, default=10, help="how many results")


@command("search", "query a code index: regex code search, a code's contexts, topic codes",
         _search_options)
def _search(args: argparse.Namespace) -> int:
    from .search import CodeIndex

    index = CodeIndex.open(args.index)
    try:
        if args.regex is not None:
            rows = [asdict(m) for m in index.regex_search(args.regex, args.site, n=args.n)]
            out: object = rows
        elif args.code is not None:
            stats = index.code_stats(args.site, args.code, args.group)
            contexts = index.top_contexts(args.site, args.code, args.group, n=args.n)
            out = {"stats": asdict(stats), "contexts": [asdict(c) for c in contexts]}
        else:
            out = {str(doc): codes for doc, codes in
                   index.topic_codes(args.site, args.topics).items()}
    finally:
        index.close()
    print(json.dumps(out, indent=1, default=str))
    return 0


# `codebook-features browse` (the code browser) registers itself on import.
from ..browser import commands as _browse_command  # noqa: E402, F401
