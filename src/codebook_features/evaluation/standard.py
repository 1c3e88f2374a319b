"""The evaluation sparse-autoencoder tools report (SAELens, SAEBench), for codebooks.

For every site spliced in alone (the other sites bypassed) and for all sites together, over
an evaluation set (figures per token, averaged over the tokens the loss scores):

* ``ce_loss``: LM loss (next-token cross-entropy, nats) with the codebook(s) in;
  ``ce_loss_base``: with every codebook bypassed (the model's own weights, finetuned or not);
* ``ce_loss_zero`` / ``ce_loss_mean``: with the site(s) ablated instead, the activation
  replaced by zeros / by its mean over the evaluation set (a first pass, codebooks bypassed);
* ``ce_loss_recovered_zero`` / ``ce_loss_recovered_mean``: ``(CE_ablated - CE_codebook) /
  (CE_ablated - CE_base)``, SAELens' and SAEBench's "CE loss score": 1 when the codebook
  costs nothing, 0 when it is as bad as ablating the site (NaN when ablating changes nothing);
* ``kl_div``: KL(base || codebook) of the next-token distribution, per token, averaged;
* ``explained_variance`` = 1 - ``fvu``, with ``fvu = sum_t |y_t - x_t|^2 / sum_t |x_t -
  mean(x)|^2`` over the evaluation tokens, the mean per feature. ``x`` is the input as the
  codebook sees it, ``LayerNorm(a)`` with the codebook's own learned affine (``a`` itself
  when ``layernorm`` is off), and ``y`` the codebook's output (the mean of the chosen codes):
  ``y`` is trained towards ``x`` and replaces ``a`` at that scale; ``mse``: ``|y - x|^2``
  reduced as the layer's loss term is (``mse_reduction``: summed over features and averaged
  over tokens, or averaged over both), as ``CodebookLayer.last_mse``;
* ``l0``: codes active per token, over all groups (``groups * k`` for a plain top-k);
* ``alive_fraction``: the share of codes (of all groups) that fired at least once over the
  evaluation set (``dead_fraction`` = 1 - it); ``usage_entropy``: the entropy (nats) of code
  usage, averaged over groups;
* the code density: a histogram of log10 firing frequency (firings per token) per code.

The ``all`` row pools its sites: ``l0`` and ``mse`` are sums over sites, ``fvu`` the summed
squared error over the summed variance, ``alive_fraction`` alive codes over all codes.

Sites are swapped for measuring or ablating modules in ``model.codebooks`` (the hooks look
their module up at call time) and always put back; the model is left as it was found.
Activation statistics skip padding (``attention_mask`` 0); losses skip labels of -100.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CodebookError

KEYS = ("ce_loss", "ce_loss_base", "ce_loss_recovered_zero", "ce_loss_recovered_mean",
        "kl_div", "explained_variance", "fvu", "l0", "alive_fraction")
"""The figures of each row, in table order (every row also has the extra keys below)."""
EXTRA_KEYS = ("ce_loss_zero", "ce_loss_mean", "accuracy", "mse", "dead_fraction",
              "usage_entropy")
DENSITY_BIN = 0.25
"""Width of the code-density histogram's bins, in decades of firing frequency."""


class _Batch:
    """What the measuring modules need of the current batch: its valid-token mask."""

    mask: Tensor | None = None

    def rows(self, a: Tensor) -> Tensor:
        """``a`` as ``(tokens, dim)``, padding dropped when the shapes line up."""
        flat = a.reshape(-1, a.shape[-1])
        m = self.mask
        return flat[m] if m is not None and m.numel() == flat.shape[0] else flat


class _Recorder(nn.Module):
    """Returns its input unchanged and sums it (the site's mean, for mean-ablation)."""

    def __init__(self, batch: _Batch) -> None:
        super().__init__()
        self.batch = batch
        self.total: Tensor | None = None
        self.count = 0

    def forward(self, a: Tensor) -> Tensor:
        rows = self.batch.rows(a.detach()).double()
        s = rows.sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += rows.shape[0]
        return a

    def mean(self) -> Tensor:
        return self.total / self.count


class _Ablation(nn.Module):
    """Replaces the site's activation by a constant: zeros (``value`` None) or ``value``."""

    def __init__(self, value: Tensor | None = None) -> None:
        super().__init__()
        self.value = value

    def forward(self, a: Tensor) -> Tensor:
        if self.value is None:
            return torch.zeros_like(a)
        return self.value.to(a.device, a.dtype).expand(a.shape).contiguous()


class _Identity(nn.Module):
    """A bypassed site."""

    def forward(self, a: Tensor) -> Tensor:
        return a


class _SiteStats:
    """Reconstruction and usage sums of one codebook layer over the evaluation tokens."""

    def __init__(self, layer: nn.Module) -> None:
        c = layer.config
        self.dim, self.groups, self.num_codes = c.dim, c.groups, c.num_codes
        self.per_token = getattr(c, "mse_reduction", "mean") == "sum"
        dev = layer.codebook.device
        self.sse = torch.zeros((), dtype=torch.float64, device=dev)
        self.sum_x = torch.zeros(c.dim, dtype=torch.float64, device=dev)
        self.sum_x2 = torch.zeros((), dtype=torch.float64, device=dev)
        self.counts = torch.zeros(c.groups * c.num_codes, dtype=torch.long, device=dev)
        self.active = 0
        self.tokens = 0

    def add(self, x: Tensor, y: Tensor, codes: Tensor) -> None:
        """Normed inputs ``x`` and outputs ``y`` ``(n, dim)``, chosen codes ``(n, G, K)``."""
        x, y = x.double(), y.double()
        self.sse += (y - x).square().sum()
        self.sum_x += x.sum(0)
        self.sum_x2 += x.square().sum()
        self.tokens += x.shape[0]
        # A code counts once per token and group, even if an intervention repeats it.
        s = codes.sort(-1).values
        new = torch.ones_like(s, dtype=torch.bool)
        new[..., 1:] = s[..., 1:] != s[..., :-1]
        flat = s + torch.arange(self.groups, device=s.device).view(1, -1, 1) * self.num_codes
        self.counts += torch.bincount(flat[new], minlength=self.counts.numel())
        self.active += int(new.sum())

    def variance(self) -> float:
        """``sum_t |x_t - mean(x)|^2``."""
        return float(self.sum_x2 - self.sum_x.square().sum() / max(self.tokens, 1))

    def figures(self) -> dict[str, float]:
        var = self.variance()
        fvu = float(self.sse) / var if var > 0 else float("nan")
        counts = self.counts.view(self.groups, -1).double()
        p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        ent = -(p * p.clamp_min(1e-300).log()).sum(-1)
        alive = float((self.counts > 0).double().mean())
        return {"explained_variance": 1 - fvu, "fvu": fvu,
                "mse": float(self.sse) / max(self.tokens * (1 if self.per_token else self.dim),
                                             1),
                "l0": self.active / max(self.tokens, 1), "alive_fraction": alive,
                "dead_fraction": 1 - alive, "usage_entropy": float(ent.mean())}

    def density(self) -> dict[str, Any]:
        """Histogram of log10 firing frequency of the codes that fired (dead ones apart)."""
        freq = self.counts.double().cpu() / max(self.tokens, 1)
        fired = freq[freq > 0].log10()
        lo = math.floor(math.log10(1 / max(self.tokens, 1)) / DENSITY_BIN) * DENSITY_BIN
        nbins = max(1, round(-lo / DENSITY_BIN))
        edges = torch.linspace(lo, 0.0, nbins + 1, dtype=torch.float64)
        counts = torch.histogram(fired.clamp(lo, 0.0), edges).hist if fired.numel() else \
            torch.zeros(nbins, dtype=torch.float64)
        return {"bin_edges": [round(float(e), 6) for e in edges],
                "counts": [int(c) for c in counts], "dead": int((freq == 0).sum()),
                "codes": int(freq.numel()), "tokens": self.tokens}


def pooled(stats: list[_SiteStats]) -> dict[str, float]:
    """The ``all`` row's activation figures: sums over sites (see the module docstring)."""
    var = sum(s.variance() for s in stats)
    sse = sum(float(s.sse) for s in stats)
    fvu = sse / var if var > 0 else float("nan")
    codes = sum(s.counts.numel() for s in stats)
    alive = sum(int((s.counts > 0).sum()) for s in stats) / codes
    tokens = max(stats[0].tokens, 1)
    figs = [s.figures() for s in stats]
    return {"explained_variance": 1 - fvu, "fvu": fvu, "mse": sum(f["mse"] for f in figs),
            "l0": sum(s.active for s in stats) / tokens, "alive_fraction": alive,
            "dead_fraction": 1 - alive,
            "usage_entropy": sum(f["usage_entropy"] for f in figs) / len(figs)}


class _Measured(nn.Module):
    """Runs the site's codebook and records its reconstruction and codes."""

    def __init__(self, layer: nn.Module, stats: _SiteStats, batch: _Batch) -> None:
        super().__init__()
        self.layer = layer
        self.stats = stats
        self.batch = batch

    def forward(self, a: Tensor) -> Tensor:
        y = self.layer(a)
        c = self.layer.config
        with torch.no_grad():
            x = self.batch.rows(self.layer.normalize(a.detach()))
            codes = self.layer.last_codes
            codes = codes.reshape(-1, c.groups, codes.shape[-1])
            m = self.batch.mask
            if m is not None and m.numel() == codes.shape[0]:
                codes = codes[m]
            self.stats.add(x, self.batch.rows(y.detach()), codes)
        return y


@contextlib.contextmanager
def _swapped(model: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Put ``modules`` (site name -> module) in place of the sites' codebooks for a while."""
    from ..model_config import _key

    old: dict[str, nn.Module] = {}
    try:
        for name, mod in modules.items():
            old[_key(name)] = model.codebooks[_key(name)]
            model.codebooks[_key(name)] = mod
        yield
    finally:
        for key, mod in old.items():
            model.codebooks[key] = mod


def _rows(data: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """``input_ids``, ``labels`` and the ``attention_mask`` (None when absent) of ``data``."""
    from ..lm import _as_id_rows

    ids, labels = _as_id_rows(data)
    mask = None
    if hasattr(data, "column_names") and "attention_mask" in data.column_names:
        mask = data["attention_mask"]
    elif isinstance(data, dict):
        mask = data.get("attention_mask")
    if mask is not None:
        mask = torch.as_tensor(mask if isinstance(mask, Tensor) else list(mask)).bool()
        if mask.shape != ids.shape:
            raise CodebookError(f"attention_mask {tuple(mask.shape)} does not match input_ids "
                                f"{tuple(ids.shape)}")
    return ids, labels, mask


def check_size(model: nn.Module, tokens: int, scored: int) -> None:
    """Refuse an evaluation set too small for the figures: one line naming the need."""
    fix = "add evaluation rows (or longer ones)"
    if scored < 1:
        raise CodebookError(f"evaluation set too small: no token has a label to score; {fix}")
    if tokens < 2:
        raise CodebookError(f"evaluation set too small: {tokens} token(s); explained variance "
                            f"needs at least 2; {fix}")
    for name, layer in model.sites.items():
        c = layer.config
        need = -(-c.num_codes // c.k)
        if tokens < need:
            raise CodebookError(
                f"evaluation set too small for the alive/dead fractions of {name}: {tokens} "
                f"tokens can fire at most {tokens * c.k} of its {c.num_codes} codes per group "
                f"(k={c.k}); it needs at least {need} tokens; {fix}")


class _Loss:
    """Summed cross-entropy, correct argmax and KL from the base distribution."""

    def __init__(self) -> None:
        self.ce = 0.0
        self.correct = 0
        self.kl = 0.0

    def add(self, logits: Tensor, y: Tensor, keep: Tensor, base_logp: Tensor | None) -> None:
        logits = logits[:, :-1].float()
        flat = logits.reshape(-1, logits.shape[-1])
        self.ce += float(F.cross_entropy(flat, y.reshape(-1), ignore_index=-100,
                                         reduction="sum"))
        self.correct += int(((logits.argmax(-1) == y) & keep).sum())
        if base_logp is not None:
            logp = torch.log_softmax(logits, -1)
            kl = F.kl_div(logp, base_logp, log_target=True, reduction="none").sum(-1)
            self.kl += float(kl[keep].sum())


def _recovered(ablated: float, cb: float, base: float) -> float:
    d = ablated - base
    return (ablated - cb) / d if d != 0 else float("nan")


@torch.no_grad()
def standard_evaluation(model: nn.Module, data: Any, batch_size: int = 16,
                        per_site: bool = True) -> dict[str, Any]:
    """The figures of the module docstring for ``model`` (a ``CodebookModel``) on ``data``.

    ``per_site=False`` measures only the ``all`` row (4 forward passes per batch instead of
    ``1 + 3 * (sites + 1)``: for evaluations during training); ``code_density`` is then with
    all sites in.

    ``data``: a ``datasets.Dataset`` or dict of ``input_ids`` (``labels``,
    ``attention_mask`` optional) or an ``(N, T)`` tensor. Returns ``rows`` (site name and
    ``all`` -> figures), ``sites_together`` (each site's activation figures with all sites in,
    the model as it runs), ``base`` and ``with_codebooks`` (``loss``, ``accuracy``),
    ``code_density`` (site -> histogram, each site alone) and ``tokens`` (scored).
    """
    from ..lm import _logits, model_device

    ids, labels, amask = _rows(data)
    if ids.shape[1] < 2:
        raise CodebookError("evaluation set too small: rows need at least 2 tokens")
    keep_all = labels[:, 1:] != -100
    scored = int(keep_all.sum())
    tokens = int(amask.sum()) if amask is not None else ids.numel()
    check_size(model, tokens, scored)
    names = list(model.site_names)
    layers = model.sites
    device = model_device(model.base_model)
    batch = _Batch()

    def batches() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for i in range(0, len(ids), batch_size):
            m = amask[i:i + batch_size] if amask is not None else None
            batch.mask = m.reshape(-1).to(device) if m is not None else None
            yield (ids[i:i + batch_size].to(device), labels[i:i + batch_size, 1:].to(device),
                   keep_all[i:i + batch_size].to(device))

    # Conditions: each site alone (others bypassed) and all together; "all" is the site's
    # own when there is one site.
    per_site = per_site or len(names) == 1
    groups = {n: [n] for n in names} if per_site else {}
    if len(names) > 1:
        groups["all"] = names
    alone = {n: _SiteStats(layers[n]) for n in names} if per_site else {}
    together = {n: _SiteStats(layers[n]) for n in names} if len(names) > 1 else alone
    cb = {g: {n: (_Measured(layers[n], (together if g == "all" else alone)[n], batch)
                  if n in members else _Identity()) for n in names}
          for g, members in groups.items()}
    zero = {g: {n: _Ablation() if n in members else _Identity() for n in names}
            for g, members in groups.items()}
    loss = {(kind, g): _Loss() for kind in ("cb", "zero", "mean") for g in groups}
    base_loss = _Loss()

    was_training, was_enabled = model.training, model.enabled
    model.eval()
    model.enable_codebooks()
    try:
        # Pass 1: the base model (recording each site's mean), codebooks, zero-ablations.
        rec = {n: _Recorder(batch) for n in names}
        for x, y, keep in batches():
            with _swapped(model, rec):
                base = _logits(model(x))
            base_loss.add(base, y, keep, None)
            base_logp = torch.log_softmax(base[:, :-1].float(), -1)
            del base
            for g in groups:
                with _swapped(model, cb[g]):
                    loss["cb", g].add(_logits(model(x)), y, keep, base_logp)
                with _swapped(model, zero[g]):
                    loss["zero", g].add(_logits(model(x)), y, keep, None)
        # Pass 2: mean-ablations.
        means = {n: rec[n].mean().float() for n in names}
        mean = {g: {n: _Ablation(means[n]) if n in members else _Identity() for n in names}
                for g, members in groups.items()}
        for x, y, keep in batches():
            for g in groups:
                with _swapped(model, mean[g]):
                    loss["mean", g].add(_logits(model(x)), y, keep, None)
    finally:
        batch.mask = None
        model.train(was_training)
        if not was_enabled:
            model.disable_codebooks()

    ce_base = base_loss.ce / scored
    rows: dict[str, dict[str, float]] = {}
    for g in groups:
        ce = loss["cb", g].ce / scored
        ce_zero, ce_mean = loss["zero", g].ce / scored, loss["mean", g].ce / scored
        acts = pooled([together[n] for n in names]) if g == "all" else alone[g].figures()
        rows[g] = {"ce_loss": ce, "ce_loss_base": ce_base,
                   "ce_loss_recovered_zero": _recovered(ce_zero, ce, ce_base),
                   "ce_loss_recovered_mean": _recovered(ce_mean, ce, ce_base),
                   "kl_div": loss["cb", g].kl / scored, **acts, "ce_loss_zero": ce_zero,
                   "ce_loss_mean": ce_mean, "accuracy": loss["cb", g].correct / scored}
    if "all" not in rows:
        rows["all"] = dict(rows[names[0]])
    return {
        "rows": rows,
        "sites_together": {n: together[n].figures() for n in names},
        "base": {"loss": ce_base, "accuracy": base_loss.correct / scored},
        "with_codebooks": {"loss": rows["all"]["ce_loss"],
                           "accuracy": rows["all"]["accuracy"]},
        "code_density": {n: (alone or together)[n].density() for n in names},
        "tokens": scored,
    }
