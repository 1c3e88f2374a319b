"""The generated topic-story corpus, its tokenizer, dataset and tiny model config."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import transformers as T

from codebook_features.errors import CodebookError
from codebook_features.experiments.stories import (
    TOPIC_NAMES,
    StoryConfig,
    build_story_dataset,
    generate_stories,
    mentions_topic,
    pack_stories,
    read_corpus,
    split_sentences,
    story_rows,
    tiny_story_model_config,
    topic_mentions,
    topic_regex,
    topic_words,
    train_story_tokenizer,
    write_corpus,
)

REQUIRED_TOPICS = {"dragon", "flower", "fire", "baby", "princess"}
# The one designed overlap: dragons sometimes breathe fire.
ALLOWED_OVERLAP = {("dragon", "fire")}


@pytest.fixture(scope="module")
def stories() -> list[dict]:
    return generate_stories(StoryConfig(num_stories=2000, seed=0))


@pytest.fixture(scope="module")
def tokenizer(stories):
    return train_story_tokenizer(stories[:400], vocab_size=512)


def test_deterministic_given_seed(stories):
    again = generate_stories(StoryConfig(num_stories=2000, seed=0))
    assert again == stories
    assert generate_stories(num_stories=50, seed=0) == stories[:50]  # prefix-stable
    other = generate_stories(num_stories=50, seed=1)
    assert sum(a["text"] == b["text"] for a, b in zip(other, stories[:50], strict=True)) == 0


def test_topics_present_and_balanced(stories):
    assert REQUIRED_TOPICS <= set(TOPIC_NAMES) and len(TOPIC_NAMES) >= 8
    counts = Counter(s["topic"] for s in stories)
    assert set(counts) == set(TOPIC_NAMES)
    assert max(counts.values()) - min(counts.values()) <= 1
    sub = generate_stories(num_stories=25, topics=("dragon", "flower"), seed=2)
    assert Counter(s["topic"] for s in sub) in (Counter(dragon=13, flower=12),
                                                 Counter(dragon=12, flower=13))
    # Rounds are shuffled: topic order is not a fixed cycle.
    assert len({tuple(s["topic"] for s in stories[i:i + 10]) for i in range(0, 100, 10)}) > 1


def test_story_shape(stories):
    lengths = Counter(len(split_sentences(s["text"])) for s in stories)
    assert set(lengths) == set(range(3, 9))
    assert all(s["text"][0].isupper() and s["text"][-1] in '.!"' for s in stories)
    assert sum(s["text"].startswith("Once upon a time") for s in stories) > len(stories) / 5
    short = generate_stories(num_stories=30, min_sentences=3, max_sentences=3)
    assert all(len(split_sentences(s["text"])) == 3 for s in short)


def test_topic_words_mark_their_own_topic(stories):
    rates = {}
    for topic in TOPIC_NAMES:
        own = [s for s in stories if s["topic"] == topic]
        for other in TOPIC_NAMES:
            rates[topic, other] = sum(mentions_topic(s["text"], other) for s in own) / len(own)
    for topic in TOPIC_NAMES:
        assert rates[topic, topic] == 1.0, topic  # every story names its topic
        # ... in several sentences on average
        own = [s for s in stories if s["topic"] == topic]
        per_story = [sum(mentions_topic(x, topic) for x in split_sentences(s["text"]))
                     for s in own]
        assert sum(per_story) / len(per_story) >= 2.0, topic
    off = {k: v for k, v in rates.items() if k[0] != k[1]}
    assert sum(off.values()) / len(off) < 0.01
    for pair, rate in off.items():
        assert rate < (0.3 if pair in ALLOWED_OVERLAP else 0.005), (pair, rate)


def test_sentences_mention_only_their_topic(stories):
    for s in stories:
        allowed = {s["topic"]} | {b for a, b in ALLOWED_OVERLAP if a == s["topic"]}
        for sentence in split_sentences(s["text"]):
            assert set(topic_mentions(sentence)) <= allowed, (s["topic"], sentence)


def test_topic_regex():
    assert topic_words("dragon") and mentions_topic("The Dragon roared.", "dragon")
    assert not mentions_topic("A dragonfly flew by.", "dragon")
    assert mentions_topic("The tulips bloomed.", "flower")
    assert topic_regex("rain").findall("Rainy days and puddles.") == ["Rainy", "puddles"]
    assert topic_mentions("A puppy sang on the beach.") == ["ocean", "dog", "music"]
    with pytest.raises(CodebookError, match="unknown story topic"):
        topic_words("unicorn")


def test_diversity(stories):
    texts = [s["text"] for s in stories]
    assert len(set(texts)) >= 0.995 * len(texts)
    sentences = Counter(x for t in texts for x in split_sentences(t))
    assert len(sentences) >= 5000
    assert sentences.most_common(1)[0][1] < 0.06 * len(texts)
    words = {w.strip('.,!?"').lower() for t in texts for w in t.split()}
    assert len(words) >= 600


def test_config_errors():
    with pytest.raises(CodebookError, match="unknown story topic"):
        StoryConfig(topics=("dragon", "unicorn"))
    with pytest.raises(CodebookError, match="min_sentences"):
        StoryConfig(min_sentences=6, max_sentences=4)
    with pytest.raises(CodebookError, match="num_stories"):
        StoryConfig(num_stories=0)
    with pytest.raises(CodebookError, match="StoryConfig fields"):
        generate_stories(colour="red")


def test_write_read_corpus(tmp_path, stories):
    few = stories[:20]
    txt = write_corpus(tmp_path / "c.txt", few)
    assert txt.read_text().count("\n") == 20
    assert read_corpus(txt) == [{"text": s["text"]} for s in few]
    assert read_corpus(write_corpus(tmp_path / "c.jsonl", few)) == few
    gen = write_corpus(tmp_path / "g.jsonl", config=StoryConfig(num_stories=7))
    assert len(read_corpus(gen)) == 7
    with pytest.raises(CodebookError, match=".txt or .jsonl"):
        write_corpus(tmp_path / "c.csv", few)
    with pytest.raises(CodebookError, match="not found"):
        read_corpus(tmp_path / "missing.jsonl")


def test_tokenizer_round_trip(tmp_path, stories, tokenizer):
    tok = tokenizer
    assert len(tok) == 512
    assert tok.bos_token == tok.eos_token == tok.pad_token == "<|endoftext|>"
    text = stories[5]["text"]
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text) / 2  # merges learned: words are few tokens
    tok.save_pretrained(tmp_path / "tok")
    loaded = T.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded(text)["input_ids"] == ids
    odd = "Zoë's café: 42 dragons 🐉!"
    assert loaded.decode(loaded(odd)["input_ids"], skip_special_tokens=True) == odd
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 0, 0)
    again = train_story_tokenizer(stories[:400], vocab_size=512)
    assert again.get_vocab() == tok.get_vocab()
    with pytest.raises(CodebookError, match="vocab_size"):
        train_story_tokenizer(stories[:10], vocab_size=100)


def test_pack_and_dataset_columns(stories, tokenizer):
    blocks = pack_stories(tokenizer, stories[:100], seq_len=64)
    assert blocks.dtype == torch.long and blocks.shape[1] == 64
    assert blocks[0, 0] == tokenizer.eos_token_id
    n_docs = int((blocks == tokenizer.eos_token_id).sum())
    assert 95 <= n_docs <= 100 and int(blocks.max()) < len(tokenizer)

    ds = build_story_dataset(stories[:50])
    assert ds.column_names == ["text", "topic"] and len(ds) == 50
    assert ds[3] == stories[3]
    ds = build_story_dataset(stories[:50], tokenizer=tokenizer)
    assert ds.column_names == ["text", "topic", "input_ids"]
    assert ds[0]["input_ids"][0] == tokenizer.bos_token_id
    ds = build_story_dataset(stories[:100], tokenizer=tokenizer, seq_len=64)
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == len(blocks)
    assert ds[0]["input_ids"] == ds[0]["labels"] == blocks[0].tolist()
    rows = build_story_dataset(stories[:30], tokenizer=tokenizer, seq_len=64, packed=False)
    assert rows.column_names == ["input_ids", "attention_mask", "labels"] and len(rows) == 30
    assert {len(r) for r in rows["input_ids"]} == {64}
    with pytest.raises(CodebookError, match="needs a tokenizer"):
        build_story_dataset(stories[:5], seq_len=64)


def test_story_rows(stories, tokenizer):
    eos = tokenizer.eos_token_id
    rows = story_rows(tokenizer, stories[:40], max_len=512)
    ids, mask, labels = rows["input_ids"], rows["attention_mask"], rows["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 40
    lengths = mask.sum(1)
    assert int(lengths.max()) == ids.shape[1] and bool((mask[:, 0] == 1).all())
    for i in range(40):
        n = int(lengths[i])
        assert ids[i, 0] == eos and ids[i, n - 1] == eos and bool((mask[i, n:] == 0).all())
        text = tokenizer.decode(ids[i, :n], skip_special_tokens=True)
        assert text == stories[i]["text"]
        assert bool((labels[i, n:] == -100).all()) and labels[i, :n].tolist() == ids[i, :n].tolist()
    cut = story_rows(tokenizer, stories[:40], max_len=16)
    assert cut["input_ids"].shape == (40, 16) and bool((cut["attention_mask"] == 1).all())
    with pytest.raises(CodebookError, match="max_len"):
        story_rows(tokenizer, stories[:2], max_len=1)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_tiny_model_config(arch, stories, tokenizer):
    cfg = tiny_story_model_config(tokenizer, arch=arch)
    assert cfg.model_type == arch and cfg.vocab_size == len(tokenizer)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (128, 1, 4)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg)
    x = pack_stories(tokenizer, stories[:20], seq_len=32)[:4]
    out = model(input_ids=x, labels=x)
    assert out.logits.shape == (4, 32, len(tokenizer))
    assert abs(float(out.loss.detach()) - torch.log(torch.tensor(512.0)).item()) < 1.0


def test_tiny_model_config_errors(tokenizer):
    with pytest.raises(CodebookError, match="gpt_neox"):
        tiny_story_model_config(tokenizer, arch="mamba")
    with pytest.raises(CodebookError, match="multiple of num_heads"):
        tiny_story_model_config(tokenizer, hidden_size=130)
