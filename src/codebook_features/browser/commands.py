"""``codebook-features browse``: serve the code browser for an index."""

from __future__ import annotations

import argparse

from ..cli import command


def _browse_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index folder written by `codebook-features index`")
    p.add_argument("--model", metavar="CODEBOOKS_DIR",
                   help="saved codebooks of the index's model, for steering, similar codes and "
                        "the neuron baseline (default: the folder recorded in the index)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (%(default)s)")
    p.add_argument("--neuron-tokens", type=int, default=10_000,
                   help="tokens the best-neuron baseline runs the model over (%(default)s)")


@command("browse", "serve a web page to search and read codes, and steer with them",
         _browse_options)
def _browse(args: argparse.Namespace) -> int:
    import os
    import socket

    import uvicorn

    from ..errors import CodebookError
    from .app import create_app

    try:  # a clear one-line error rather than uvicorn's log when the port is taken
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise CodebookError(f"cannot listen on {args.host}:{args.port} ({why}); pass "
                            "another --port or --host") from None
    app = create_app(args.index, model=args.model, neuron_tokens=args.neuron_tokens)
    print(f"code browser on http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
