"""Steering: generate with codes forced on, find a topic's codes, and the paper's topic-steering
evaluation (Table 3: how often generations mention a topic, steered against unsteered).

A steered code is named by its site, group and code (:class:`SteerCode`, written
``SITE:GROUP:CODE``). While steering, each code is added to its group's chosen codes
(``mode="append"``: the mean then runs over k + m codes) or written over the weakest slots
(``mode="replace"``), at every position or only at chosen absolute positions; positions stay
absolute while generating with a key-value cache.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import CodebookError
from .topics import topic_pattern

MODES = ("append", "replace")
POSITIONS = ("all", "prompt", "generated")
DEFAULT_PROMPTS = ("", "Once upon a time,", "One day,", "There was a")
"""Short prompts in the manner of the paper's (``""``, ``"Once upon a time,"``, ...)."""


@dataclass(frozen=True)
class SteerCode:
    """One code to force on: ``code`` of ``group`` at ``site`` (e.g. ``layers.0.attn_heads``)."""

    site: str
    code: int
    group: int = 0

    def __str__(self) -> str:
        return f"{self.site}:{self.group}:{self.code}"


def parse_steer_code(spec: str) -> SteerCode:
    """``"SITE:GROUP:CODE"`` or ``"SITE:CODE"`` (group 0) -> :class:`SteerCode`."""
    parts = str(spec).strip().split(":")
    try:
        if len(parts) == 3:
            return SteerCode(parts[0], int(parts[2]), int(parts[1]))
        if len(parts) == 2:
            return SteerCode(parts[0], int(parts[1]))
    except ValueError:
        pass
    raise CodebookError(f"steering code {spec!r}: write SITE:GROUP:CODE or SITE:CODE, e.g. "
                        "layers.0.attn_heads:3:117")


def _codes_by_group(codes: Sequence[SteerCode]) -> dict[tuple[str, int], list[int]]:
    out: dict[tuple[str, int], list[int]] = {}
    for c in codes:
        out.setdefault((c.site, int(c.group)), []).append(int(c.code))
    return out


def _cache_offset(kwargs: Mapping[str, Any]) -> int:
    """Absolute position of the first token of a forward (non-zero with a filled KV cache)."""
    pos = kwargs.get("cache_position")
    if isinstance(pos, torch.Tensor) and pos.numel():
        return int(pos.reshape(-1)[0])
    for name in ("cache", "past_key_values"):  # transformers 5 names it ``cache``
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


@contextlib.contextmanager
def steering(model: Any, codes: Sequence[SteerCode], mode: str = "append",
             positions: Sequence[int] | None = None) -> Iterator[None]:
    """Context in which ``codes`` are forced on in ``model`` (a CodebookModel).

    ``positions``: absolute token positions to steer (None: all). Interventions set before
    the context are kept; on exit only the model's own interventions from before remain.
    """
    if mode not in MODES:
        raise CodebookError(f"steering mode {mode!r}: choose one of {', '.join(MODES)}")
    groups = _codes_by_group(codes)
    pos = None if positions is None else [int(p) for p in positions]
    if pos is not None and any(p < 0 for p in pos):
        raise CodebookError(f"steering positions {pos}: give absolute positions (0 and up)")
    layers = {site: model.site(site) for site, _ in groups}  # unknown site: clear error
    saved = {site: list(layer.interventions) for site, layer in layers.items()}
    try:
        for (site, group), ids in groups.items():
            layer = layers[site]
            if mode == "append":
                layer.append_code(ids, group=group, positions=pos)
            else:
                k = layer.config.k
                if len(set(ids)) > k:
                    raise CodebookError(f"{site} group {group}: {len(set(ids))} codes to write "
                                        f"over k={k} slots; use mode='append' or fewer codes")
                for slot, code in enumerate(dict.fromkeys(ids)):
                    layer.replace_code(code, slot=-1 - slot, group=group, positions=pos)
    except BaseException:
        for site, layer in layers.items():
            layer.interventions = saved[site]
        raise

    def track(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        offset = _cache_offset(kwargs)
        for layer in layers.values():
            layer.position_offset = offset

    base = getattr(model, "base_model", model)
    handle = base.register_forward_pre_hook(track, with_kwargs=True) if pos is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for site, layer in layers.items():
            layer.interventions = saved[site]
            layer.position_offset = 0


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt``; an empty prompt starts from the BOS (or EOS) token."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
            else tokenizer.eos_token_id
        if start is None:
            raise CodebookError("an empty prompt needs a tokenizer with a BOS or EOS token; "
                                "give a non-empty prompt")
        ids = [int(start)]
    return ids


def _steer_positions(positions: str | Sequence[int], prompt_len: int, new: int
                     ) -> list[int] | None:
    if isinstance(positions, str):
        if positions == "all":
            return None
        if positions == "prompt":
            return list(range(prompt_len))
        if positions == "generated":
            return list(range(prompt_len, prompt_len + new))
        raise CodebookError(f"steering positions {positions!r}: choose one of "
                            f"{', '.join(POSITIONS)} or a list of token positions")
    return [int(p) for p in positions]


@torch.no_grad()
def steer_generate(model: Any, tokenizer: Any, prompt: str,
                   codes: Sequence[SteerCode] = (), *, mode: str = "append",
                   positions: str | Sequence[int] = "all", max_new_tokens: int = 40,
                   num_samples: int = 1, do_sample: bool = True, temperature: float = 1.0,
                   seed: int = 0) -> list[str]:
    """Continuations of ``prompt`` generated with ``codes`` forced on (none: unsteered).

    ``positions``: ``"all"``, ``"prompt"`` (the prompt's tokens only), ``"generated"`` (the new
    tokens only) or absolute token positions. Sampling is seeded by ``seed`` without touching
    the global random state. Returns ``num_samples`` decoded continuations (prompt left out).
    """
    if int(max_new_tokens) < 1 or int(num_samples) < 1:
        raise CodebookError(f"max_new_tokens={max_new_tokens}, num_samples={num_samples}: "
                            "both must be at least 1")
    if do_sample and not float(temperature) > 0:
        raise CodebookError(f"temperature={temperature}: must be > 0 when sampling")
    ids = prompt_ids(tokenizer, prompt)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and len(ids) + int(max_new_tokens) > int(limit):
        raise CodebookError(f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} "
                            f"exceeds the model's {limit} positions; shorten either")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device).repeat(int(num_samples), 1)
    pos = _steer_positions(positions, len(ids), int(max_new_tokens))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    gen_kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": do_sample,
                                  "pad_token_id": pad,
                                  "attention_mask": torch.ones_like(input_ids)}
    if do_sample:
        gen_kwargs.update(temperature=float(temperature), top_k=0, top_p=1.0)
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), steering(model, codes, mode, pos):
            torch.manual_seed(int(seed))
            out = model.generate(input_ids, **gen_kwargs)
    finally:
        model.train(was_training)
    return [tokenizer.decode(row[len(ids):], skip_special_tokens=True) for row in out.tolist()]


# ------------------------------------------------------------------ topic codes
@dataclass(frozen=True)
class TopicCode:
    """A code ranked for a topic: the mean share of a topic document's tokens it fires on,
    against its largest mean share in any other topic's documents."""

    site: str
    group: int
    code: int
    share: float
    other_share: float

    @property
    def steer_code(self) -> SteerCode:
        return SteerCode(self.site, self.code, self.group)


@torch.no_grad()
def rank_topic_codes(model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[str],
                     sites: Sequence[str] | None = None, top: int = 10, max_length: int = 512
                     ) -> dict[str, list[TopicCode]]:
    """The codes that fire on the largest share of tokens of each topic's documents.

    For each (site, group, code), the share of a document's tokens it fires on, averaged over
    each topic's documents; codes are ranked by that share minus their largest average share
    over the other topics (so a code firing everywhere ranks last). Returns topic ->
    ``top`` :class:`TopicCode`, best first.
    """
    if len(texts) != len(labels) or not texts:
        raise CodebookError(f"rank_topic_codes: {len(texts)} texts and {len(labels)} labels; "
                            "give one topic label per text (at least one)")
    sites = list(sites) if sites is not None else list(model.site_names)
    layers = {s: model.site(s) for s in sites}
    topics = sorted(set(labels))
    tix = {t: i for i, t in enumerate(topics)}
    sums = {s: torch.zeros(len(topics), layer.config.groups, layer.config.num_codes,
                           dtype=torch.float64) for s, layer in layers.items()}
    docs = torch.zeros(len(topics), dtype=torch.float64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for text, label in zip(texts, labels, strict=True):
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            if not ids:
                continue
            model(input_ids=torch.tensor([ids], device=device))
            codes = model.codes()
            t = tix[label]
            docs[t] += 1
            for s, layer in layers.items():
                c = codes[s][0]  # (T, G, K): the k codes of a group at a token are distinct
                g, n = layer.config.groups, layer.config.num_codes
                flat = (c + torch.arange(g, device=c.device).view(1, g, 1) * n).reshape(-1)
                counts = torch.bincount(flat, minlength=g * n).view(g, n)
                sums[s][t] += counts.double().cpu() / c.shape[0]
    finally:
        model.train(was_training)
    out: dict[str, list[TopicCode]] = {}
    for t, topic in enumerate(topics):
        cands: list[TopicCode] = []
        for s, total in sums.items():
            mean = total / docs.clamp_min(1).view(-1, 1, 1)
            others = torch.cat([mean[:t], mean[t + 1:]])
            other = others.max(0).values if len(others) else torch.zeros_like(mean[t])
            score = (mean[t] - other).flatten()
            k = min(int(top), score.numel())
            best = torch.topk(score, k).indices
            n = mean.shape[-1]
            for i in best.tolist():
                g, code = divmod(i, n)
                cands.append(TopicCode(s, g, code, float(mean[t, g, code]),
                                       float(other[g, code])))
        cands.sort(key=lambda x: x.share - x.other_share, reverse=True)
        out[topic] = cands[:int(top)]
    return out


# --------------------------------------------------------- topic steering eval
@dataclass(frozen=True)
class SteeringResult:
    """One row of the topic-steering table: mention rates without and with steering."""

    topic: str
    codes: int
    samples: int
    baseline: float
    steered: float
    baseline_ci: tuple[float, float]
    steered_ci: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        """As plain JSON values (intervals as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``hits / n``."""
    if n <= 0:
        return (0.0, 1.0)
    p = hits / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def _topic_matcher(topic: str, patterns: Mapping[str, str] | None) -> Callable[[str], bool]:
    rx = topic_pattern(topic, patterns, prefix=True)
    return lambda text: rx.search(text) is not None


def topic_steering_eval(model: Any, tokenizer: Any,
                        topic_codes: Mapping[str, Sequence[SteerCode]],
                        prompts: Sequence[str] = DEFAULT_PROMPTS, samples_per_prompt: int = 8,
                        max_new_tokens: int = 64, *, mode: str = "append",
                        positions: str | Sequence[int] = "all", temperature: float = 1.0,
                        patterns: Mapping[str, str] | None = None, seed: int = 0
                        ) -> tuple[list[SteeringResult], dict[str, Any]]:
    """The paper's topic-steering evaluation (Table 3).

    For each prompt, ``samples_per_prompt`` unsteered generations (shared by every topic's
    baseline) and as many steered by each topic's codes, with the same seeds; a generation
    counts when it mentions the topic (the story topics' word lists, ``patterns[topic]``, or
    the topic's name as a word prefix). Returns the table rows and the generations.
    """
    if not topic_codes:
        raise CodebookError("topic_steering_eval: no topics given")
    if not prompts:
        raise CodebookError("topic_steering_eval: no prompts given")
    matchers = {t: _topic_matcher(t, patterns) for t in topic_codes}
    kw = dict(max_new_tokens=max_new_tokens, num_samples=samples_per_prompt,
              temperature=temperature)
    baseline = {p: steer_generate(model, tokenizer, p, (), seed=seed + i, **kw)
                for i, p in enumerate(prompts)}
    rows: list[SteeringResult] = []
    samples: dict[str, Any] = {"baseline": baseline}
    for topic, codes in topic_codes.items():
        if not codes:
            raise CodebookError(f"topic {topic!r} has no codes to steer with")
        steered = {p: steer_generate(model, tokenizer, p, codes, mode=mode, positions=positions,
                                     seed=seed + i, **kw)
                   for i, p in enumerate(prompts)}
        samples[topic] = steered
        n = len(prompts) * samples_per_prompt
        hit_b = sum(matchers[topic](text) for texts in baseline.values() for text in texts)
        hit_s = sum(matchers[topic](text) for texts in steered.values() for text in texts)
        rows.append(SteeringResult(topic, len(codes), n, hit_b / n, hit_s / n,
                                   wilson_interval(hit_b, n), wilson_interval(hit_s, n)))
    return rows, samples


def format_steering_table(rows: Sequence[SteeringResult]) -> str:
    """Markdown table in the paper's Table 3 layout: topic, codes, baseline %, steered %."""
    lines = ["| topic | codes | samples | baseline | steered |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.topic} | {r.codes} | {r.samples} | {100 * r.baseline:.1f}% | "
                     f"{100 * r.steered:.1f}% |")
    return "\n".join(lines)


# ----------------------------------------------------------------------- command
def options(p: Any) -> None:
    p.add_argument("codebooks", help="folder written by save_codebooks (e.g. OUTPUT/final)")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, from BOS)")
    p.add_argument("--code", action="append", default=[], metavar="SITE:GROUP:CODE",
                   help="a code to force on (repeat for several; at least one)")
    p.add_argument("--mode", choices=MODES, default="append",
                   help="add the codes to the chosen ones, or write them over the weakest")
    p.add_argument("--positions", default="all",
                   help="all, prompt, generated, or token positions like 0,3,5")
    p.add_argument("--samples", type=int, default=4,
                   help="generations of each kind, unsteered and steered (%(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=40,
                   help="tokens generated after the prompt (%(default)s)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature, > 0 (%(default)s; ignored with --greedy)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the sampling: the same seed, the same text "
                        "(%(default)s)")
    p.add_argument("--base", help="base model folder or hub name (default: the recorded one)")
    p.add_argument("--tokenizer", help="tokenizer (default: the base model's)")


def _positions_arg(text: str) -> str | list[int]:
    if text in POSITIONS:
        return text
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise CodebookError(f"--positions {text!r}: use {', '.join(POSITIONS)} or a "
                            "comma-separated list of token positions") from None


def run(args: Any) -> int:
    import json

    from .io import load_tokenizer, quiet_transformers
    from .model import CodebookModel

    if not args.code:
        raise CodebookError("no --code given: the generation would run unsteered; pass "
                            "--code SITE:GROUP:CODE (repeat for several), e.g. from "
                            "`codebook-features search`")
    codes = [parse_steer_code(c) for c in args.code]
    positions = _positions_arg(args.positions)
    kw = dict(positions=positions, max_new_tokens=args.max_new_tokens,
              num_samples=args.samples, do_sample=not args.greedy,
              temperature=args.temperature, seed=args.seed)
    with quiet_transformers():  # the output is JSON, not a loading or generation log
        model = CodebookModel.from_pretrained(args.codebooks, base_model=args.base)
        tokenizer = load_tokenizer(
            args.tokenizer or args.base or model.base_info()["name_or_path"])
        out = {"prompt": args.prompt, "codes": [str(c) for c in codes], "mode": args.mode,
               "unsteered": steer_generate(model, tokenizer, args.prompt, (), **kw),
               "steered": steer_generate(model, tokenizer, args.prompt, codes,
                                         mode=args.mode, **kw)}
    print(json.dumps(out, indent=1))
    return 0
