"""The ``codebook-features`` command: one subcommand per job.

Bad input ends with a one-line ``error: ...`` message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
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
    from .synthetic import train_on_clusters

    metrics = train_on_clusters(steps=args.steps, seed=args.seed, out=args.out)
    print(json.dumps(metrics, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(
        prog="codebook-features",
        description="Sparse, discrete codebook bottlenecks for language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, run, help_) in sorted(_COMMANDS.items()):
        p = sub.add_parser(name, help=help_, description=help_)
        configure(p)
        p.set_defaults(_run=run)
    return parser


def _load_commands() -> None:
    """Import the modules that register subcommands (kept lazy: torch loads only on use)."""
    import importlib

    for mod in ("demo", "story_demo", "steering", "train", "evaluate", "analysis.commands"):
        try:
            importlib.import_module(f".{mod}", __package__)
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":
                raise


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CodebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
