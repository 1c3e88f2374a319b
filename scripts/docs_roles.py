"""MkDocs hook: Sphinx roles in docstrings (``:meth:`x```) shown as plain code.

The docstrings use reStructuredText roles, which Markdown renders as ``:meth:<code>x</code>``;
this drops the role so the reference reads ``x``.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:mod|meth|class|func|attr|data|exc|obj):(?=<code>)")


def on_page_content(html: str, **kwargs: object) -> str:
    return ROLE.sub("", html)
