"""TokFSM metrics, each against a naive formulation written here with plain loops."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from codebook_features import lm as L
from codebook_features.errors import CodebookError
from codebook_features.experiments.tokfsm import BOS_TOKEN_ID, VOCAB_SIZE, TokFSM, TokFSMConfig
from codebook_features.experiments.tokfsm import metrics as M


@pytest.fixture(scope="module")
def fsm() -> TokFSM:
    return TokFSM(TokFSMConfig(num_states=40, successors=5, states_per_sequence=12, seed=1))


@pytest.fixture(scope="module")
def neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, bos_token_id=BOS_TOKEN_ID,
                        eos_token_id=BOS_TOKEN_ID)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(cfg).eval()
    # Sharpen the random model's output so its distributions are far from uniform.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model


class PerfectModel:
    """Logits that put all mass on tokens that continue a valid FSM walk (uniformly).

    Supports a trivial KV cache (the cache is the prefix itself) to exercise that path."""

    def __init__(self, fsm: TokFSM) -> None:
        self.fsm = fsm

    def _allowed(self, prefix: list[int]) -> set[int]:
        d = self.fsm.digits
        body = prefix[1:]
        done, partial = divmod(len(body), d)
        if done == 0:
            candidates = set(range(self.fsm.num_states))
        else:
            last = int("".join(map(str, body[(done - 1) * d: done * d])))
            candidates = set(self.fsm.successors(last))
        head = body[done * d:]
        return {int(self.fsm.state_string(s)[partial]) for s in candidates
                if [int(c) for c in self.fsm.state_string(s)[:partial]] == head}

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        full = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], 1)
        start = full.shape[1] - input_ids.shape[1]
        logits = torch.full((*input_ids.shape, VOCAB_SIZE), -1e4)
        for b in range(full.shape[0]):
            for t in range(start, full.shape[1]):
                for tok in self._allowed(full[b, : t + 1].tolist()):
                    logits[b, t - start, tok] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=full if use_cache else None)

    __call__ = forward


class UniformModel:
    """Equal logits over all 11 tokens."""

    def __call__(self, input_ids):
        return torch.zeros(*input_ids.shape, VOCAB_SIZE)


# ---------------------------------------------------------------- LM metrics
def naive_lm_metrics(model, rows, labels):
    total, correct, n = 0.0, 0, 0
    for ids, lab in zip(rows, labels, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        for t in range(len(ids) - 1):
            y = lab[t + 1]
            if y == -100:
                continue
            logp = torch.log_softmax(logits[t].double(), -1)
            total -= float(logp[y])
            correct += int(int(logits[t].argmax()) == y)
            n += 1
    return total / n, correct / n, n


def test_lm_metrics_matches_naive(neox, fsm):
    ds = fsm.dataset(5, seed=0)
    got = L.lm_metrics(neox, ds, batch_size=2)
    loss, acc, n = naive_lm_metrics(neox, ds["input_ids"], ds["labels"])
    assert got.tokens == n == 5 * 24
    assert math.isclose(got.loss, loss, rel_tol=1e-5) and math.isclose(got.accuracy, acc)
    # -100 labels are skipped; a plain tensor input works too.
    labels = torch.tensor(ds["labels"])
    labels[:, :7] = -100
    got = L.lm_metrics(neox, {"input_ids": ds["input_ids"], "labels": labels})
    loss, acc, n = naive_lm_metrics(neox, ds["input_ids"], labels.tolist())
    assert got.tokens == n == 5 * 18 and math.isclose(got.loss, loss, rel_tol=1e-5)
    assert L.lm_metrics(neox, torch.tensor(ds["input_ids"])).tokens == 120


def test_lm_metrics_uniform_model(fsm):
    got = L.lm_metrics(UniformModel(), fsm.sample(3).input_ids)
    assert math.isclose(got.loss, math.log(VOCAB_SIZE), rel_tol=1e-6)


def test_lm_metrics_errors(neox):
    with pytest.raises(CodebookError):
        L.lm_metrics(neox, torch.tensor([[1]]))
    with pytest.raises(CodebookError):
        L.lm_metrics(lambda x: torch.zeros(3), torch.tensor([[1, 2]]))


# ---------------------------------------------------------------- sampling / state accuracy
def test_transition_accuracy_naive(fsm):
    g = torch.Generator().manual_seed(0)
    states = torch.randint(-1, 41, (20, 12), generator=g)
    states[:10] = fsm.sample_states(10, seed=3)[:, :12]
    succ = fsm.successor_sets()
    ok = total = 0
    for row in states.tolist():
        for a, b in zip(row[:-1], row[1:], strict=True):
            total += 1
            ok += int(0 <= a < 40 and b in succ[a])
    assert math.isclose(M.transition_accuracy(states, fsm), ok / total, rel_tol=1e-6)
    assert M.transition_accuracy(fsm.sample_states(5), fsm) == 1.0


def test_perfect_model_state_accuracy_is_one(fsm):
    model = PerfectModel(fsm)
    assert M.state_accuracy(model, fsm, n_sequences=6, num_states=8) == 1.0
    assert M.first_transition_accuracy(model, fsm, samples_per_state=2) == 1.0
    assert math.isclose(M.first_transition_accuracy(model, fsm, exact=True), 1.0,
                        rel_tol=1e-6)
    # The sampled walk is a valid FSM sequence (BOS + digits) and the cache path was used.
    toks = M.sample_tokens(model, 3, 8, seed=1)
    assert toks[:, 0].eq(BOS_TOKEN_ID).all() and toks[:, 1:].lt(10).all()
    assert torch.equal(toks, M.sample_tokens(model, 3, 8, seed=1, use_cache=False))


def test_uniform_model_state_accuracy(fsm):
    # Each sampled token is uniform over 11 ids, so a state pair is valid with probability
    # num_states * successors / 11**4.
    p = 40 * 5 / 11**4
    acc = M.state_accuracy(UniformModel(), fsm, n_sequences=300, num_states=12, seed=0)
    sd = math.sqrt(p * (1 - p) / (300 * 11))
    assert abs(acc - p) < 5 * sd
    assert math.isclose(M.first_transition_accuracy(UniformModel(), fsm, exact=True),
                        5 / 121, rel_tol=1e-6)


def test_sampling_with_cache_matches_recompute(neox, fsm):
    a = M.sample_tokens(neox, 7, 10, seed=3, batch_size=4)
    b = M.sample_tokens(neox, 7, 10, seed=3, batch_size=4, use_cache=False)
    assert a.shape == (7, 11) and torch.equal(a, b)
    assert torch.equal(a, M.sample_tokens(neox, 7, 10, seed=3, batch_size=4))
    assert not torch.equal(a, M.sample_tokens(neox, 7, 10, seed=4, batch_size=4))
    g1 = M.sample_tokens(neox, 3, 6, temperature=0)
    assert torch.equal(g1, M.sample_tokens(neox, 3, 6, temperature=0, seed=9))
    # Greedy equals the argmax chain computed by hand.
    ids = torch.tensor([[BOS_TOKEN_ID]])
    for _ in range(6):
        ids = torch.cat([ids, neox(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(g1[0], ids[0])
    acc = M.state_accuracy(neox, fsm, n_sequences=10, num_states=6)
    assert 0.0 <= acc <= 1.0
    with pytest.raises(CodebookError):
        M.sample_tokens(neox, 2, 3, prompt=torch.zeros(3, 1, dtype=torch.long))


def test_next_state_probs_naive(neox, fsm):
    prefix = fsm.encode(torch.tensor([[3, 17], [22, 5]]))
    got = M.next_state_probs(neox, prefix, fsm, batch_size=7)
    assert got.shape == (2, 40)
    with torch.no_grad():
        for b in range(2):
            p1 = torch.softmax(neox(prefix[b:b + 1]).logits[0, -1].double(), -1)
            for s in range(40):
                d0, d1 = divmod(s, 10)
                x = torch.cat([prefix[b], torch.tensor([d0])])[None]
                p2 = torch.softmax(neox(x).logits[0, -1].double(), -1)
                assert math.isclose(float(got[b, s]), float(p1[d0] * p2[d1]), rel_tol=1e-4)
    assert torch.allclose(M.next_state_probs(neox, prefix[1], fsm), got[1])


def test_next_state_probs_three_digits(neox):
    f = TokFSM(TokFSMConfig(num_states=120, successors=3, digits=3, states_per_sequence=3))
    prefix = f.encode(torch.tensor([7, 101]))
    got = M.next_state_probs(neox, prefix, f)
    assert got.shape == (120,) and float(got.sum()) <= 1 + 1e-9
    with torch.no_grad():
        for s in (0, 7, 58, 119):
            p, x = 1.0, prefix.clone()
            for d in f.state_digits(torch.tensor(s)).tolist():
                p *= float(torch.softmax(neox(x[None]).logits[0, -1].double(), -1)[d])
                x = torch.cat([x, torch.tensor([d])])
            assert math.isclose(float(got[s]), p, rel_tol=1e-4)


def test_first_transition_sampled_matches_exact(neox, fsm):
    exact = M.first_transition_accuracy(neox, fsm, exact=True)
    sampled = M.first_transition_accuracy(neox, fsm, samples_per_state=100, seed=0)
    # Mean of 4000 Bernoulli draws around the exact expectation.
    assert abs(sampled - exact) < 5 * math.sqrt(0.25 / 4000)
    # Naive exact: per state, sum over successors of P(next state) from next_state_probs.
    succ = fsm.successor_sets()
    per = []
    for s in range(40):
        p = M.next_state_probs(neox, fsm.encode(torch.tensor([s])), fsm)
        per.append(sum(float(p[x]) for x in succ[s]))
    assert math.isclose(exact, sum(per) / 40, rel_tol=1e-6)
    part = M.first_transition_accuracy(neox, fsm, states=[0, 5], exact=True)
    assert math.isclose(part, (per[0] + per[5]) / 2, rel_tol=1e-6)


# ---------------------------------------------------------------- code / state precision
def naive_code_stats(codes, states, num_codes, num_states, thr, min_act):
    out = []
    for c in range(num_codes):
        hits = [states[i] for i in range(len(states))
                if states[i] >= 0 and c in set(codes[i])]
        if not hits:
            out.append((-1, 0.0, 0.0, 0))
            continue
        per = [hits.count(s) for s in range(num_states)]
        best = max(range(num_states), key=lambda s: (per[s], -s))
        total_s = sum(1 for x in states if x == best)
        out.append((best, per[best] / len(hits), per[best] / total_s, len(hits)))
    state_codes = [c for c, (b, p, _, n) in enumerate(out) if b >= 0 and p >= thr
                   and n >= min_act]
    return out, state_codes


def test_code_state_precision_naive():
    g = torch.Generator().manual_seed(0)
    n, k, num_codes, num_states = 400, 3, 25, 8
    states = torch.randint(-1, num_states, (n,), generator=g)
    codes = torch.randint(0, num_codes, (n, k), generator=g)
    # Make a few clean state codes, and duplicate codes within rows.
    codes[:, 0] = torch.where(states >= 0, states, codes[:, 0])
    codes[::7, 2] = codes[::7, 1]
    codes[codes == 24] = 23  # code 24 never fires
    got = M.code_state_precision(codes, states, num_codes, num_states,
                                 precision_threshold=0.6, min_activations=5)
    want, want_codes = naive_code_stats(codes.tolist(), states.tolist(), num_codes,
                                        num_states, 0.6, 5)
    for c, (b, p, r, act) in enumerate(want):
        assert int(got.best_state[c]) == b and int(got.activations[c]) == act
        assert math.isclose(float(got.precision[c]), p, abs_tol=1e-12)
        assert math.isclose(float(got.recall[c]), r, abs_tol=1e-12)
    assert got.state_codes.tolist() == want_codes
    assert got.best_state[24] == -1 and got.precision[24] == 0
    assert len(want_codes) >= 4 and all(want[c][0] == c for c in want_codes)
    assert got.states_covered() == len({want[c][0] for c in want_codes})
    assert got.codes_for_state(3).tolist() == [c for c in want_codes if want[c][0] == 3]
    ref = sum(want[c][1] for c in want_codes) / len(want_codes)
    assert math.isclose(got.mean_state_code_precision, ref, rel_tol=1e-9)


def test_state_codes_at_the_thresholds():
    """Precision exactly at the threshold and activations exactly at the minimum count."""
    #         code 0: 3 of 4 in state 0 (0.75)   code 1: 2 of 4 (0.5)
    #         code 2: 4 of 4, 4 activations       code 3: 3 of 3, one too few
    codes = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    states = [0, 0, 0, 1, 1, 1, 0, 0, 2, 2, 2, 2, 3, 3, 3]
    got = M.code_state_precision(torch.tensor(codes), torch.tensor(states), 4, 4,
                                 precision_threshold=0.75, min_activations=4)
    assert got.precision.tolist() == [0.75, 0.5, 1.0, 1.0]
    assert got.state_codes.tolist() == [0, 2]


def test_code_state_precision_perfect_and_errors():
    states = torch.arange(10).repeat(5)
    got = M.code_state_precision(states[:, None] + 2, states, 12, 10, min_activations=5)
    assert got.state_codes.tolist() == list(range(2, 12))
    assert torch.all(got.precision[2:] == 1) and torch.all(got.recall[2:] == 1)
    assert torch.equal(got.best_state[2:], torch.arange(10))
    one_d = M.code_state_precision(states + 2, states, 12, 10, min_activations=5)
    assert torch.equal(one_d.counts, got.counts)
    with pytest.raises(CodebookError, match="num_codes"):
        M.code_state_precision(states[:, None] + 3, states, 12)
    with pytest.raises(CodebookError, match="positions"):
        M.code_state_precision(states[:, None], states[:-1], 12)


# ---------------------------------------------------------------- neuron baseline
def naive_neuron_precision(acts, states, h, s, r):
    col = [row[h] for row in acts]
    vals = sorted((col[i] for i in range(len(col)) if states[i] == s), reverse=True)
    if not vals:
        return float("nan")
    k = min(len(vals), max(1, math.ceil(round(r * len(vals), 6))))
    t = vals[k - 1]
    pred = [i for i in range(len(col)) if states[i] >= 0 and col[i] >= t]
    return sum(1 for i in pred if states[i] == s) / len(pred)


def _acts_with_ties(n=300, h=6, num_states=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randint(-1, num_states, (n,), generator=g)
    acts = (torch.randn(n, h, generator=g) * 2).round() / 2  # many ties
    acts[:, 0] += 3 * (states == 2)  # neuron 0 likes state 2
    return acts, states


@pytest.mark.parametrize("recalls", [0.5, 0.3, 1.0, 0.01, [0.2, 0.4, 0.6, 0.8, 1.0]])
def test_neuron_state_precision_naive(recalls):
    acts, states = _acts_with_ties()
    got = M.neuron_state_precision(acts, states, torch.tensor(recalls), num_states=5)
    a, st = acts.tolist(), states.tolist()
    for h in range(6):
        row = []
        for s in range(5):
            r = recalls[s] if isinstance(recalls, list) else recalls
            want = naive_neuron_precision(a, st, h, s, r)
            assert math.isclose(float(got.precision[h, s]), want, abs_tol=1e-12)
            row.append(want)
        assert math.isclose(float(got.best_precision[h]), max(row), abs_tol=1e-12)
        assert row[int(got.best_state[h])] == max(row)
    assert int(got.best_state[0]) == 2


def test_neuron_state_precision_perfect_neuron():
    states = torch.arange(6).repeat(10)
    acts = torch.stack([(states == 4).float(), torch.zeros(60)], 1)
    got = M.neuron_state_precision(acts, states, 0.5)
    assert got.best_state[0] == 4 and got.best_precision[0] == 1.0
    assert math.isclose(float(got.best_precision[1]), 1 / 6)  # constant: everything fires
    with pytest.raises(CodebookError, match="recalls"):
        M.neuron_state_precision(acts, states, torch.tensor([0.5, 0.5]))


def test_neuron_precision_at_code_recall_naive():
    acts, states = _acts_with_ties(seed=1)
    code_states = torch.tensor([2, 0, 4, 2, -1, 3, 1])
    code_recalls = torch.tensor([0.5, 0.9, 0.1, 1.0, 0.5, 0.33, 0.0])
    prec, neuron = M.neuron_precision_at_code_recall(acts, states, code_states, code_recalls)
    a, st = acts.tolist(), states.tolist()
    for c in range(7):
        s, r = int(code_states[c]), float(code_recalls[c])
        if s < 0:
            assert math.isnan(float(prec[c])) and neuron[c] == -1
            continue
        per = [naive_neuron_precision(a, st, h, s, r) for h in range(6)]
        assert math.isclose(float(prec[c]), max(per), abs_tol=1e-12)
        assert per[int(neuron[c])] == max(per)
    # Consistent with neuron_state_precision at a shared recall.
    full = M.neuron_state_precision(acts, states, 0.5, num_states=5)
    p2, _ = M.neuron_precision_at_code_recall(acts, states, torch.arange(5), torch.full((5,), .5))
    assert torch.allclose(p2, full.precision.max(0).values)


# ---------------------------------------------------------------- intervention math
def naive_jsd(p, q):
    sp, sq = sum(p), sum(q)
    p, q = [x / sp for x in p], [x / sq for x in q]
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    kl = lambda a: sum(x * math.log(x / y) for x, y in zip(a, m, strict=True) if x > 0)  # noqa: E731
    return (kl(p) + kl(q)) / 2


def test_js_divergence_naive():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4, 9, generator=g)
    q = torch.rand(4, 9, generator=g)
    p[0, :3] = 0
    q[1, 5:] = 0
    got = M.js_divergence(p, q)
    raw = M.js_divergence(p, q, normalized=False)
    for i in range(4):
        want = naive_jsd(p[i].tolist(), q[i].tolist())
        assert math.isclose(float(raw[i]), want, rel_tol=1e-9)
        assert math.isclose(float(got[i]), want / math.log(2), rel_tol=1e-9)
    assert torch.allclose(got, M.js_divergence(q, p))
    assert float(M.js_divergence(p[2], p[2] * 3)) < 1e-12  # renormalised: identical
    assert math.isclose(float(M.js_divergence(torch.tensor([1., 0]), torch.tensor([0., 1]))), 1)


def test_successor_mass_and_intervention_effect(fsm):
    g = torch.Generator().manual_seed(0)
    before = torch.rand(3, 40, generator=g) * 0.02
    after = torch.rand(3, 40, generator=g) * 0.02
    succ_b = fsm.successors(9)
    after[:, succ_b] += 0.5
    eff = M.intervention_effect(before, after, succ_b)
    target = [1 / 5 if s in succ_b else 0.0 for s in range(40)]
    for i in range(3):
        mb = sum(float(before[i, s]) for s in succ_b) / sum(before[i].tolist())
        ma = sum(float(after[i, s]) for s in succ_b) / sum(after[i].tolist())
        assert math.isclose(float(eff.mass_before[i]), mb, rel_tol=1e-9)
        assert math.isclose(float(eff.mass_after[i]), ma, rel_tol=1e-9)
        assert math.isclose(float(eff.moved[i]), ma - mb, rel_tol=1e-9)
        want = naive_jsd(after[i].tolist(), target) / math.log(2)
        assert math.isclose(float(eff.jsd_after[i]), want, rel_tol=1e-9)
        want = naive_jsd(before[i].tolist(), target) / math.log(2)
        assert math.isclose(float(eff.jsd_before[i]), want, rel_tol=1e-9)
    assert eff.summary()["mass_after"] > 0.8 > 0.2 > eff.summary()["mass_before"]
    mask = fsm.adjacency[9]
    assert torch.allclose(M.successor_mass(after, mask), eff.mass_after)
    exact = M.intervention_effect(before[0], fsm.next_state_distribution(9), succ_b)
    assert float(exact.mass_after) == 1.0 and float(exact.jsd_after) < 1e-12
    with pytest.raises(CodebookError):
        M.intervention_effect(before, after[:, :5], succ_b)
