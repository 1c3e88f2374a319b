"""Packing text into fixed-length rows: in memory and streamed, against a naive packing."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codebook_features.data import text as text_mod
from codebook_features.data.text import load_text, pack, take_rows
from codebook_features.errors import CodebookError
from codebook_features.experiments.stories import generate_stories, train_story_tokenizer

SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same documents (one empty) as .txt, .jsonl and .parquet, and a tokenizer."""
    d = tmp_path_factory.mktemp("text")
    docs = [s["text"].replace("\n", " ") for s in generate_stories(num_stories=120, seed=3)]
    docs[5] = ""  # an empty line: no tokens, no EOS
    (d / "docs.txt").write_text("".join(t + "\n" for t in docs))
    (d / "docs.jsonl").write_text("".join(json.dumps({"body": t, "n": i}) + "\n"
                                          for i, t in enumerate(docs)))
    pq.write_table(pa.table({"body": docs}), d / "docs.parquet", row_group_size=17)
    tok = train_story_tokenizer(docs, vocab_size=300)
    return d, docs, tok


def naive_rows(docs: list[str], tok, seq_len: int) -> list[list[int]]:
    """Every document's tokens followed by EOS, concatenated, cut into whole rows."""
    stream: list[int] = []
    for t in docs:
        ids = tok.encode(t, add_special_tokens=False)
        if ids:
            stream += ids + [tok.eos_token_id]
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


@pytest.mark.parametrize("batch_documents", [1000, 7])
def test_streaming_rows_equal_in_memory_rows_and_naive(corpus, monkeypatch, batch_documents):
    d, docs, tok = corpus
    monkeypatch.setattr(text_mod, "BATCH_DOCUMENTS", batch_documents)
    want = naive_rows(docs, tok, SEQ)
    assert len(want) > 50
    in_memory = pack(load_text(files=[str(d / "docs.txt")]), tok, SEQ)
    assert isinstance(in_memory, datasets.Dataset)
    assert in_memory["input_ids"] == want and in_memory["labels"] == want
    for name, column in (("docs.txt", "text"), ("docs.jsonl", "body"), ("docs.parquet", "body")):
        stream = pack(load_text(files=[str(d / name)], text_column=column, streaming=True),
                      tok, SEQ, column)
        assert isinstance(stream, datasets.IterableDataset)
        rows = list(stream)
        assert [r["input_ids"] for r in rows] == want, name
        assert [r["labels"] for r in rows] == want, name
        assert [r["input_ids"] for r in stream] == want, f"{name}: a second pass differs"


def test_take_rows(corpus):
    d, docs, tok = corpus
    want = naive_rows(docs, tok, SEQ)
    stream = pack(load_text(files=[str(d / "docs.txt")], streaming=True), tok, SEQ)
    head = take_rows(stream, 5)
    assert isinstance(head, datasets.Dataset) and head["input_ids"] == want[:5]
    assert take_rows(stream.skip(5), 3)["input_ids"] == want[5:8]
    in_memory = pack(load_text(files=[str(d / "docs.txt")]), tok, SEQ)
    assert take_rows(in_memory, 4)["input_ids"] == want[:4]
    assert take_rows(in_memory, None) is in_memory


def test_streaming_errors(corpus, tmp_path):
    d, _, _ = corpus
    with pytest.raises(CodebookError, match=r"no column 'text' \(columns: \['body', 'n'\]\)"):
        load_text(files=[str(d / "docs.jsonl")], streaming=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CodebookError, match="is empty"):
        load_text(files=[str(empty)], streaming=True)


def _dataset_folder(root, docs: list[str]):
    """A local dataset folder as one would publish it on the hub: parquet shards and a README
    declaring two configs (``stories`` with train/validation splits, ``reversed``)."""
    (root / "stories").mkdir(parents=True)
    (root / "reversed").mkdir()
    half = len(docs) // 2
    pq.write_table(pa.table({"body": docs[:half]}), root / "stories" / "train-00000.parquet")
    pq.write_table(pa.table({"body": docs[half:-10]}), root / "stories" / "train-00001.parquet")
    pq.write_table(pa.table({"body": docs[-10:]}), root / "stories" / "validation.parquet")
    pq.write_table(pa.table({"body": docs[::-1]}), root / "reversed" / "train.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: stories\n  data_files:\n"
        "  - split: train\n    path: stories/train-*.parquet\n"
        "  - split: validation\n    path: stories/validation.parquet\n"
        "- config_name: reversed\n  data_files:\n"
        "  - split: train\n    path: reversed/train.parquet\n---\n")
    return root


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_dataset_by_name_and_config_equals_local_files(corpus, tmp_path, monkeypatch, streaming):
    """``load_text(dataset, config, split)``: the ``datasets.load_dataset(name, config)`` path a
    hub dataset takes, on a local dataset folder with configs, packs to the same rows as the
    same documents given as files (the config and the split are the ones asked for)."""
    d, docs, tok = corpus
    folder = _dataset_folder(tmp_path / "ds", docs)
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))

    def rows(ds) -> list[list[int]]:
        packed = pack(ds, tok, SEQ, "body")
        assert isinstance(packed, datasets.IterableDataset if streaming else datasets.Dataset)
        return [r["input_ids"] for r in packed]

    by_name = load_text(str(folder), config="stories", split="train", text_column="body",
                        streaming=streaming)
    assert calls[-1] == ((str(folder), "stories"), {"split": "train", "streaming": streaming})
    shards = sorted(str(p) for p in (folder / "stories").glob("train-*.parquet"))
    want = rows(load_text(files=shards, text_column="body", streaming=streaming))
    assert rows(by_name) == want == naive_rows(docs[:-10], tok, SEQ)
    val = load_text(str(folder), config="stories", split="validation", text_column="body",
                    streaming=streaming)
    assert rows(val) == naive_rows(docs[-10:], tok, SEQ)
    other = load_text(str(folder), config="reversed", text_column="body", streaming=streaming)
    assert rows(other) == naive_rows(docs[::-1], tok, SEQ)
    with pytest.raises(CodebookError, match=r"cannot load dataset .*'nope' not found"):
        load_text(str(folder), config="nope", text_column="body", streaming=streaming)
    with pytest.raises(CodebookError, match=r"no column 'text' \(columns: \['body'\]\)"):
        load_text(str(folder), config="stories", streaming=streaming)


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_dataset_saved_to_disk(corpus, tmp_path, streaming):
    """A folder written by ``save_to_disk`` (a ``DatasetDict`` or one ``Dataset``) as
    ``data.dataset``: the same packed rows as the documents given as a file."""
    d, docs, tok = corpus
    want = [r["input_ids"] for r in pack(load_text(files=[str(d / "docs.txt")]), tok, SEQ)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs}),
                               "test": datasets.Dataset.from_dict({"text": docs[:20]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    dd["train"].save_to_disk(str(tmp_path / "one"))
    for name in ("dict", "one"):
        ds = load_text(str(tmp_path / name), streaming=streaming)
        assert isinstance(ds, datasets.IterableDataset if streaming else datasets.Dataset)
        assert [r["input_ids"] for r in pack(ds, tok, SEQ)] == want, name
    test = load_text(str(tmp_path / "dict"), split="test", streaming=streaming)
    assert [r["input_ids"] for r in pack(test, tok, SEQ)] == naive_rows(docs[:20], tok, SEQ)
    with pytest.raises(CodebookError, match=r"no split 'valid' \(splits: \['test', 'train'\]\)"):
        load_text(str(tmp_path / "dict"), split="valid", streaming=streaming)
    with pytest.raises(CodebookError, match="one saved Dataset.*no split 'test'"):
        load_text(str(tmp_path / "one"), split="test", streaming=streaming)
    with pytest.raises(CodebookError, match="save_to_disk, which has no configs"):
        load_text(str(tmp_path / "dict"), config="x", streaming=streaming)


def test_training_data_from_a_dataset_folder_by_config(corpus, tmp_path):
    """The train command's data section (``data.dataset``, ``data.config``, ``data.split``,
    ``data.eval_split``), in memory and streamed: the same rows as the equivalent files."""
    from codebook_features.training.config import load_config
    from codebook_features.training.job import build_datasets

    d, docs, tok = corpus
    folder = _dataset_folder(tmp_path / "ds", docs)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: m\ndata: {seq_len: 16, text_column: body}\n")
    shards = sorted(str(p) for p in (folder / "stories").glob("train-*.parquet"))
    for streaming in ("false", "true"):
        by_name = load_config(cfg_file, [f"data.dataset={folder}", "data.config=stories",
                                         "data.eval_split=validation",
                                         f"data.streaming={streaming}"])
        train, ev = build_datasets(by_name, tok, seed=0)
        assert [r["input_ids"] for r in train] == naive_rows(docs[:-10], tok, SEQ), streaming
        assert ev["input_ids"] == naive_rows(docs[-10:], tok, SEQ)
        files = load_config(cfg_file, [f"data.files=[{','.join(shards)}]",
                                       f"data.streaming={streaming}", "data.max_eval_rows=8"])
        by_name = load_config(cfg_file, [f"data.dataset={folder}", "data.config=stories",
                                         f"data.streaming={streaming}", "data.max_eval_rows=8"])
        (t1, e1), (t2, e2) = build_datasets(files, tok, 0), build_datasets(by_name, tok, 0)
        assert [r["input_ids"] for r in t1] == [r["input_ids"] for r in t2]
        assert e1["input_ids"] == e2["input_ids"] and len(e1) == 8
