"""TokFSM data: machine, sampling, encoding, tokenizer, datasets, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from codebook_features.errors import CodebookError
from codebook_features.experiments.tokfsm import (
    BOS_TOKEN,
    BOS_TOKEN_ID,
    VOCAB_SIZE,
    TokFSM,
    TokFSMConfig,
    build_splits,
    build_tokenizer,
)


@pytest.fixture(scope="module")
def fsm() -> TokFSM:
    return TokFSM(TokFSMConfig(num_states=40, successors=5, states_per_sequence=16, seed=3))


# ---------------------------------------------------------------- config and machine
@pytest.mark.parametrize("kwargs, words", [
    ({"num_states": 10, "successors": 11}, "successors"),
    ({"num_states": 0}, "num_states"),
    ({"successors": 0}, "successors"),
    ({"num_states": 101, "digits": 2}, "digits"),
    ({"digits": 0}, "digits"),
    ({"states_per_sequence": 0}, "states_per_sequence"),
    ({"seed": 1.5}, "seed"),
])
def test_config_validation(kwargs, words):
    with pytest.raises(CodebookError, match=words):
        TokFSMConfig(**kwargs)


def test_defaults_are_the_papers():
    c = TokFSMConfig()
    assert (c.num_states, c.successors, c.digits, c.states_per_sequence) == (100, 10, 2, 64)
    assert c.seq_len == 129
    TokFSMConfig(num_states=1000, digits=3)  # 10**3 >= 1000 is fine


def test_transition_table(fsm):
    t = fsm.transitions
    assert t.shape == (40, 5) and t.dtype == torch.long
    succ = fsm.successor_sets()
    for s in range(40):
        row = t[s].tolist()
        assert len(set(row)) == 5 and all(0 <= x < 40 for x in row)
        assert fsm.successors(s) == sorted(row) and succ[s] == set(row)
        for b in range(40):
            assert fsm.is_valid_edge(s, b) == (b in succ[s]) == bool(fsm.adjacency[s, b])
    assert not fsm.is_valid_edge(-1, 0) and not fsm.is_valid_edge(0, 40)
    p = fsm.next_state_distribution(7)
    assert math.isclose(float(p.sum()), 1.0) and set(torch.nonzero(p)[:, 0].tolist()) == succ[7]


def test_successors_roughly_uniform():
    # Over many states every target is chosen about successors/num_states of the time.
    f = TokFSM(TokFSMConfig(num_states=20, successors=5, seed=0))
    big = torch.cat([TokFSM(TokFSMConfig(num_states=20, successors=5, seed=s)).transitions
                     for s in range(40)])
    freq = torch.bincount(big.reshape(-1), minlength=20).double() / big.numel()
    assert (freq - 1 / 20).abs().max() < 0.02
    assert f.transitions.shape == (20, 5)


def test_transitions_deterministic_in_seed():
    a = TokFSM(TokFSMConfig(num_states=30, successors=4, seed=1))
    b = TokFSM(TokFSMConfig(num_states=30, successors=4, seed=1))
    c = TokFSM(TokFSMConfig(num_states=30, successors=4, seed=2))
    assert a == b and torch.equal(a.transitions, b.transitions) and a != c
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_bad_transition_tables():
    cfg = TokFSMConfig(num_states=4, successors=2)
    with pytest.raises(CodebookError, match="shape"):
        TokFSM(cfg, transitions=torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(CodebookError, match="outside"):
        TokFSM(cfg, transitions=torch.tensor([[0, 1], [0, 1], [0, 1], [0, 4]]))
    with pytest.raises(CodebookError, match="distinct"):
        TokFSM(cfg, transitions=torch.tensor([[0, 1], [0, 1], [0, 1], [2, 2]]))


# ---------------------------------------------------------------- sampling and encoding
def test_sample_is_valid_and_deterministic(fsm):
    a, b, c = fsm.sample(50, seed=7), fsm.sample(50, seed=7), fsm.sample(50, seed=8)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.states.shape == (50, 16) and a.input_ids.shape == (50, 33)
    succ = fsm.successor_sets()
    for row in a.states.tolist():
        for x, y in zip(row[:-1], row[1:], strict=True):
            assert y in succ[x]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(fsm.sample_states(4, generator=g1), fsm.sample_states(4, generator=g2))
    assert fsm.sample_states(3, num_states=5).shape == (3, 5)


def test_sampling_distribution():
    f = TokFSM(TokFSMConfig(num_states=10, successors=4, states_per_sequence=50, seed=0))
    st = f.sample_states(2000, seed=1)
    start = torch.bincount(st[:, 0], minlength=10).double() / 2000
    assert (start - 0.1).abs().max() < 0.04
    # Successor choice uniform: from each state, each successor about 1/4 of the time.
    counts = torch.zeros(10, 10)
    counts.index_put_((st[:, :-1].reshape(-1), st[:, 1:].reshape(-1)),
                      torch.ones(st[:, 1:].numel()), accumulate=True)
    frac = counts / counts.sum(1, keepdim=True)
    assert torch.all(frac[~f.adjacency] == 0)
    assert (frac[f.adjacency] - 0.25).abs().max() < 0.05


def test_encode_decode_and_ground_truth_naive(fsm):
    s = fsm.sample(6, seed=0)
    for n in range(6):
        text = "".join(str(x).zfill(2) for x in s.states[n].tolist())
        assert s.input_ids[n].tolist() == [BOS_TOKEN_ID] + [int(ch) for ch in text]
        for t in range(s.input_ids.shape[1]):
            if t == 0:
                assert s.position_states[n, t] == -1 and s.digit_index[n, t] == -1
            else:
                assert s.position_states[n, t] == s.states[n, (t - 1) // 2]
                assert s.digit_index[n, t] == (t - 1) % 2
    assert torch.equal(fsm.decode(s.input_ids), s.states)
    assert torch.equal(fsm.decode(s.input_ids[0]), s.states[0])
    assert torch.equal(fsm.decode(s.input_ids[:, 1:], bos=False), s.states)
    assert fsm.state_string(7) == "07"


def test_decode_invalid_states(fsm):
    ids = torch.tensor([[BOS_TOKEN_ID, 0, 7, 4, 5, BOS_TOKEN_ID, 1, 3, 9, 1]])
    # "07" ok, "45" >= 40 -> -1, "<bos>1" -> -1, "39" ok, trailing "1" dropped.
    assert fsm.decode(ids).tolist() == [[7, -1, -1, 39]]
    with pytest.raises(CodebookError, match="encode"):
        fsm.encode(torch.tensor([[40]]))


def test_valid_edges_vectorised(fsm):
    a = torch.randint(-1, 42, (200,), generator=torch.Generator().manual_seed(0))
    b = torch.randint(-1, 42, (200,), generator=torch.Generator().manual_seed(1))
    got = fsm.valid_edges(a, b).tolist()
    assert got == [fsm.is_valid_edge(int(x), int(y)) for x, y in zip(a, b, strict=True)]


def test_three_digit_fsm():
    f = TokFSM(TokFSMConfig(num_states=150, successors=3, digits=3, states_per_sequence=4))
    s = f.sample(3, seed=0)
    assert s.input_ids.shape == (3, 13)
    assert torch.equal(f.decode(s.input_ids), s.states)
    assert s.digit_index[0].tolist() == [-1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_ids_and_round_trip(tmp_path, fsm):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    assert len(tok) == VOCAB_SIZE == 11
    assert [tok.convert_tokens_to_ids(str(d)) for d in range(10)] == list(range(10))
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == BOS_TOKEN_ID
    assert tok(BOS_TOKEN + "0712")["input_ids"] == [10, 0, 7, 1, 2]
    assert tok("07 12")["input_ids"] == [0, 7, 1, 2]
    s = fsm.sample(3, seed=2)
    texts = [BOS_TOKEN + "".join(fsm.state_string(x) for x in row) for row in s.states.tolist()]
    assert tok(texts)["input_ids"] == s.input_ids.tolist()

    fsm.tokenizer().save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded(texts)["input_ids"] == s.input_ids.tolist()
    assert loaded.decode(s.input_ids[0]) == texts[0]
    assert loaded.decode(s.input_ids[0], skip_special_tokens=True) == texts[0][len(BOS_TOKEN):]
    assert loaded.pad_token_id == BOS_TOKEN_ID and len(loaded) == 11
    padded = loaded(["12", "3456"], padding=True)["input_ids"]
    assert padded == [[1, 2, 10, 10], [3, 4, 5, 6]]


# ---------------------------------------------------------------- datasets
def test_dataset_format_and_determinism(fsm):
    ds = fsm.dataset(8, seed=4)
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 8
    assert all(len(r) == 33 for r in ds["input_ids"])
    assert ds["input_ids"] == ds["labels"] == fsm.sample(8, seed=4).input_ids.tolist()
    assert fsm.dataset(8, seed=4)["input_ids"] == ds["input_ids"]
    assert fsm.dataset(3, labels=False).column_names == ["input_ids"]
    with pytest.raises(CodebookError):
        fsm.dataset(0)

    from transformers import default_data_collator

    batch = default_data_collator([ds[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 33) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_splits(fsm):
    a, b = build_splits(fsm, 10, 5, seed=1), build_splits(fsm, 10, 5, seed=1)
    assert set(a) == {"train", "eval"} and len(a["train"]) == 10 and len(a["eval"]) == 5
    assert a["train"]["input_ids"] == b["train"]["input_ids"]
    assert a["train"]["input_ids"][:5] != a["eval"]["input_ids"]
    assert build_splits(fsm, 10, 5, seed=2)["train"]["input_ids"] != a["train"]["input_ids"]


def test_trainer_consumes_dataset(tmp_path, fsm):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainingArguments

    cfg = GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=64, bos_token_id=10, eos_token_id=10)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(cfg)
    splits = build_splits(fsm, 16, 8)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2,
                             per_device_train_batch_size=8, per_device_eval_batch_size=8,
                             report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=splits["train"],
                      eval_dataset=splits["eval"])
    trainer.train()
    assert math.isfinite(trainer.evaluate()["eval_loss"])


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path, fsm):
    path = fsm.save(tmp_path / "fsm.json")
    loaded = TokFSM.load(path)
    assert loaded == fsm and loaded.name == fsm.name and loaded.config == fsm.config
    assert fsm.name.startswith("tokfsm-40s-5succ-seed3-")
    (tmp_path / "dir").mkdir()
    assert TokFSM.load(fsm.save(tmp_path / "dir")) == fsm
    data = json.loads(path.read_text())
    assert data["format"] == "tokfsm" and data["fingerprint"] == fsm.fingerprint()


def test_load_errors(tmp_path, fsm):
    with pytest.raises(CodebookError, match="not found"):
        TokFSM.load(tmp_path / "missing.json")
    data = fsm.to_dict()
    row = data["transitions"][0]
    row[0] = next(x for x in range(40) if x not in row)  # still a valid table, but edited
    with pytest.raises(CodebookError, match="fingerprint"):
        TokFSM.from_dict(data)
    with pytest.raises(CodebookError, match="format"):
        TokFSM.from_dict({"format": "other"})
    bad = fsm.to_dict()
    bad["config"]["bogus"] = 1
    with pytest.raises(CodebookError, match="unknown"):
        TokFSM.from_dict(bad)
    (tmp_path / "corrupt.json").write_text("{not json")
    with pytest.raises(CodebookError, match="JSON"):
        TokFSM.load(tmp_path / "corrupt.json")
