"""``codebook-features browse``: serve the code browser for an index."""

from __future__ import annotations

import argparse


def browse_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index folder written by `codebook-features index`")
    p.add_argument("--model", metavar="CODEBOOKS_DIR",
                   help="saved codebooks of the index's model, for steering, similar codes and "
                        "the neuron baseline (default: the folder recorded in the index)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (%(default)s: this machine only; the browser "
                        "has no login, so serve other machines only on a trusted network)")
    p.add_argument("--port", type=int, default=8000, help="port, 1-65535 (%(default)s)")
    p.add_argument("--neuron-tokens", type=int, default=10_000,
                   help="tokens the best-neuron baseline runs the model over (%(default)s)")


def run_browse(args: argparse.Namespace) -> int:
    import os
    import socket

    import uvicorn

    from ..analysis import CodeIndex
    from ..errors import CodebookError
    from .app import create_app

    if not 0 < args.port < 65536:
        raise CodebookError(f"--port {args.port}: not a port; pass one of 1-65535")
    if args.neuron_tokens < 1:
        raise CodebookError(f"--neuron-tokens {args.neuron_tokens}: give at least 1")
    CodeIndex.open(args.index).close()  # a missing, unfinished or damaged index: refused now
    try:  # a clear one-line error rather than uvicorn's log when the port is taken
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise CodebookError(f"cannot listen on {args.host}:{args.port} ({why}); pass "
                            "another --port or --host") from None
    app = create_app(args.index, model=args.model, neuron_tokens=args.neuron_tokens)
    browser = app.state.browser
    browser.index  # noqa: B018 - opens the index and loads the model
    if args.model is not None and browser.model is None:  # asked for: refused, not served
        raise CodebookError(browser.model_error or f"cannot load the model from {args.model}")
    print(f"code browser on http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
