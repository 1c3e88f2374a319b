"""TopK sparse autoencoders at a codebook site, trained with EleutherAI's ``sparsify``.

The SAE is the library's own ``SparseCoder`` (``eai-sparsify``, the optional extra ``sae``):
its encoder, TopK activation, unit-norm decoder, FVU and AuxK losses. Its ``Trainer`` hooks
modules of a Hugging Face model by name; ours trains on the activations a codebook site sees
(:func:`record_site`, every site's own hook point: attention heads before ``o_proj``, MLP
outputs, ... and TransformerLens hook points), so :func:`train_topk_sae` runs sparsify's recipe
(decoder bias at the data mean, Adam at ``2e-4 / sqrt(latents / 2**14)``, gradient parallel
to the decoder rows removed, decoder rows renormalised every step, AuxK on latents silent for
``dead_tokens``) on those activations.

:class:`SaeSite` puts an SAE in a site's place in a ``CodebookModel``: it has the attributes of
a :class:`~codebook_features.codebook.CodebookLayer` that the standard evaluation, topic-code
ranking and steering read (``config``, ``last_codes``, ``normalize``, ``replace_code``,
``append_code``, ...), with the SAE's latents as its codes (one group, ``k`` slots).
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from .codebook import CodebookLayer, Intervention
from .errors import CodebookError

EXTRA = "pip install 'codebook-features[sae]'"
"""How to install the SAE library (the optional extra)."""


def require_sparsify() -> Any:
    """The ``sparsify`` module, or one line naming the extra to install."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its decoder backend
            import sparsify
    except ImportError:
        raise CodebookError("training the SAE needs EleutherAI's sparsify (eai-sparsify), "
                            f"which is not installed; install the extra: {EXTRA}") from None
    return sparsify


# ------------------------------------------------------------------ activations
class _Recorder(nn.Module):
    """Returns its input unchanged and keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Tensor] = []

    def forward(self, a: Tensor) -> Tensor:
        self.rows.append(a.detach())
        return a


class _Identity(nn.Module):
    def forward(self, a: Tensor) -> Tensor:
        return a


@torch.no_grad()
def record_site(model: Any, site: str, batches: Iterable[dict[str, Tensor]],
                max_tokens: int | None = None) -> Tensor:
    """The activations entering ``site`` (its raw input, before the codebook's LayerNorm) on
    every non-padding token of ``batches``, with every codebook bypassed (swapped out, so no
    search runs): float32 ``(N, dim)`` on the CPU; stops after ``max_tokens``."""
    from .evaluation.standard import _swapped

    dim = model.site(site).config.dim
    rec = _Recorder()
    swap = {n: rec if n == site else _Identity() for n in model.site_names}
    was_training, was_enabled = model.training, model.enabled
    model.eval()
    model.enable_codebooks()
    rows: list[Tensor] = []
    n = 0
    device = next(model.parameters()).device
    try:
        with _swapped(model, swap):
            for batch in batches:
                rec.rows.clear()
                model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
                a = rec.rows[-1].reshape(-1, dim).float()
                mask = batch.get("attention_mask")
                if mask is not None and mask.numel() == a.shape[0]:
                    a = a[mask.reshape(-1).bool().to(a.device)]
                rows.append(a.cpu())
                n += a.shape[0]
                if max_tokens is not None and n >= max_tokens:
                    break
    finally:
        model.train(was_training)
        if not was_enabled:
            model.disable_codebooks()
    acts = torch.cat(rows) if rows else torch.zeros(0, dim)
    return acts[:max_tokens] if max_tokens is not None else acts


# --------------------------------------------------------------------- measuring
@dataclass
class Cost:
    """Wall time and peak memory of one training run."""

    seconds: float
    peak_memory_mib: float
    memory: str
    """What ``peak_memory_mib`` measures: ``cuda allocated`` (``torch.cuda`` peak above the
    start) or ``cpu resident`` (process RSS sampled every 5 ms, peak above the start)."""


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:  # not Linux: no sampling
        return 0


@contextlib.contextmanager
def measured(device: torch.device) -> Iterator[dict[str, Any]]:
    """Time and peak memory of the block; the :class:`Cost` lands in ``result["cost"]``."""
    result: dict[str, Any] = {}
    cuda = device.type == "cuda"
    stop = threading.Event()
    peak = [0]
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        sampler = None
    else:
        start = _rss()
        peak[0] = start

        def sample() -> None:
            while not stop.wait(0.005):
                peak[0] = max(peak[0], _rss())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    t0 = time.perf_counter()
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            used = torch.cuda.max_memory_allocated(device) - start
        else:
            stop.set()
            sampler.join()
            used = max(peak[0], _rss()) - start
        result["cost"] = Cost(time.perf_counter() - t0, max(used, 0) / 2**20,
                              "cuda allocated" if cuda else "cpu resident")


# ---------------------------------------------------------------------- training
@dataclass
class SaeTraining:
    """Settings of :func:`train_topk_sae` (and of the codebook trained beside it)."""

    steps: int = 1000
    batch_tokens: int = 4096
    lr: float | None = None
    """None: sparsify's Adam default, ``2e-4 / sqrt(num_latents / 2**14)``."""
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 10_000_000
    """A latent silent for this many training tokens is dead (sparsify's threshold)."""
    seed: int = 0


def _batches(n: int, cfg: SaeTraining) -> Iterator[Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed)
    b = min(cfg.batch_tokens, n)
    for _ in range(cfg.steps):
        yield torch.randint(n, (b,), generator=gen)


def train_topk_sae(acts: Tensor, num_latents: int, k: int, cfg: SaeTraining,
                   device: torch.device | str = "cpu",
                   log: Callable[[str], None] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A sparsify ``SparseCoder`` (TopK, ``num_latents`` latents, ``k`` active) trained on
    ``acts`` ``(N, dim)`` with sparsify's recipe (see the module docstring). Returns the SAE
    (eval mode) and ``{"fvu": last training FVU, "dead_fraction": share of latents silent
    for dead_tokens at the end}``."""
    sparsify = require_sparsify()
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise CodebookError(f"SAE training needs activations (N >= 2, dim); got "
                            f"{tuple(acts.shape)}")
    if not 1 <= k <= num_latents:
        raise CodebookError(f"SAE sizes do not match: k={k} active of {num_latents} latents; "
                            "k must be between 1 and the number of latents")
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    sae = sparsify.SparseCoder(acts.shape[1], sparsify.SaeConfig(num_latents=num_latents, k=k),
                               device=device, dtype=torch.float32)
    with torch.no_grad():
        sae.b_dec.data = acts[:cfg.batch_tokens].mean(0).to(device)
    lr = cfg.lr or 2e-4 / math.sqrt(num_latents / 2**14)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(num_latents, dtype=torch.long, device=device)
    fvu = float("nan")
    sae.train()
    for step, idx in enumerate(_batches(acts.shape[0], cfg)):
        x = acts[idx].to(device, non_blocking=True)
        dead = since_fired > cfg.dead_tokens if cfg.auxk_alpha > 0 else None
        out = sae(x, dead_mask=dead)
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            fired = torch.zeros(num_latents, dtype=torch.bool, device=device)
            fired[out.latent_indices[out.latent_acts > 0].flatten()] = True
            since_fired += x.shape[0]
            since_fired[fired] = 0
        fvu = float(out.fvu.detach())
        if log and (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"SAE step {step + 1}/{cfg.steps}: FVU {fvu:.4f}")
    sae.eval()
    dead = since_fired > min(cfg.dead_tokens, cfg.steps * min(cfg.batch_tokens, len(acts)))
    return sae, {"fvu": fvu, "lr": lr, "dead_fraction": float(dead.float().mean())}


def train_codebook_on(acts: Tensor, config: Any, cfg: SaeTraining, lr: float = 1e-3,
                      device: torch.device | str = "cpu",
                      log: Callable[[str], None] | None = None) -> CodebookLayer:
    """A fresh codebook layer of ``config`` trained on ``acts`` alone (k-means start, Adam,
    the output trained towards the normed input, dead codes replaced every 50 steps), on the
    same batches as :func:`train_topk_sae`: the codebook's training cost on the same data."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    layer = CodebookLayer(config).to(device)
    layer.kmeans_init(acts[:max(cfg.batch_tokens, 4 * config.num_codes)].to(device), iters=10,
                      seed=cfg.seed)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    layer.train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for step, idx in enumerate(_batches(acts.shape[0], cfg)):
        x = acts[idx].to(device, non_blocking=True)
        y = layer(x)
        loss = (y - layer.normalize(x).detach()).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 and step < cfg.steps - 50:
            layer.replace_dead_codes(generator=gen)
        if log and (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"codebook step {step + 1}/{cfg.steps}: MSE {float(loss.detach()):.4f}")
    return layer.eval()


# ---------------------------------------------------------------------- the site
class SaeSite(nn.Module):
    """An SAE in a codebook site's place: its output (the SAE's reconstruction) replaces the
    activation, its latents are the site's codes (one group of ``k``, strongest first).

    ``steer_values`` (``num_latents``,): the activation a latent forced on by
    :meth:`replace_code` / :meth:`append_code` gets (default: 1 for every latent); steering
    puts the mean activation of each latent when it fires (see :func:`latent_means`).
    A forced latent already among a token's top ``k`` keeps one slot only.
    """

    def __init__(self, sae: nn.Module, name: str, steer_values: Tensor | None = None) -> None:
        super().__init__()
        self.sae = sae
        self.config = SimpleNamespace(name=name, dim=int(sae.d_in), groups=1,
                                      num_codes=int(sae.num_latents), k=int(sae.cfg.k),
                                      mse_reduction="mean")
        self.steer_values = steer_values
        self.interventions: list[Intervention] = []
        self.position_offset = 0
        self.bypass = False
        self.recorded: list[Tensor] | None = None
        self.last_codes: Tensor | None = None
        self.last_acts: Tensor | None = None
        self.last_scores: Tensor | None = None
        self.last_mse: Tensor | None = None

    @property
    def codebook(self) -> Tensor:
        """The decoder rows (where the standard evaluation looks for the device)."""
        return self.sae.W_dec

    def normalize(self, a: Tensor) -> Tensor:
        """The SAE reads the activation as it is."""
        return a.to(self.sae.dtype)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k latent activations and indices of ``x`` ``(N, dim)``, strongest first."""
        acts, idx, _ = self.sae.encode(x)
        acts, order = acts.sort(-1, descending=True)
        return acts, idx.gather(-1, order)

    def forward(self, a: Tensor) -> Tensor:
        c = self.config
        if a.shape[-1] != c.dim:
            raise CodebookError(f"{c.name}: input width {a.shape[-1]}, but the SAE expects "
                                f"{c.dim}")
        lead = a.shape[:-1]
        if self.recorded is not None:
            self.recorded.append(a.detach())
        acts, idx = self.encode(self.normalize(a).reshape(-1, c.dim))
        if self.interventions:
            acts, idx = self._intervene(acts, idx, lead)
        self.last_codes = idx.view(*lead, 1, idx.shape[-1])
        self.last_acts = acts.view(*lead, acts.shape[-1])
        if self.bypass:
            return a
        return self.sae.decode(acts, idx).view(*lead, c.dim).to(a.dtype)

    # ------------------------------------------------------------ interventions
    def replace_code(self, code: int, slot: int = -1, group: int = 0,
                     positions: Sequence[int] | None = None) -> None:
        """Force latent ``code`` into ``slot`` (default the weakest)."""
        self._add(Intervention("replace", (int(code),), group, slot, positions))

    def append_code(self, code: int | Sequence[int], group: int = 0,
                    positions: Sequence[int] | None = None) -> None:
        """Force latent(s) ``code`` on in extra slots."""
        codes = (code,) if isinstance(code, int) else tuple(code)
        self._add(Intervention("append", tuple(int(x) for x in codes), group, -1, positions))

    def clear_interventions(self) -> None:
        self.interventions = []
        self.bypass = False

    def _add(self, iv: Intervention) -> None:
        c = self.config
        if iv.group != 0:
            raise CodebookError(f"{c.name}: an SAE has one group; group {iv.group} does not "
                                "exist")
        bad = [x for x in iv.codes if not 0 <= x < c.num_codes]
        if bad or not iv.codes:
            raise CodebookError(f"{c.name}: latent(s) {bad or '[]'} do not exist "
                                f"(latents 0..{c.num_codes - 1})")
        if iv.kind == "replace" and not -c.k <= iv.slot < c.k:
            raise CodebookError(f"{c.name}: slot {iv.slot} does not exist (k={c.k})")
        if iv.positions is not None:
            iv.positions = tuple(int(p) for p in iv.positions)
        self.interventions.append(iv)

    def _value(self, code: int, like: Tensor) -> Tensor:
        v = self.steer_values
        return like.new_tensor(1.0 if v is None else float(v[code]))

    def _intervene(self, acts: Tensor, idx: Tensor, lead: torch.Size) -> tuple[Tensor, Tensor]:
        dev = acts.device
        for iv in self.interventions:
            rows = CodebookLayer._rows(iv.positions, lead, dev, self.position_offset)
            for code in iv.codes:
                sub_a, sub_i = acts[rows], idx[rows]
                sub_a = sub_a.masked_fill(sub_i == code, 0.0)  # one slot per latent
                if iv.kind == "replace":
                    slot = iv.slot % self.config.k
                    sub_a[:, slot] = self._value(code, sub_a)
                    sub_i[:, slot] = code
                    acts[rows], idx[rows] = sub_a, sub_i
                else:
                    acts[rows] = sub_a
                    extra_a = torch.zeros_like(acts[:, :1])
                    extra_a[rows] = self._value(code, acts)
                    acts = torch.cat([acts, extra_a], -1)
                    idx = torch.cat([idx, torch.full_like(idx[:, :1], code)], -1)
        return acts, idx


@torch.no_grad()
def latent_means(site: SaeSite, acts: Tensor, batch: int = 8192) -> Tensor:
    """Mean activation of each latent over the rows of ``acts`` where it fires (the mean of
    all firings for a latent that never does)."""
    n = site.config.num_codes
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    dev = site.codebook.device
    for i in range(0, len(acts), batch):
        a, ix = site.encode(acts[i:i + batch].to(dev))
        on = a > 0
        total.index_add_(0, ix[on].cpu(), a[on].double().cpu())
        count.index_add_(0, ix[on].cpu(), torch.ones(int(on.sum()), dtype=torch.float64))
    fallback = total.sum() / count.sum().clamp_min(1)
    return torch.where(count > 0, total / count.clamp_min(1), fallback).float()
