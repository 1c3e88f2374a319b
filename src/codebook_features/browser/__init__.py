"""The code browser: ``codebook-features browse INDEX`` serves a page over a code index."""

from .app import create_app

__all__ = ["create_app"]
