"""The ``codebook-features`` command: one subcommand per job, the top of the import graph.

Each job's module offers an options function and a run function (:data:`COMMANDS`); the CLI
imports them, no job imports the CLI.

Bad input ends with a one-line ``error: ...`` message and exit status 2, never a traceback;
so does any filesystem or I/O error of any command (a read-only folder, a file where a folder
is expected, a full disk), handled here once as ``error: PATH: REASON; FIX``.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .errors import CodebookError

Command = Callable[[argparse.Namespace], int | None]

class Job(NamedTuple):
    """A command's module (under this package), its help, its options and run functions."""

    module: str
    help: str
    options: str = "options"
    run: str = "run"


# The CLI imports a job's module only when that command runs, so ``--help`` loads no torch.
COMMANDS: dict[str, Job] = {
    "browse": Job("browser.commands", "serve a web page to search and read codes, and steer "
                  "with them", "browse_options", "run_browse"),
    "compare": Job("compare.command", "a codebook site against a TopK sparse autoencoder of "
                   "matched size (standard evaluation, training cost, regex search, steering)"),
    "convert": Job("convert", "convert a checkpoint of the authors' package into this "
                   "library's format"),
    "demo": Job("experiments.tokfsm.job", "the TokFSM experiment end to end: train, snap, "
                "read, intervene, report", "_options", "_demo"),
    "eval": Job("evaluation.job", "evaluate saved codebooks on a dataset; print the paper's "
                "Table 2"),
    "export-sae": Job("sae_export", "write codebook sites in SAELens' on-disk format "
                      "(cfg.json, sae_weights.safetensors)"),
    "index": Job("analysis.commands", "run a codebook model over a corpus and store every "
                 "token's codes", "index_options", "run_index"),
    "push": Job("hub", "upload saved codebooks and their model card to the Hugging Face Hub"),
    "search": Job("analysis.commands", "query a code index: regex or token code search, a "
                  "code's contexts, the codes at a token, similar codes, topic codes",
                  "search_options", "run_search"),
    "steer": Job("steering", "generate with codes forced on, next to the unsteered generation"),
    "stories": Job("experiments.stories.job", "the story workload end to end: train a tiny "
                   "LM, add codebooks, evaluate, index, find topic codes, steer"),
    "synthetic": Job("experiments.synthetic", "train one codebook layer on synthetic "
                     "clustered data; print its metrics"),
    "train": Job("training.job", "finetune a causal LM with codebooks from a config file"),
}



def _job(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], Command]:
    import importlib

    job = COMMANDS[name]
    mod = importlib.import_module(f".{job.module}", __package__)
    return getattr(mod, job.options), getattr(mod, job.run)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``only``, just that command's options are added
    (the others keep their name and help), so that one command loads one job's module."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="codebook-features",
        description="Sparse, discrete codebook bottlenecks for language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, job in sorted(COMMANDS.items()):
        p = sub.add_parser(name, help=job.help, description=job.help)
        if only is None or name == only:
            options, run = _job(name)
            options(p)
            p.set_defaults(_run=run)
    return parser


_FIXES = {
    errno.EACCES: "check its permissions, or pass a folder you can write to",
    errno.EPERM: "check its permissions, or pass a folder you can write to",
    errno.EROFS: "the file system is read-only; pass a folder on a writable one",
    errno.ENOSPC: "the disk is full; free some space (or pass a folder on another disk) "
                  "and run again: finished work is kept",
    errno.EDQUOT: "the disk quota is exceeded; free some space and run again",
    errno.EEXIST: "a file is in the way; remove it or pass another path",
    errno.ENOTDIR: "a file is where a folder is needed; remove it or pass another path",
    errno.EISDIR: "a folder is where a file is needed; pass a file path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}


def os_error_line(e: OSError) -> str:
    """One line for a filesystem or I/O error: ``PATH: REASON; FIX`` (the fix by errno)."""
    reason = os.strerror(e.errno) if e.errno else None
    if reason is None:  # a library's OSError without an errno: its own first line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    where = " -> ".join(paths) + ": " if paths else ""
    fix = _FIXES.get(e.errno) if e.errno else None
    return f"{where}{reason}" + (f"; {fix}" if fix else "")


def wrapped_os_error(e: BaseException) -> OSError | None:
    """The filesystem error inside another library's exception: an OSError it was raised
    from, or one a Rust library (safetensors, tokenizers) wrote into its message
    (``Os { code: 28, ... }``); None when there is none."""
    import re

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError):
            return cur
        m = re.search(r"\bOs \{ code: (\d+)", str(cur))
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        cur = cur.__cause__ or cur.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else "").parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CodebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # every command's filesystem and I/O errors, at this one depth
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # ... also when a library wraps them in its own exception
        inner = wrapped_os_error(e)
        if inner is None:
            raise
        print(f"error: {os_error_line(inner)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
