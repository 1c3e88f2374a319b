"""The ``codebook-features`` command: one subcommand per job.

Bad input ends with a one-line ``error: ...`` message and exit status 2, never a traceback;
so does any filesystem or I/O error of any command (a read-only folder, a file where a folder
is expected, a full disk), handled here once as ``error: PATH: REASON; FIX``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable, Sequence

from .errors import CodebookError

Command = Callable[[argparse.Namespace], int | None]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command, str]] = {}


def command(name: str, help: str,
            configure: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``run(args)`` as a subcommand; ``configure(parser)`` adds its options."""

    def register(run: Command) -> Command:
        _COMMANDS[name] = (configure or (lambda p: None), run, help)
        return run

    return register


def _synthetic_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/synthetic", help="output folder (default %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)


@command("synthetic", "train one codebook layer on synthetic clustered data; print its metrics",
         _synthetic_options)
def _synthetic(args: argparse.Namespace) -> int:
    from .io import writable_dir
    from .synthetic import train_on_clusters

    if args.steps < 1:
        raise CodebookError(f"--steps {args.steps}: give at least 1")
    writable_dir(args.out)
    metrics = train_on_clusters(steps=args.steps, seed=args.seed, out=args.out)
    print(json.dumps(metrics, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="codebook-features",
        description="Sparse, discrete codebook bottlenecks for language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, run, help_) in sorted(_COMMANDS.items()):
        p = sub.add_parser(name, help=help_, description=help_)
        configure(p)
        p.set_defaults(_run=run)
    return parser


def _load_commands() -> None:
    """Import the modules that register subcommands (kept lazy: torch loads only on use)."""
    import importlib

    for mod in ("demo", "story_demo", "steering", "train", "evaluate", "convert", "hub",
                "compare", "sae_export", "analysis.commands"):
        try:
            importlib.import_module(f".{mod}", __package__)
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":
                raise


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
    args = build_parser().parse_args(argv)
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
