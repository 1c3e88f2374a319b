"""Text datasets for LM training: Hugging Face datasets by name, or local files, packed.

``load_text(...)`` returns a ``datasets.Dataset`` with a text column (or, with
``streaming=True``, a ``datasets.IterableDataset`` read lazily); ``pack(...)`` tokenises it and
cuts the token stream (documents joined with EOS) into rows of ``seq_len`` tokens with
``input_ids`` and ``labels``. Both paths give the same rows in the same order: the rows of the
concatenated stream, of which only the last partial row is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from ..errors import CodebookError

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BATCH_DOCUMENTS = 1000
"""Documents tokenised together (the token carry between batches keeps rows exact)."""


def load_text(dataset: str | None = None, files: Sequence[str] | None = None,
              config: str | None = None, split: str = "train", text_column: str = "text",
              streaming: bool = False) -> Any:
    """One split of a text dataset: a hub dataset by name (and config), or local files.

    ``dataset`` may also be a local folder: one ``datasets.load_dataset`` reads (data files,
    or a README declaring configs and their splits), or one written by
    ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (no config; a lone ``Dataset`` is
    the ``train`` split). Local ``.txt`` files give one example per line; ``.jsonl`` and
    ``.parquet`` need ``text_column``. With ``streaming``, nothing is read beyond the first
    row (which is checked for ``text_column``). A missing column or file, or an empty stream,
    gets one clear error.
    """
    import datasets

    if bool(dataset) == bool(files):
        raise CodebookError("data: give exactly one of dataset (a hub name) or files "
                            "(local .txt/.jsonl/.parquet)")
    name = dataset or list(files or [])
    try:
        if files:
            paths = [Path(f) for f in files]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise CodebookError(f"data.files: {missing} not found; check the paths")
            kinds = {_BUILDERS.get(p.suffix) for p in paths}
            if None in kinds or len(kinds) != 1:
                raise CodebookError(f"data.files: use one kind of file among "
                                    f"{sorted(_BUILDERS)}, got {[p.suffix for p in paths]}")
            ds = datasets.load_dataset(kinds.pop(), data_files={split: [str(p) for p in paths]},
                                       split=split, streaming=streaming)
        elif _saved_to_disk(dataset):
            ds = _load_saved(dataset, config, split, streaming)
        else:  # a hub name, or a local dataset folder (data files, or a README's configs)
            ds = datasets.load_dataset(dataset, config, split=split, streaming=streaming)
        if streaming:  # the columns of a stream are known once a row is read
            first = next(iter(ds.take(1)), None)
            if first is None:
                raise CodebookError(f"dataset {name} (split {split!r}) is empty")
            columns = list(first)
        else:
            columns = ds.column_names
    except CodebookError:
        raise
    except StopIteration:  # the json builder on an empty file
        raise CodebookError(f"dataset {name} (split {split!r}) is empty") from None
    except Exception as e:  # hub offline, unknown name or split, unreadable file
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CodebookError(f"cannot load dataset {name} (split {split!r}): "
                            f"{first_line}") from None
    if text_column not in columns:
        raise CodebookError(f"dataset has no column {text_column!r} (columns: {columns}); "
                            "set data.text_column")
    return ds


def _saved_to_disk(dataset: str) -> bool:
    """Whether ``dataset`` is a folder written by ``save_to_disk``."""
    path = Path(dataset).expanduser()
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


def _load_saved(dataset: str, config: str | None, split: str, streaming: bool) -> Any:
    """One split of a ``save_to_disk`` folder (an ``IterableDataset`` when streaming)."""
    import datasets

    if config:
        raise CodebookError(f"dataset {dataset} was written by save_to_disk, which has no "
                            f"configs; remove data.config={config!r}")
    saved = datasets.load_from_disk(str(Path(dataset).expanduser()))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise CodebookError(f"dataset {dataset} has no split {split!r} (splits: "
                                f"{sorted(saved)})")
        ds = saved[split]
    elif split != "train":
        raise CodebookError(f"dataset {dataset} is one saved Dataset, read as the 'train' "
                            f"split; it has no split {split!r}")
    else:
        ds = saved
    return ds.to_iterable_dataset() if streaming else ds


class _Packer:
    """Tokenises batches of documents into one running token stream and cuts it into rows.

    The tokens after the last whole row carry over to the next batch, so the rows do not
    depend on how the documents are batched. Call it on the batches in order, once.
    """

    def __init__(self, tokenizer: Any, seq_len: int, text_column: str) -> None:
        if seq_len < 2:
            raise CodebookError(f"data.seq_len={seq_len}: must be at least 2")
        if tokenizer.eos_token_id is None:
            raise CodebookError("the tokenizer has no EOS token to separate documents; set one")
        self.tokenizer, self.seq_len, self.text_column = tokenizer, seq_len, text_column
        self.carry: list[int] = []

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [t for t in batch[self.text_column] if t]
        stream = self.carry
        eos = self.tokenizer.eos_token_id
        if texts:
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                if ids:
                    stream.extend(ids)
                    stream.append(eos)
        n, L = len(stream) // self.seq_len, self.seq_len
        rows = [stream[i * L:(i + 1) * L] for i in range(n)]
        self.carry = stream[n * L:]
        return {"input_ids": rows, "labels": [list(r) for r in rows]}


def _features() -> Any:
    import datasets

    ids = datasets.List(datasets.Value("int64"))
    return datasets.Features({"input_ids": ids, "labels": ids})


def pack(ds: Any, tokenizer: Any, seq_len: int, text_column: str = "text") -> Any:
    """Tokenise ``ds`` and pack it into ``seq_len``-token rows (``input_ids``, ``labels``).

    Documents are joined with the tokenizer's EOS token into one stream, cut into rows; only
    the stream's last partial row is dropped. A ``datasets.Dataset`` is packed with a batched
    ``map`` (Arrow on disk, one batch of documents in memory); a ``datasets.IterableDataset``
    gives an ``IterableDataset`` packed on the fly, each pass over it starting afresh.
    """
    import datasets

    _Packer(tokenizer, seq_len, text_column)  # argument checks before any work
    if isinstance(ds, datasets.IterableDataset):
        return datasets.IterableDataset.from_generator(
            _stream_rows, features=_features(),
            gen_kwargs={"source": ds, "tokenizer": tokenizer, "seq_len": seq_len,
                        "text_column": text_column})
    return ds.map(_Packer(tokenizer, seq_len, text_column), batched=True,
                  batch_size=BATCH_DOCUMENTS, remove_columns=ds.column_names,
                  features=_features())


def token_rows(ds: Any, seq_len: int) -> Any:
    """Pre-tokenised rows used as they are: an ``input_ids`` column of ``seq_len`` ids per row
    (e.g. TokFSM sequences, BOS first), with ``labels`` added; other columns are dropped."""
    import datasets

    def rows(batch: dict[str, list]) -> dict[str, list]:
        ids = [list(r) for r in batch["input_ids"]]
        bad = next((len(r) for r in ids if len(r) != seq_len), None)
        if bad is not None:
            raise CodebookError(f"data: a pre-tokenised row has {bad} tokens but data.seq_len "
                                f"is {seq_len}; set data.seq_len to the rows' length")
        return {"input_ids": ids, "labels": [list(r) for r in ids]}

    cols = ds.column_names or []
    kw: dict[str, Any] = {"remove_columns": [c for c in cols if c != "input_ids"],
                          "features": _features()}
    if not isinstance(ds, datasets.IterableDataset):
        kw["batch_size"] = BATCH_DOCUMENTS
    return ds.map(rows, batched=True, **kw)


def _stream_rows(source: Any, tokenizer: Any, seq_len: int, text_column: str
                 ) -> Iterator[dict[str, list[int]]]:
    packer = _Packer(tokenizer, seq_len, text_column)
    for batch in source.iter(batch_size=BATCH_DOCUMENTS):
        out = packer(batch)
        yield from ({"input_ids": i, "labels": y}
                    for i, y in zip(out["input_ids"], out["labels"], strict=True))


def take_rows(ds: Any, n: int | None) -> Any:
    """The first ``n`` rows (all if None) as an in-memory ``datasets.Dataset``."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        if n is None:
            raise CodebookError("take_rows: a stream needs a number of rows")
        rows = list(islice(iter(ds), n))
        return datasets.Dataset.from_list(rows, features=ds.features)
    return ds if n is None or n >= len(ds) else ds.select(range(n))
