"""The paper's TokFSM analyses against naive computations on hand-built cases: the code
search, the neuron baseline, and code patching scored by Jensen-Shannon divergence."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from codebook_features.errors import CodebookError
from codebook_features.experiments.tokfsm import BOS_TOKEN_ID, VOCAB_SIZE, TokFSM, TokFSMConfig
from codebook_features.experiments.tokfsm import analysis as FA
from codebook_features.experiments.tokfsm import metrics as M
from codebook_features.model import CodebookModel


# ----------------------------------------------------------------------------- naive versions
def naive_search(codes: list[list[int]], targets: list[int], num_states: int,
                 min_recall: float = 0.01) -> dict[int, tuple[int, float, float]]:
    """state -> (code, precision, recall), by counting position by position."""
    fired = Counter(c for row in codes for c in set(row))
    out = {}
    for s in range(num_states):
        where = [i for i, t in enumerate(targets) if t == s]
        hits = Counter(c for i in where for c in set(codes[i]))
        cands = [(hits[c] / fired[c], hits[c] / len(where), -c) for c in hits
                 if hits[c] / len(where) > min_recall]
        if cands:
            p, r, neg = max(cands)
            out[s] = (-neg, p, r)
    return out


def naive_neuron(acts: list[list[float]], targets: list[int], state: int, recall: float
                 ) -> float:
    """Best precision over neurons, each thresholded to ``recall`` on the state's positions."""
    where = [i for i, t in enumerate(targets) if t == state]
    m = math.ceil(round(recall * len(where), 9))
    best = -1.0
    for h in range(len(acts[0])):
        vals = sorted((acts[i][h] for i in where), reverse=True)
        t = vals[m - 1]
        num = sum(acts[i][h] >= t for i in where)
        den = sum(row[h] >= t for row in acts)
        best = max(best, num / den)
    return best


def naive_jsd(p: list[float], q: list[float]) -> float:
    sp, sq = sum(p), sum(q)
    p, q = [x / sp for x in p], [x / sq for x in q]
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    kl = lambda a: sum(x * math.log(x / y) for x, y in zip(a, m, strict=True) if x > 0)  # noqa: E731
    return (kl(p) + kl(q)) / 2


# ----------------------------------------------------------------------------- code search
def test_state_code_search_matches_naive():
    g = torch.Generator().manual_seed(0)
    n, num_codes, num_states = 600, 25, 6
    targets = torch.randint(-1, num_states, (n,), generator=g)
    states = targets.clamp(min=0)
    # codes correlated with the state, plus noise; a code listed twice counts once
    codes = torch.stack([(states * 3 + torch.randint(0, 4, (n,), generator=g)) % num_codes,
                         torch.randint(0, num_codes, (n,), generator=g)], 1)
    codes[::7, 1] = codes[::7, 0]
    res = M.state_code_search(codes, targets, num_codes, num_states)
    want = naive_search(codes.tolist(), targets.tolist(), num_states)
    assert set(want) == set(torch.nonzero(res.found).reshape(-1).tolist())
    for s, (code, p, r) in want.items():
        assert int(res.code[s]) == code
        assert math.isclose(float(res.precision[s]), p, rel_tol=1e-12)
        assert math.isclose(float(res.recall[s]), r, rel_tol=1e-12)
        assert int(res.activations[s]) == sum(code in set(row) for row in codes.tolist())
    assert math.isclose(res.mean("precision"), sum(v[1] for v in want.values()) / len(want))


def test_planted_state_codes():
    # 10 states x 200 final-digit positions, 2000 other positions; code 100 + s is noise
    num_states, per = 10, 200
    targets = torch.cat([torch.arange(num_states).repeat_interleave(per),
                         torch.full((2000,), -1)])
    codes = torch.full((len(targets),), 0)
    codes[:] = 100 + torch.arange(len(targets)) % 7
    codes[targets == 3] = 7                    # state 3: code 7 at every position...
    codes[-1] = 7                              # ...and once elsewhere
    s5 = torch.nonzero(targets == 5).reshape(-1)
    codes[s5[:100]] = 9                        # state 5: code 9 on half its positions only
    s6 = torch.nonzero(targets == 6).reshape(-1)
    codes[s6[:2]] = 11                         # recall 0.01: dropped
    codes[s6[2:5]] = 12                        # recall 0.015: kept, precision 1
    res = M.state_code_search(codes, targets, num_codes=120, num_states=num_states)
    assert int(res.code[3]) == 7 and math.isclose(float(res.precision[3]), per / (per + 1))
    assert float(res.recall[3]) == 1.0 and int(res.activations[3]) == per + 1
    assert int(res.code[5]) == 9 and float(res.precision[5]) == 1.0
    assert float(res.recall[5]) == 0.5
    assert int(res.code[6]) == 12 and math.isclose(float(res.recall[6]), 0.015)
    assert int(res.positions[0]) == per
    with pytest.raises(CodebookError, match="num_codes"):
        M.state_code_search(codes, targets, num_codes=50, num_states=num_states)
    with pytest.raises(CodebookError, match="num_states"):
        M.state_code_search(codes, targets, num_codes=120, num_states=4)
    none = M.state_code_search(codes[:5], torch.full((5,), -1), 120, 3)
    assert not none.found.any() and math.isnan(none.mean("precision"))


# ----------------------------------------------------------------------------- neurons
def test_best_neuron_matches_naive():
    g = torch.Generator().manual_seed(1)
    n, h, num_states = 400, 7, 4
    targets = torch.randint(-1, num_states, (n,), generator=g)
    acts = torch.randn(n, h, generator=g)
    acts[:, 2] += (targets == 1) * 1.5          # a fairly selective neuron for state 1
    acts = acts.round(decimals=1)               # ties at the threshold
    states = torch.tensor([0, 1, 1, 3, 2])
    recalls = torch.tensor([0.5, 0.1, 0.9, 1.0, 0.25])
    prec, idx = M.best_neuron_at_recall(acts, targets, states, recalls)
    for i in range(len(states)):
        s, r = int(states[i]), float(recalls[i])
        n_s = int((targets == s).sum())
        r = math.ceil(r * n_s) / n_s            # a recall the state's count can reach
        want = naive_neuron(acts.tolist(), targets.tolist(), s, r)
        assert math.isclose(float(prec[i]), want, rel_tol=1e-12), (s, r)
        # the chosen neuron has that precision
        col = acts[:, int(idx[i])]
        block = col[targets == s].sort(descending=True).values
        t = block[math.ceil(float(recalls[i]) * n_s * (1 - 1e-6)) - 1]
        assert math.isclose(float(((col >= t) & (targets == s)).sum() / (col >= t).sum()),
                            want, rel_tol=1e-6)


def test_planted_neuron_and_denominator_counts_every_position():
    targets = torch.tensor([-1] * 50 + [0] * 20 + [1] * 30)
    acts = torch.zeros(100, 3)
    acts[targets == 0, 1] = 1.0                 # neuron 1 fires exactly on state 0
    acts[:50, 2] = 5.0                          # neuron 2 fires on untargeted positions
    acts[targets == 1, 2] = 4.0
    prec, idx = M.best_neuron_at_recall(acts, targets, torch.tensor([0, 1]),
                                        torch.tensor([1.0, 1.0]))
    assert float(prec[0]) == 1.0 and int(idx[0]) == 1
    # state 1 at recall 1: neuron 2 also fires on the 50 untargeted positions (30 / 80);
    # neurons 0 and 1 are flat there (threshold 0: every position fires, 30 / 100)
    assert math.isclose(float(prec[1]), 30 / 80) and int(idx[1]) == 2
    empty_p, empty_i = M.best_neuron_at_recall(acts, targets, torch.tensor([7]),
                                               torch.tensor([0.5]))
    assert math.isnan(float(empty_p[0])) and int(empty_i[0]) == -1
    with pytest.raises(CodebookError):
        M.best_neuron_at_recall(acts[:, 0], targets, torch.tensor([0]), torch.tensor([1.0]))


# ----------------------------------------------------------------------------- on a model
@pytest.fixture(scope="module")
def fsm() -> TokFSM:
    return TokFSM(TokFSMConfig(num_states=12, successors=3, states_per_sequence=6, seed=1))


def _neox(seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, bos_token_id=BOS_TOKEN_ID,
                        eos_token_id=BOS_TOKEN_ID)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)
    return model


@pytest.fixture(scope="module")
def cbm():
    return CodebookModel(_neox(), placements=["attn_heads", "mlp_out"], num_codes=16,
                         k=1).eval()


@pytest.fixture(scope="module")
def ids(fsm):
    return fsm.encode(fsm.sample_states(24, seed=5))


def test_collect_reads_codes_and_the_outputs_the_residual_receives(cbm, fsm, ids):
    acts = FA.collect(cbm, ids, batch_size=10)
    n = ids.numel()
    assert acts.neurons.shape == (n, 2 * 2 * 32)
    assert [b[:2] for b in acts.neuron_blocks] == [(0, "attn"), (0, "mlp"), (1, "attn"),
                                                   (1, "mlp")]
    assert acts.neuron_name(32 + 5) == "layer0.mlp[5]" and acts.neuron_name(96) == "layer1.mlp[0]"
    assert acts.codes["layers.0.attn_heads"].shape == (n, 4, 1)
    cbm(ids[:3])
    assert torch.equal(acts.codes["layers.1.mlp_out"][: 3 * ids.shape[1]],
                       cbm.codes()["layers.1.mlp_out"].reshape(-1, 1, 1))
    # the MLP outputs are read after the codebook: the chosen code's vector (k = 1)
    for layer, start in ((0, 32), (1, 96)):
        book = cbm.site(f"layers.{layer}.mlp_out").codebook.detach()[0]
        code = acts.codes[f"layers.{layer}.mlp_out"][:, 0, 0]
        assert torch.allclose(acts.neurons[:, start:start + 32], book[code], atol=1e-5)
    with pytest.raises(CodebookError):
        acts.neuron_name(128)


def test_state_codes_vs_neurons_on_planted_activations(cbm, fsm, ids):
    targets = FA.final_digit_targets(fsm, ids)
    states, digit = fsm.position_states(fsm.decode(ids))
    assert torch.equal(targets >= 0, (digit == 1).reshape(-1))
    assert torch.equal(targets[targets >= 0], states.reshape(-1)[targets >= 0])
    real = FA.collect(cbm, ids)
    # plant: the last MLP codebook's code = the state at final digits (perfect state codes),
    # a fixed code elsewhere; one neuron = the state id at final digits, -1 elsewhere
    codes = dict(real.codes)
    planted = torch.where(targets >= 0, targets, torch.full_like(targets, 15))
    codes["layers.1.mlp_out"] = planted.view(-1, 1, 1)
    neurons = torch.zeros_like(real.neurons)
    neurons[:, 7] = torch.where(targets >= 0, targets.float(), torch.full_like(targets, -1.0))
    acts = FA.Activations(codes=codes, neurons=neurons, neuron_blocks=real.neuron_blocks)
    out = FA.state_codes_vs_neurons(cbm, fsm, acts, targets, headline="layers.1.mlp_out")
    sc, ne = out["state_codes"], out["neurons"]
    present = sorted(set(targets[targets >= 0].tolist()))
    assert sc["states_covered"] == len(present)
    assert sc["mean_precision"] == 1.0 and sc["mean_recall"] == 1.0
    assert [r["code"] for r in sc["per_state"]] == present
    # the planted neuron at recall 1 admits every state >= s: precision n_s / #(id >= s)
    n_s = Counter(targets[targets >= 0].tolist())
    for row in sc["per_state"]:
        s = row["state"]
        want = n_s[s] / sum(v for t, v in n_s.items() if t >= s)
        assert math.isclose(row["neuron_precision"], want, abs_tol=1e-4)
        if want > 0.5:
            assert row["neuron"] == "layer0.attn[7]"
    assert math.isclose(ne["mean_precision"], sum(ne["precisions"]) / len(ne["precisions"]),
                        rel_tol=1e-3)
    assert ne["count"] == 128
    assert set(sc["codebooks"]) == {"layers.0.attn_heads/0", "layers.0.attn_heads/1",
                                    "layers.0.attn_heads/2", "layers.0.attn_heads/3",
                                    "layers.1.attn_heads/0", "layers.1.attn_heads/1",
                                    "layers.1.attn_heads/2", "layers.1.attn_heads/3",
                                    "layers.0.mlp_out", "layers.1.mlp_out"}
    with pytest.raises(CodebookError, match="no codebook"):
        FA.state_codes_vs_neurons(cbm, fsm, acts, targets, headline="layers.9.mlp_out")


def test_patch_conditions(cbm):
    cond = FA.patch_conditions(cbm)
    assert cond == {"attn_layer0": ["layers.0.attn_heads"], "mlp_layer0": ["layers.0.mlp_out"],
                    "mlp_layer1": ["layers.1.mlp_out"],
                    "attn_all": ["layers.0.attn_heads", "layers.1.attn_heads"],
                    "mlp_all": ["layers.0.mlp_out", "layers.1.mlp_out"],
                    "attn_mlp_all": ["layers.0.attn_heads", "layers.1.attn_heads",
                                     "layers.0.mlp_out", "layers.1.mlp_out"]}


def test_patch_states_matches_naive_patching(cbm, fsm, ids):
    out = FA.patch_states(cbm, fsm, ids, pairs_per_state=3, seed=2)
    assert out["pairs"] == len(out["pairs_used"]) == 3 * fsm.num_states
    assert not any(layer.interventions for layer in cbm.sites.values())
    # naive: B's codes from BOS + B; pair by pair, the library's replace_code puts them in
    # every group and slot of the patched codebooks at A's final digit; JSD by the formula
    alone = fsm.encode(torch.arange(fsm.num_states)[:, None])
    with torch.no_grad():
        b_probs = torch.softmax(cbm(alone).logits[:, -1].double(), -1)
        b_codes = {n: c[:, -1] for n, c in cbm.codes().items()}

    def patched(prefix, b, sites):
        for n in sites:
            for g in range(b_codes[n].shape[1]):
                cbm.site(n).replace_code(int(b_codes[n][b, g, 0]), slot=0, group=g,
                                         positions=[prefix.shape[0] - 1])

    for cond in ("mlp_layer1", "attn_all", "mlp_all", "attn_mlp_all"):
        sites = out["conditions"][cond]
        num = den = mass = 0.0
        for a, b, row, j in out["pairs_used"]:
            assert int(fsm.decode(ids[row:row + 1])[0, j]) == a and a != b
            prefix = ids[row, : 1 + 2 * (j + 1)]
            with torch.no_grad():
                plain = torch.softmax(cbm(prefix[None]).logits[0, -1].double(), -1)
                patched(prefix, b, sites)
                p = torch.softmax(cbm(prefix[None]).logits[0, -1].double(), -1)
                if cond == "mlp_all":
                    probs = M.next_state_probs(cbm, prefix, fsm)
                    mass += sum(float(probs[s]) for s in fsm.successors(b)) / float(probs.sum())
            cbm.clear_interventions()
            num += naive_jsd(p.tolist(), b_probs[b].tolist())
            den += naive_jsd(plain.tolist(), b_probs[b].tolist())
        assert math.isclose(out["normalized_jsd"][cond], round(num / den, 4), abs_tol=2e-4)
        assert math.isclose(out["jsd_unpatched"], round(den / out["pairs"], 4), abs_tol=1e-4)
        if cond == "mlp_all":
            assert math.isclose(out["success"], round(mass / out["pairs"], 4), abs_tol=2e-4)
    assert 0 <= out["success_before"] <= 1


def test_remainder_conditions_are_scored_apart_on_the_same_pairs(cbm, fsm, ids):
    extra = FA.remainder_conditions(cbm)
    mlp = ["layers.0.mlp_out", "layers.1.mlp_out"]
    assert extra == {"mlp_all+attn_layer0": [*mlp, "layers.0.attn_heads"],
                     "mlp_all+attn_layer1": [*mlp, "layers.1.attn_heads"]}
    plain = FA.patch_states(cbm, fsm, ids, pairs_per_state=2, seed=3)
    got = FA.patch_states(cbm, fsm, ids, pairs_per_state=2, seed=3, extra=extra)
    # the paper's figures are untouched; the extra ones are those of ordinary conditions
    assert got["normalized_jsd"] == plain["normalized_jsd"]
    assert got["pairs_used"] == plain["pairs_used"] and "remainder" not in plain
    as_conditions = FA.patch_states(cbm, fsm, ids, pairs_per_state=2, seed=3,
                                    conditions={**FA.patch_conditions(cbm), **extra})
    assert got["remainder"]["normalized_jsd"] == {
        k: as_conditions["normalized_jsd"][k] for k in extra}
    assert got["remainder"]["conditions"] == extra


def test_next_state_probs_of_the_patch_pass_match_the_generic_one(cbm, fsm, ids):
    prefix = ids[:5, :7]
    got = FA._next_state_probs(cbm, fsm, prefix, None, 6)
    assert torch.allclose(got, M.next_state_probs(cbm, prefix, fsm), atol=1e-9)
    three = TokFSM(TokFSMConfig(num_states=300, successors=3, states_per_sequence=4, digits=3,
                                seed=0))
    prefix3 = three.encode(three.sample_states(2, seed=1))[:, :7]
    got3 = FA._next_state_probs(cbm, three, prefix3, None, 6)
    assert torch.allclose(got3, M.next_state_probs(cbm, prefix3, three), atol=1e-9)


def test_patch_that_determines_the_output_gives_jsd_zero(fsm, ids):
    # a codebook on the last block's output: the logits at a position are a function of its
    # code there, so overwriting it with B's code reproduces B's next-token distribution
    model = CodebookModel(_neox(1), placements=["residual"], layers=[1], num_codes=16,
                          k=1).eval()
    assert FA.patch_conditions(model) == {}
    out = FA.patch_states(model, fsm, ids, pairs_per_state=2, seed=0,
                          conditions={"last_block": ["layers.1.residual"]})
    assert out["jsd_unpatched"] > 0
    assert out["normalized_jsd"]["last_block"] == 0.0 and out["jsd"]["last_block"] == 0.0
    assert out["success"] is None
    with pytest.raises(CodebookError, match="no attention or MLP"):
        FA.patch_states(model, fsm, ids)
