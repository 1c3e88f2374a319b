"""The paper's TokFSM analyses of a codebook model, done as the authors do them (DESIGN §2b).

* **State codes vs neurons** (:func:`state_codes_vs_neurons`): in every codebook (every site
  and group), each state's best code, found on the positions of the state's final digit
  (:func:`.metrics.state_code_search`), against the best single dimension of the attention
  and MLP outputs of every layer thresholded at the code's recall
  (:func:`.metrics.best_neuron_at_recall`). The neurons are read where the residual stream
  receives them, i.e. after any codebook at that output.
* **Code patching** (:func:`patch_states`): state B's codes are read by running BOS + B's
  digits alone; at the final digit of state A in a held-out sequence, *all* codes of the
  patched codebooks are overwritten with B's; the Jensen–Shannon divergence of the
  next-token distribution from B's own (B alone) is averaged over (A, B) pairs and divided by
  the same average without the patch (1: no effect, 0: the model behaves exactly as on B).

Token positions follow :mod:`codebook_features.experiments.tokfsm.data` (BOS at position 0, then the
digits of each state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ... import lm
from ... import sites as sites_mod
from ...errors import CodebookError
from . import metrics as fm
from .data import NUM_DIGIT_TOKENS

ATTN_PLACEMENTS = ("attn_heads", "attn_out")
MLP_PLACEMENTS = ("mlp_out", "mlp_hidden")


@dataclass
class Activations:
    """One pass of a codebook model over token rows."""

    codes: dict[str, torch.Tensor]
    """Site name -> (positions, G, k) codes at every position (rows flattened)."""
    neurons: torch.Tensor
    """(positions, H) the attention and MLP outputs of every layer, side by side."""
    neuron_blocks: list[tuple[int, str, int]]
    """(layer, 'attn' or 'mlp', width) of each consecutive block of ``neurons``' columns."""

    def neuron_name(self, column: int) -> str:
        """``layer{i}.{attn|mlp}[dim]`` of a column of ``neurons``."""
        start = 0
        for layer, kind, width in self.neuron_blocks:
            if column < start + width:
                return f"layer{layer}.{kind}[{column - start}]"
            start += width
        raise CodebookError(f"neuron column {column} out of range (0..{start - 1})")


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def collect(cbm, ids: torch.Tensor, batch_size: int = 64) -> Activations:
    """Codes of every site and the attention/MLP outputs of every layer on ``ids`` (N, T)."""
    base = cbm.base_model
    n_layers = sites_mod.num_layers(base)
    outputs = sites_mod.find_sites(base, ["attn_out", "mlp_out"], None)
    blocks = [(s.layer, "attn" if s.placement == "attn_out" else "mlp", s.dim) for s in outputs]
    order = sorted(range(len(outputs)), key=lambda i: (blocks[i][0], blocks[i][1]))
    outputs, blocks = [outputs[i] for i in order], [blocks[i] for i in order]
    if len(outputs) != 2 * n_layers:
        raise CodebookError("could not find the attention and MLP outputs of every layer")
    captured: list[list[torch.Tensor]] = [[] for _ in outputs]
    handles = []
    for i, s in enumerate(outputs):
        def hook(module, args, out, i=i):
            captured[i].append(_output(out).detach().float().reshape(-1, blocks[i][2]).cpu())
        handles.append(base.get_submodule(s.module).register_forward_hook(hook))
    codes: dict[str, list[torch.Tensor]] = {n: [] for n in cbm.site_names}
    was_training = cbm.training
    cbm.eval()
    try:
        for i in range(0, len(ids), batch_size):
            base(input_ids=ids[i:i + batch_size].to(lm.model_device(base)))
            for n, layer in cbm.sites.items():
                c = layer.last_codes
                codes[n].append(c.reshape(-1, *c.shape[-2:]).cpu())
    finally:
        for h in handles:
            h.remove()
        cbm.train(was_training)
    neurons = torch.cat([torch.cat(c) for c in captured], dim=1)
    return Activations(codes={n: torch.cat(c) for n, c in codes.items()}, neurons=neurons,
                       neuron_blocks=blocks)


def final_digit_targets(fsm, ids: torch.Tensor) -> torch.Tensor:
    """(N * T,) the state at each position holding a state's final digit, -1 elsewhere."""
    states, digit = fsm.position_states(fsm.decode(ids))
    return torch.where(digit == fsm.digits - 1, states, torch.full_like(states, -1)).reshape(-1)


def codebook_names(cbm) -> list[tuple[str, int, str]]:
    """(site, group, label) of every codebook; grouped sites are labelled ``site/g``."""
    out = []
    for n, layer in cbm.sites.items():
        g_count = layer.config.groups
        out += [(n, g, n if g_count == 1 else f"{n}/{g}") for g in range(g_count)]
    return out


def _r(x: float) -> float | None:
    return None if x != x else round(float(x), 4)


def state_codes_vs_neurons(cbm, fsm, acts: Activations, targets: torch.Tensor,
                           headline: str, min_recall: float = 0.01) -> dict[str, Any]:
    """Every codebook's state codes against the best neurons, the paper's way.

    ``targets``: :func:`final_digit_targets` of the rows ``acts`` was collected on;
    ``headline``: the codebook label (see :func:`codebook_names`) whose per-state figures are
    reported in full (the paper: the last layer's MLP codebook). Returns the report's
    ``state_codes`` and ``neurons`` sections.
    """
    names = codebook_names(cbm)
    labels = [lab for _, _, lab in names]
    if headline not in labels:
        raise CodebookError(f"no codebook {headline!r}; codebooks: {', '.join(labels)}")
    searches = {}
    for site, g, label in names:
        searches[label] = fm.state_code_search(
            acts.codes[site][:, g], targets, cbm.site(site).config.num_codes, fsm.num_states,
            min_recall=min_recall)
    # one neuron search for every (codebook, state) with a code
    q_states, q_recalls, q_where = [], [], []
    for label, res in searches.items():
        for s in torch.nonzero(res.found).reshape(-1).tolist():
            q_states.append(s)
            q_recalls.append(float(res.recall[s]))
            q_where.append((label, s))
    n_prec, n_idx = fm.best_neuron_at_recall(acts.neurons, targets, torch.tensor(q_states,
                                             dtype=torch.long), torch.tensor(q_recalls))
    neuron_p = {lab: torch.full((fsm.num_states,), float("nan"), dtype=torch.float64)
                for lab in labels}
    neuron_i = {lab: torch.full((fsm.num_states,), -1, dtype=torch.long) for lab in labels}
    for (label, s), p, i in zip(q_where, n_prec.tolist(), n_idx.tolist(), strict=True):
        neuron_p[label][s], neuron_i[label][s] = p, i

    def summary(label: str) -> dict[str, Any]:
        res = searches[label]
        found = res.found
        return {"mean_precision": _r(res.mean("precision")),
                "mean_recall": _r(res.mean("recall")),
                "states_with_code": int(found.sum()),
                "neurons_mean_precision": _r(float(neuron_p[label][found].mean()))
                if found.any() else None}

    res = searches[headline]
    found = torch.nonzero(res.found).reshape(-1).tolist()
    per_state = [{"state": s, "code": int(res.code[s]), "precision": _r(res.precision[s]),
                  "recall": _r(res.recall[s]), "activations": int(res.activations[s]),
                  "positions": int(res.positions[s]),
                  "neuron": acts.neuron_name(int(neuron_i[headline][s])),
                  "neuron_precision": _r(neuron_p[headline][s])} for s in found]
    head = summary(headline)
    state_codes = {
        "site": headline,
        "method": "best code per state on its final-digit positions; recall <= "
                  f"{min_recall:g} dropped",
        "num_states": fsm.num_states,
        "states_covered": head["states_with_code"],
        "mean_precision": head["mean_precision"],
        "mean_recall": head["mean_recall"],
        "precisions": [row["precision"] for row in per_state],
        "per_state": per_state,
        "codebooks": {lab: summary(lab) for lab in labels},
    }
    neurons = {
        "count": int(acts.neurons.shape[1]),
        "set": "every dimension of the attention and MLP outputs of every layer "
               f"({len(acts.neuron_blocks) // 2} layers), thresholded at the code's recall",
        "mean_precision": head["neurons_mean_precision"],
        "precisions": [row["neuron_precision"] for row in per_state],
    }
    return {"state_codes": state_codes, "neurons": neurons}


def _attn_and_mlp_sites(cbm) -> tuple[dict[str, Any], list[str], list[str]]:
    """The model's site specs, and the names of its attention and its MLP sites."""
    specs = cbm.site_specs
    return (specs, [n for n, s in specs.items() if s.placement in ATTN_PLACEMENTS],
            [n for n, s in specs.items() if s.placement in MLP_PLACEMENTS])


def patch_conditions(cbm) -> dict[str, list[str]]:
    """The paper's patching conditions over this model's sites: ``attn_layer0``,
    ``mlp_layer{i}`` for every layer with an MLP codebook, ``attn_all``, ``mlp_all``,
    ``attn_mlp_all`` (conditions without sites are left out)."""
    specs, attn, mlp = _attn_and_mlp_sites(cbm)
    out: dict[str, list[str]] = {}
    first = [n for n in attn if specs[n].layer == 0]
    if first:
        out["attn_layer0"] = first
    for layer in sorted({specs[n].layer for n in mlp}):
        out[f"mlp_layer{layer}"] = [n for n in mlp if specs[n].layer == layer]
    if attn:
        out["attn_all"] = attn
    if mlp:
        out["mlp_all"] = mlp
    if attn and mlp:
        out["attn_mlp_all"] = attn + mlp
    return out


def remainder_conditions(cbm) -> dict[str, list[str]]:
    """Where ``mlp_all`` leaves divergence: every MLP codebook and one layer's attention
    codebooks, ``mlp_all+attn_layer{i}`` for every layer with attention codebooks. Not the
    paper's conditions: they show which attention layer still carries state A."""
    specs, attn, mlp = _attn_and_mlp_sites(cbm)
    if not mlp:
        return {}
    return {f"mlp_all+attn_layer{layer}": mlp + [n for n in attn if specs[n].layer == layer]
            for layer in sorted({specs[n].layer for n in attn})}


class _OutputPatch:
    """Forward hooks that overwrite the output of codebook layers at one token position,
    row by row: row ``r`` gets ``vectors[site][r]``. A codebook's output is a function of the
    codes it chose, so this is overwriting its codes with the ones that produced the vectors,
    with a different code per row (the per-site ``replace_code`` puts one code in every row)."""

    def __init__(self, cbm, vectors: dict[str, torch.Tensor], position: int) -> None:
        self.handles = []
        for n, vec in vectors.items():
            def hook(module, args, out, vec=vec):
                out = out.clone()
                out[:, position] = vec.to(out.device, out.dtype)
                return out
            self.handles.append(cbm.site(n).register_forward_hook(hook))

    def __enter__(self) -> _OutputPatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def state_alone(cbm, fsm) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                   torch.Tensor]:
    """Run BOS + each state's digits alone. Returns, at the final digit, every site's codes
    ``{site: (S, G, k)}``, every codebook's output ``{site: (S, dim)}`` and the next-token
    distribution (S, V)."""
    prompts = fsm.encode(torch.arange(fsm.num_states)[:, None], bos=True)
    outputs: dict[str, torch.Tensor] = {}
    handles = [cbm.site(n).register_forward_hook(
        lambda m, a, out, n=n: outputs.__setitem__(n, out[:, -1].detach().cpu()))
        for n in cbm.site_names]
    try:
        logits = lm._logits(cbm.base_model(input_ids=prompts.to(lm.model_device(cbm.base_model))))
    finally:
        for h in handles:
            h.remove()
    codes = {n: layer.last_codes[:, -1].cpu() for n, layer in cbm.sites.items()}
    return codes, outputs, torch.softmax(logits[:, -1].double(), -1).cpu()


def _last_probs(cbm, rows: torch.Tensor, count: int = 1) -> torch.Tensor:
    """Softmax over the vocabulary at the last ``count`` positions: (R, count, V) float64."""
    logits = lm._logits(cbm.base_model(input_ids=rows.to(lm.model_device(cbm.base_model))))
    return torch.softmax(logits[:, -count:].double(), -1).cpu()


def _next_state_probs(cbm, fsm, prefix: torch.Tensor, vectors: dict[str, torch.Tensor] | None,
                      position: int) -> torch.Tensor:
    """(R, S) next-state distribution after each prefix row, as the authors compute it: one
    pass over every row extended by each continuation of ``digits - 1`` digits (the first
    digits' probabilities are read at the earlier positions of the same pass), with
    ``vectors`` (one per prefix row) patched in at ``position``."""
    d = fsm.digits
    conts = fm.fsm_digit_grid(d - 1)  # (10**(d-1), d-1)
    r, m = prefix.shape[0], conts.shape[0]
    rows = torch.cat([prefix.repeat_interleave(m, 0), conts.repeat(r, 1)], 1)
    rep = {n: v.repeat_interleave(m, 0) for n, v in (vectors or {}).items()}
    with _OutputPatch(cbm, rep, position):
        p = _last_probs(cbm, rows, d)[..., : NUM_DIGIT_TOKENS]  # (R*m, d, 10)
    # P(state g) = p_0(g_0) * prod_{j >= 1} p_j(g_j | g_<j): digit j is read at the prefix's
    # last position + j in the continuation that spells g_0 .. g_{d-2}
    grid = fm.fsm_digit_grid(d)  # (10**d, d) every digit string, lexicographic = state order
    powers = 10 ** torch.arange(d - 2, -1, -1)
    cont_id = (grid[:, : d - 1] * powers).sum(1)  # (10**d,) all zeros for d = 1
    pr = p.view(r, m, d, NUM_DIGIT_TOKENS)
    probs = pr[:, 0, 0][:, grid[:, 0]]
    for j in range(1, d):
        probs = probs * pr[:, cont_id, j].gather(-1, grid[:, j].expand(r, -1)[..., None])[..., 0]
    return probs[:, : fsm.num_states]


@torch.no_grad()
def patch_states(cbm, fsm, ids: torch.Tensor, pairs_per_state: int = 10, seed: int = 0,
                 conditions: dict[str, list[str]] | None = None, positions: int = 4,
                 extra: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The paper's patching experiment; returns the report's ``intervention`` section.

    For every state B, ``pairs_per_state`` held-out rows of ``ids`` are cut after the state
    A at one of ``positions`` state indices spread over the sequence (rows where A == B are
    skipped). For each condition (default :func:`patch_conditions`), the codes B's codebooks
    chose on BOS + B alone (:func:`state_alone`) replace all codes of the condition's
    codebooks at A's final digit, and the next-token distribution there is compared with
    B's own: ``normalized_jsd[cond] = mean JSD(patched, B) / mean JSD(A, B)`` over the pairs.
    ``success``: the share of next-state probability on B's successors after the ``mlp_all``
    patch (mean over pairs; ``success_before``: without patching). ``pairs_used``:
    ``[A, B, row, j]`` of every pair (A is state ``j`` of row ``row``). ``extra``: more
    conditions scored on the same pairs, reported apart under ``remainder`` (e.g.
    :func:`remainder_conditions`).
    """
    conditions = patch_conditions(cbm) if conditions is None else conditions
    if not conditions:
        raise CodebookError("patch_states: the model has no attention or MLP codebooks")
    ids = torch.as_tensor(ids, dtype=torch.long).cpu()
    states = fsm.decode(ids)
    length = states.shape[1]
    if length < 2:
        raise CodebookError("patch_states needs held-out sequences of at least 2 states")
    was_training = cbm.training
    cbm.eval()
    cbm.clear_interventions()
    gen = torch.Generator().manual_seed(seed)
    spots = sorted({int(round(x)) for x in torch.linspace(0, length - 2, positions + 2)[1:-1]
                    .tolist()} or {0})
    pairs: dict[int, list[list[int]]] = {j: [] for j in spots}
    for b in range(fsm.num_states):
        for i in range(pairs_per_state):
            j = spots[(b * pairs_per_state + i) % len(spots)]
            ok = torch.nonzero((states[:, j] >= 0) & (states[:, j] != b)).reshape(-1)
            if ok.numel():
                row = int(ok[torch.randint(ok.numel(), (1,), generator=gen)])
                pairs[j].append([int(states[row, j]), b, row, j])
    pair_list = [p for j in spots for p in pairs[j]]
    if not pair_list:
        return {"pairs": 0, "note": "no (A, B) pairs: too few held-out sequences"}
    adjacency = torch.as_tensor(fsm.adjacency, dtype=torch.bool)
    extra = {k: v for k, v in (extra or {}).items() if k not in conditions}
    every = {**conditions, **extra}
    jsd: dict[str, list[torch.Tensor]] = {name: [] for name in ["none", *every]}
    success: dict[str, list[torch.Tensor]] = {"none": [], "mlp_all": []}
    try:
        _, b_out, b_probs = state_alone(cbm, fsm)
        for j in spots:
            if not pairs[j]:
                continue
            group = torch.tensor(pairs[j])
            rows, bs = group[:, 2], group[:, 1]
            prefix = ids[rows, : 1 + fsm.digits * (j + 1)]
            pos = fsm.digits * (j + 1)  # A's final digit (the prefix's last position)
            for name in jsd:
                sites = [] if name == "none" else every[name]
                vectors = {n: b_out[n][bs] for n in sites}
                with _OutputPatch(cbm, vectors, pos):
                    p = _last_probs(cbm, prefix)[:, -1]
                jsd[name].append(fm.js_divergence(p, b_probs[bs], normalized=False))
                if name in success:
                    probs = _next_state_probs(cbm, fsm, prefix, vectors, pos)
                    success[name].append(fm.successor_mass(probs, adjacency[bs]))
    finally:
        cbm.train(was_training)
    per = {name: torch.cat(v) for name, v in jsd.items()}
    base = float(per["none"].mean())

    def norm(names) -> dict[str, float | None]:
        return {n: _r(float(per[n].mean()) / base) if base > 0 else None for n in names}

    out = {
        "pairs": len(pair_list),
        "method": "B's codes from BOS + B alone replace all codes of the patched codebooks "
                  "at A's final digit; JSD of the next-token distribution from B's own, "
                  "averaged over pairs and divided by the unpatched average",
        "jsd_unpatched": _r(base),
        "jsd": {name: _r(float(per[name].mean())) for name in conditions},
        "normalized_jsd": norm(conditions),
        "conditions": {name: list(s) for name, s in conditions.items()},
        "success_before": _r(float(torch.cat(success["none"]).mean())),
        "success": None,
        "pairs_used": pair_list,
    }
    if extra:
        out["remainder"] = {"normalized_jsd": norm(extra), "conditions": extra}
    if success["mlp_all"]:
        after = torch.cat(success["mlp_all"])
        out["success"] = _r(float(after.mean()))
        out["median_success"] = _r(float(after.median()))
    return out
