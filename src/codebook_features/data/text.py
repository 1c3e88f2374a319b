"""Text datasets for LM training: Hugging Face datasets by name, or local files, packed.

``load_text(...)`` returns a ``datasets.Dataset`` with a text column; ``pack(...)`` tokenises
it and cuts the concatenated token stream (documents separated by EOS) into rows of
``seq_len`` tokens with ``input_ids`` and ``labels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import CodebookError

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_text(dataset: str | None = None, files: Sequence[str] | None = None,
              config: str | None = None, split: str = "train", text_column: str = "text",
              streaming: bool = False) -> Any:
    """One split of a text dataset: a hub dataset by name (and config), or local files.

    Local ``.txt`` files give one example per line; ``.jsonl`` and ``.parquet`` need
    ``text_column``. A missing column or file gets one clear error.
    """
    import datasets

    if bool(dataset) == bool(files):
        raise CodebookError("data: give exactly one of dataset (a hub name) or files "
                            "(local .txt/.jsonl/.parquet)")
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
        else:
            ds = datasets.load_dataset(dataset, config, split=split, streaming=streaming)
    except CodebookError:
        raise
    except Exception as e:  # hub offline, unknown name or split, unreadable file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CodebookError(f"cannot load dataset {dataset or list(files or [])} "
                            f"(split {split!r}): {first}") from None
    columns = ds.column_names if not streaming else list(ds.features or {})
    if columns and text_column not in columns:
        raise CodebookError(f"dataset has no column {text_column!r} (columns: {columns}); "
                            "set data.text_column")
    return ds


def pack(ds: Any, tokenizer: Any, seq_len: int, text_column: str = "text",
         num_proc: int | None = None) -> Any:
    """Tokenise ``ds`` and pack it into ``seq_len``-token rows (``input_ids``, ``labels``).

    Documents are joined with the tokenizer's EOS token; the last partial row of each batch
    of documents is dropped.
    """
    if seq_len < 2:
        raise CodebookError(f"data.seq_len={seq_len}: must be at least 2")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CodebookError("the tokenizer has no EOS token to separate documents; set one")

    def tokenize_and_pack(batch: dict[str, list]) -> dict[str, list]:
        stream: list[int] = []
        for ids in tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]:
            if ids:
                stream.extend(ids)
                stream.append(eos)
        n = len(stream) // seq_len
        rows = [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)]
        return {"input_ids": rows, "labels": [list(r) for r in rows]}

    kwargs = {"num_proc": num_proc} if num_proc else {}
    return ds.map(tokenize_and_pack, batched=True, batch_size=1000,
                  remove_columns=ds.column_names, **kwargs)
