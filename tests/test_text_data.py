"""Packing text into fixed-length rows: in memory and streamed, against a naive packing."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codebook_features.data import text as text_mod
from codebook_features.data.stories import generate_stories, train_story_tokenizer
from codebook_features.data.text import load_text, pack, take_rows
from codebook_features.errors import CodebookError

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
