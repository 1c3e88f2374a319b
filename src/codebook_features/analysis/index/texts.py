"""The corpus as the index reads it: texts in batches, read lazily, and documents longer than
the model's context cut into windows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

from ...errors import CodebookError


def token_windows(ids: Sequence[int], max_length: int) -> list[tuple[int, list[int]]]:
    """A document's token ids cut into consecutive windows of at most ``max_length``:
    ``[(first position, ids)]``; none for an empty document (no forward runs on nothing)."""
    ids = list(ids)
    return [(s, ids[s:s + max_length]) for s in range(0, len(ids), max_length)]


def encode_long(tokenizer: Any, texts: list[str], **kw: Any) -> Any:
    """``tokenizer(texts, **kw)`` without truncation and without the warning that a text is
    longer than the model's limit (such texts are run in windows)."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    key = "sequence-length-is-longer-than-the-specified-maximum"
    had = None if flags is None else flags.get(key)
    if flags is not None:
        flags[key] = True
    try:
        return tokenizer(texts, truncation=False, **kw)
    finally:
        if flags is not None:
            if had is None:
                flags.pop(key, None)
            else:
                flags[key] = had


def _text_batches(texts: Any, text_column: str, size: int) -> Iterator[list[str]]:
    """``texts`` in lists of ``size`` strings, read lazily: a ``datasets.Dataset`` a slice at
    a time, a ``datasets.IterableDataset`` (streaming) or any other iterable one item at a
    time, so no more than a batch of them is held here."""
    try:
        from datasets import Dataset, IterableDataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        Dataset = IterableDataset = None  # noqa: N806
    if Dataset is not None and isinstance(texts, Dataset):
        if text_column not in texts.column_names:
            raise CodebookError(f"build_index: the dataset has no column {text_column!r} "
                                f"(columns: {texts.column_names}); pass text_column=")
        for i in range(0, len(texts), size):
            yield [str(t) for t in texts[i:i + size][text_column]]
        return
    if IterableDataset is not None and isinstance(texts, IterableDataset):
        columns = texts.column_names  # None until a row is read, for some streams
        if columns is not None and text_column not in columns:
            raise CodebookError(f"build_index: the dataset has no column {text_column!r} "
                                f"(columns: {columns}); pass text_column=")

        def column(rows: Iterator[dict[str, Any]]) -> Iterator[Any]:
            for row in rows:
                if text_column not in row:
                    raise CodebookError(f"build_index: the dataset has no column "
                                        f"{text_column!r} (columns: {list(row)}); pass "
                                        "text_column=")
                yield row[text_column]

        items: Iterator[Any] = column(iter(texts))
    elif isinstance(texts, str | bytes | dict) or not isinstance(texts, Iterable):
        raise CodebookError("build_index: texts must be a list of strings (or any iterable "
                            "of strings), or a datasets.Dataset or IterableDataset with a "
                            "text column")
    else:
        items = iter(texts)
    while True:
        chunk = list(islice(items, size))
        if not chunk:
            return
        for t in chunk:
            if not isinstance(t, str):
                raise CodebookError(f"build_index: texts must be strings, got "
                                    f"{type(t).__name__}; pass the text column")
        yield chunk
