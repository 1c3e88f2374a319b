"""The one exception type the library raises for bad input, with a one-line message."""


class CodebookError(ValueError):
    """A problem with the user's input or settings; the message names it and the fix.

    The CLI prints the message alone (no traceback) and exits with status 2.
    """
