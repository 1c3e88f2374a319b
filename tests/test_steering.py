"""Steering: forced codes during cached generation match a naive full-recompute loop; topic
codes match a naive count; the topic-steering table counts mentions correctly."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from codebook_features.errors import CodebookError
from codebook_features.experiments.stories import (
    generate_stories,
    tiny_story_model_config,
    train_story_tokenizer,
)
from codebook_features.model import CodebookModel
from codebook_features.steering import (
    SteerCode,
    format_steering_table,
    parse_steer_code,
    rank_topic_codes,
    steer_generate,
    steering,
    topic_steering_eval,
    wilson_interval,
)

SITE = "layers.0.attn_heads"


@pytest.fixture(scope="module")
def workload():
    stories = generate_stories(num_stories=120, seed=1)
    tok = train_story_tokenizer(stories, vocab_size=400)
    torch.manual_seed(0)
    cfg = tiny_story_model_config(tok, hidden_size=32, num_layers=2, num_heads=4,
                                  max_position_embeddings=128)
    base = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model = CodebookModel(base, placements=["attn_heads", "mlp_out"], num_codes=32, k=2)
    return stories, tok, model


def _naive_greedy(model, ids: list[int], new: int, codes, mode: str, positions) -> list[int]:
    """Greedy decoding without a cache: every step recomputes the whole sequence with the
    interventions at absolute positions (the input always starts at position 0)."""
    seq = list(ids)
    for _ in range(new):
        for c in codes:
            layer = model.site(c.site)
            if mode == "append":
                layer.append_code(c.code, group=c.group, positions=positions)
            else:
                layer.replace_code(c.code, group=c.group, positions=positions)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits
        model.clear_interventions()
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("mode", ["append", "replace"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated", [1, 4, 7]])
def test_cached_generation_matches_naive_recompute(workload, mode, positions):
    _, tok, model = workload
    codes = [SteerCode(SITE, 5, 1), SteerCode("layers.1.mlp_out", 9, 0)]
    prompt = "Once upon a time"
    ids = tok(prompt)["input_ids"]
    new = 6
    text = steer_generate(model, tok, prompt, codes, mode=mode, positions=positions,
                          max_new_tokens=new, do_sample=False)[0]
    if positions == "all":
        pos = None
    elif positions == "prompt":
        pos = list(range(len(ids)))
    elif positions == "generated":
        pos = list(range(len(ids), len(ids) + new))
    else:
        pos = positions
    want = _naive_greedy(model, ids, new, codes, mode, pos)
    assert text == tok.decode(want, skip_special_tokens=True)
    assert all(not layer.interventions for layer in model.sites.values())
    assert all(layer.position_offset == 0 for layer in model.sites.values())


def test_steering_changes_generation_and_unsteered_is_plain_generate(workload):
    _, tok, model = workload
    ids = tok("One day")["input_ids"]
    plain = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    unsteered = steer_generate(model, tok, "One day", [], max_new_tokens=8, do_sample=False)
    assert unsteered[0] == tok.decode(plain[0, len(ids):], skip_special_tokens=True)
    # Forcing 2 codes of every group of every site changes the greedy continuation.
    codes = [SteerCode(s, c, g) for s, layer in model.sites.items()
             for g in range(layer.config.groups) for c in (3, 4)]
    steered = steer_generate(model, tok, "One day", codes, max_new_tokens=8, do_sample=False)
    assert steered != unsteered


def test_sampling_is_seeded_and_leaves_global_rng(workload):
    _, tok, model = workload
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = steer_generate(model, tok, "", [], max_new_tokens=10, num_samples=3, seed=7)
    after = torch.rand(1)
    b = steer_generate(model, tok, "", [], max_new_tokens=10, num_samples=3, seed=7)
    assert a == b and len(a) == 3
    assert torch.equal(before, after)  # the global random state was not consumed


def test_steering_context_restores_earlier_interventions(workload):
    _, _, model = workload
    layer = model.site(SITE)
    layer.ablate_codes([1], group=0)
    with steering(model, [SteerCode(SITE, 2, 0)]):
        assert len(layer.interventions) == 2
    assert [iv.kind for iv in layer.interventions] == ["ablate"]
    model.clear_interventions()


def test_rank_topic_codes_matches_naive_count(workload):
    stories, tok, model = workload
    texts = [s["text"] for s in stories[:30]]
    labels = [s["topic"] for s in stories[:30]]
    ranked = rank_topic_codes(model, tok, texts, labels, sites=[SITE], top=5)
    # Naive: per document, the share of tokens each code fires on, as nested Python loops.
    share: dict[str, dict[tuple[int, int], list[float]]] = {}
    for text, label in zip(texts, labels, strict=True):
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        codes = model.codes()[SITE][0].tolist()
        counts: dict[tuple[int, int], int] = {}
        for tok_codes in codes:
            for g, ks in enumerate(tok_codes):
                for c in set(ks):
                    counts[(g, c)] = counts.get((g, c), 0) + 1
        per = share.setdefault(label, {})
        for key in {(g, c) for g in range(4) for c in range(32)}:
            per.setdefault(key, []).append(counts.get(key, 0) / len(codes))
    mean = {t: {k: sum(v) / len(v) for k, v in d.items()} for t, d in share.items()}
    for topic, rows in ranked.items():
        scores = {k: mean[topic][k] - max(mean[o][k] for o in mean if o != topic)
                  for k in mean[topic]}
        best = sorted(scores.values(), reverse=True)[:5]
        got = [r.share - r.other_share for r in rows]
        assert got == pytest.approx(best, abs=1e-9)
        for r in rows:
            assert r.share == pytest.approx(mean[topic][(r.group, r.code)], abs=1e-9)


def test_topic_steering_eval_counts_mentions(workload, monkeypatch):
    _, tok, model = workload
    import codebook_features.steering as st

    def fake(model, tok, prompt, codes, **kw):
        n = kw["num_samples"]
        if not codes:
            return ["a dragon flew"] + ["nothing"] * (n - 1)
        return ["the dragons"] * (n - 1) + ["a flower"]

    monkeypatch.setattr(st, "steer_generate", fake)
    rows, samples = topic_steering_eval(model, tok, {"dragon": [SteerCode(SITE, 1, 0)],
                                                     "flower": [SteerCode(SITE, 2, 0)]},
                                        prompts=["", "One day,"], samples_per_prompt=4)
    by = {r.topic: r for r in rows}
    assert by["dragon"].baseline == pytest.approx(2 / 8) and by["dragon"].steered == 6 / 8
    assert by["flower"].baseline == 0 and by["flower"].steered == pytest.approx(2 / 8)
    assert by["dragon"].samples == 8 and set(samples) == {"baseline", "dragon", "flower"}
    table = format_steering_table(rows)
    assert "| dragon | 1 | 8 | 25.0% | 75.0% |" in table


def test_wilson_interval_against_formula():
    lo, hi = wilson_interval(0, 20)
    assert lo == 0 and 0.15 < hi < 0.17  # rule of three-ish: 0.161
    lo, hi = wilson_interval(10, 20)
    assert lo == pytest.approx(0.2993, abs=1e-3) and hi == pytest.approx(0.7007, abs=1e-3)


def test_bad_input(workload):
    _, tok, model = workload
    with pytest.raises(CodebookError, match="no codebook at site"):
        steer_generate(model, tok, "x", [SteerCode("layers.9.mlp_out", 1)], max_new_tokens=2)
    with pytest.raises(CodebookError, match="do not exist"):
        steer_generate(model, tok, "x", [SteerCode(SITE, 999)], max_new_tokens=2)
    with pytest.raises(CodebookError, match="mode"):
        steer_generate(model, tok, "x", [SteerCode(SITE, 1)], mode="boost", max_new_tokens=2)
    with pytest.raises(CodebookError, match="positions"):
        steer_generate(model, tok, "x", [SteerCode(SITE, 1)], positions="middle",
                       max_new_tokens=2)
    with pytest.raises(CodebookError, match="over k=2 slots"):
        steer_generate(model, tok, "x", [SteerCode(SITE, c) for c in (1, 2, 3)], mode="replace",
                       max_new_tokens=2)
    with pytest.raises(CodebookError, match="positions"):
        steer_generate(model, tok, "x", [], max_new_tokens=500)
    with pytest.raises(CodebookError, match="SITE:GROUP:CODE"):
        parse_steer_code("layers.0.attn_heads:x")
    assert parse_steer_code("layers.0.attn_heads:3:17") == SteerCode(SITE, 17, 3)
    assert parse_steer_code("layers.0.attn_heads:17") == SteerCode(SITE, 17, 0)
    assert all(not layer.interventions for layer in model.sites.values())
