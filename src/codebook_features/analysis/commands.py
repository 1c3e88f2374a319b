"""``codebook-features index`` and ``codebook-features search``: the code index from the shell."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any


def index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("codebooks", help="folder written by save_codebooks")
    p.add_argument("--out", required=True, help="index folder (created; an interrupted build "
                                               "resumes)")
    p.add_argument("--base", help="base model folder or hub name (default: the recorded one)")
    p.add_argument("--tokenizer", help="tokenizer (default: the base model's)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--files", nargs="+", help="local .txt / .jsonl / .parquet files")
    src.add_argument("--dataset", help="Hugging Face dataset: a hub name or a local "
                                       "dataset folder")
    p.add_argument("--config", help="dataset config name (e.g. wikitext-103-raw-v1)")
    p.add_argument("--split", default="train", help="split to index (%(default)s)")
    p.add_argument("--text-column", default="text",
                   help="column holding the text (.jsonl, .parquet, datasets; %(default)s)")
    p.add_argument("--max-docs", type=int, help="index at most this many documents (the "
                                                  "first ones)")
    p.add_argument("--streaming", action="store_true",
                   help="read the dataset or files as a stream, a batch at a time, instead of "
                        "preparing it on disk first (bounded memory, for large corpora)")
    p.add_argument("--shard-tokens", type=int, default=100_000,
                   help="tokens per shard, whole documents (%(default)s)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="documents per forward pass (%(default)s)")


def run_index(args: argparse.Namespace) -> int:
    from ..data.text import load_text
    from ..errors import CodebookError
    from ..io import load_tokenizer, read_json, writable_dir
    from ..model import CodebookModel
    from .index import META_NAME, build_index

    if args.max_docs is not None and args.max_docs < 1:
        raise CodebookError(f"--max-docs {args.max_docs}: give at least 1")
    writable_dir(args.out)  # unwritable: one line before any work
    texts = load_text(args.dataset, args.files, args.config, args.split, args.text_column,
                      streaming=args.streaming)  # bad data is answered before a model loads
    if args.max_docs is not None:
        texts = texts.take(args.max_docs) if args.streaming else \
            texts.select(range(min(args.max_docs, len(texts))))
    model = CodebookModel.from_pretrained(args.codebooks, base_model=args.base).eval()
    name = args.tokenizer or args.base or model.base_info()["name_or_path"]
    tokenizer = load_tokenizer(name)
    path = build_index(model, tokenizer, texts, args.out, shard_tokens=args.shard_tokens,
                       batch_size=args.batch_size, text_column=args.text_column,
                       codebooks=args.codebooks)
    meta = read_json(path / META_NAME)
    print(f"indexed {meta['num_docs']} documents ({meta['num_tokens']} tokens) into {args.out}")
    return 0


def search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index folder written by `codebook-features index`")
    p.add_argument("--site", help="site name, e.g. layers.0.attn_heads (needed by every query "
                                  "but --at, which shows every site without it)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--regex", help="codes by precision/recall on the regex's matches")
    what.add_argument("--token", help="codes by precision/recall on a token's occurrences "
                                      "(text compared without surrounding whitespace)")
    what.add_argument("--code", type=int, help="one code: statistics and top contexts")
    what.add_argument("--at", type=int, nargs=2, metavar=("DOC", "POS"),
                      help="the codes at token POS of document DOC (0-based)")
    what.add_argument("--similar", type=int, metavar="CODE",
                      help="codes of the same group nearest CODE by cosine (needs the model)")
    what.add_argument("--topics", type=float, metavar="MIN_SHARE",
                      help="codes firing on at least this share of a document's tokens")
    p.add_argument("--group", type=int, help="codebook group (default 0; --topics: all)")
    p.add_argument("-n", type=int, default=10,
                   help="how many results: codes, contexts, or with --topics documents "
                        "(%(default)s)")
    p.add_argument("--model", metavar="CODEBOOKS_DIR",
                   help="the index's codebooks, for --similar and the neuron baseline "
                        "(default: the folder recorded in the index)")
    p.add_argument("--neurons", action=argparse.BooleanOptionalAction, default=None,
                   help="--regex/--token: add the best neuron's precision at each code's "
                        "recall (default: when the model loads; --neurons: required)")
    p.add_argument("--neuron-tokens", type=int, default=10_000,
                   help="tokens the neuron baseline runs the model over (%(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _load_model(args: argparse.Namespace, index: Any, what: str | None
                ) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, None), or (None, None, why not) when ``what`` is None (optional);
    a CodebookError saying ``what`` needs the model otherwise."""
    from ..errors import CodebookError
    from .index import check_model

    where = args.model or index.meta.get("codebooks")
    why = None
    if where is None:
        why = "pass --model CODEBOOKS_DIR (the index records no codebooks folder)"
    elif args.model is None and not Path(where).is_dir():
        why = (f"the index names codebooks at {where}, which are gone; pass --model "
               "CODEBOOKS_DIR")
    else:
        try:
            from transformers import AutoTokenizer

            from ..io import progress_bars
            from ..model import CodebookModel

            with progress_bars(False):  # the output is a table, not a loading log
                model = CodebookModel.from_pretrained(where).eval()
            check_model(index.meta, model, index.path)
            name = index.meta.get("tokenizer") or model.base_info()["name_or_path"]
            return model, AutoTokenizer.from_pretrained(name), None
        except CodebookError as e:
            why = str(e)
        except Exception as e:  # a broken folder, a base model or tokenizer not there
            why = f"cannot load the model from {where}: {type(e).__name__}: {_one_line(e)}"
    if what is not None:
        raise CodebookError(f"{what} needs the model: {why}")
    return None, None, why


def _table(headers: list[str], rows: list[list[Any]], left: tuple[int, ...] = ()) -> str:
    """Rows under headers, columns padded: the columns ``left`` left-aligned, the others
    right-aligned; floats with 3 decimals."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [headers] + [[cell(v) for v in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) if j in left else c.rjust(w)
                               for j, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                     for r in cells)


def _show(text: str) -> str:
    """Text on one line: newlines and tabs shown as escapes."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def _match_table(matches: list[Any], neurons: bool) -> str:
    headers = ["group", "code", "precision", "recall", "fired", "hits"]
    if neurons:
        headers.append("neuron precision")
    return _table(headers, [[m.group, m.code, m.precision, m.recall, m.fired, m.hits]
                            + ([m.neuron_precision] if neurons else []) for m in matches])


def run_search(args: argparse.Namespace) -> int:
    from ..errors import CodebookError
    from .search import CodeIndex

    if args.n < 1:
        raise CodebookError(f"-n {args.n}: give at least 1")
    if args.neuron_tokens < 1:
        raise CodebookError(f"--neuron-tokens {args.neuron_tokens}: give at least 1")
    with CodeIndex.open(args.index) as index:
        if args.site is None and args.at is None:
            raise CodebookError(f"this query needs --site (sites: {', '.join(index.sites)})")
        if args.site is not None:
            index._site(args.site)  # an unknown site: one line naming the sites
        group = 0 if args.group is None else args.group
        if args.regex is not None or args.token is not None:
            out, text = _code_search(args, index)
        elif args.code is not None:
            stats = index.code_stats(args.site, args.code, group)
            contexts = index.top_contexts(args.site, args.code, group, n=args.n)
            out = {"stats": asdict(stats), "contexts": [asdict(c) for c in contexts]}
            text = "\n".join([
                f"code {args.code} (group {group}) of {args.site}: fires on {stats.count} of "
                f"{index.num_tokens} tokens ({100 * stats.frequency:.2f}%)",
                "fires on:       " + ", ".join(f"{t!r} {c}" for t, c in stats.tokens),
                "next in text:   " + ", ".join(f"{t!r} {c}" for t, c in stats.next_tokens),
                *([] if stats.predicted_next_tokens is None else [
                    "predicted next: " + ", ".join(f"{t!r} {c}"
                                                   for t, c in stats.predicted_next_tokens)]),
                "",
                _table(["doc", "pos", "score", "context"],
                       [[c.doc, c.position, c.score,
                         _show(f"{c.before}[[{c.token}]]{c.after}")] for c in contexts],
                       left=(3,))])
        elif args.at is not None:
            doc, pos = args.at
            codes = index.codes_at(doc, pos)  # checks doc and pos
            tokens = index.windows([(doc, pos)], 8)[0]
            token = next(t["text"] for t in tokens if t["pos"] == pos)
            if args.site is not None:
                codes = {args.site: codes[args.site]}
            if args.group is not None:
                for site, groups in codes.items():
                    if not 0 <= args.group < len(groups):
                        raise CodebookError(f"group {args.group} out of range for site {site} "
                                            f"({len(groups)} group(s))")
                codes = {s: [g[args.group]] for s, g in codes.items()}
            out = {"doc": doc, "position": pos, "token": token, "tokens": tokens,
                   "codes": codes}
            context = "".join(f"[[{t['text']}]]" if t["pos"] == pos else t["text"]
                              for t in tokens)
            text = "\n".join([
                f"document {doc}, token {pos} {token!r}: {_show(context)}", "",
                _table(["site", "group", "codes"],
                       [[site, args.group if args.group is not None else g,
                         " ".join(map(str, cs))]
                        for site, groups in codes.items() for g, cs in enumerate(groups)],
                       left=(0, 2))])
        elif args.similar is not None:
            model = _load_model(args, index, "--similar")[0]
            rows = index.similar_codes(args.site, args.similar, group, n=args.n, model=model)
            out = [{"code": c, "cosine": v} for c, v in rows]
            text = (f"codes of {args.site} group {group} nearest code {args.similar} by "
                    f"cosine:\n" + _table(["code", "cosine"], [list(r) for r in rows]))
        else:
            topics = index.topic_codes(args.site, args.topics, args.group)
            found = len(topics)
            topics = dict(list(topics.items())[:args.n])  # -n: the first n documents
            out = {str(doc): codes for doc, codes in topics.items()}
            shown = f"; the first {len(topics)} shown" if len(topics) < found else ""
            text = (f"codes of {args.site} firing on at least {args.topics:g} of a document's "
                    f"tokens ({found} of {index.num_docs} documents{shown}):\n"
                    + _table(["doc", "group", "code", "share"],
                             [[d, g, c, v] for d, rows in topics.items() for g, c, v in rows]))
    print(json.dumps(out, indent=1, default=str) if args.json else text)
    return 0


def _code_search(args: argparse.Namespace, index: Any) -> tuple[Any, str]:
    """--regex or --token: every code's precision and recall, and the neuron baseline."""
    import sys

    from ..errors import CodebookError

    if args.regex is not None:  # bad input is answered before any model loads
        positives, what = len(index.regex_rows(args.regex)), f"regex '{args.regex}'"
    else:
        if not args.token.strip():
            raise CodebookError("the token is empty; give a token's text")
        got = index.con.execute("SELECT count(*) FROM tokens WHERE trim(token) = ?",
                                [args.token.strip()]).fetchone()
        positives, what = int(got[0]), f"token {args.token.strip()!r}"
    neurons, note = None, ""
    if args.neurons is not False:
        model, tok, why = _load_model(args, index, "the neuron baseline"
                                      if args.neurons or args.model else None)
        if model is not None:
            neurons = index.neuron_activations(model, tok, args.site,
                                               max_tokens=args.neuron_tokens)
            note = (f"\nneuron precision: the best single neuron of the site thresholded to "
                    f"each code's recall, on the first {neurons.shape[0]} tokens")
        elif not args.json:
            print(f"note: no neuron baseline ({why})", file=sys.stderr)
    if args.regex is not None:
        matches = index.regex_search(args.regex, args.site, n=args.n, neurons=neurons)
    else:
        matches = index.token_search(args.token, args.site, n=args.n, neurons=neurons)
    text = (f"{what}: {positives} of {index.num_tokens} tokens; codes of {args.site} by "
            f"precision{note}\n" + _match_table(matches, neurons is not None))
    return [asdict(m) for m in matches], text
