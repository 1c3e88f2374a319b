"""Calibrate the tiny story model: train it from scratch on the generated stories.

Generates the topic-story corpus, trains the byte-level BPE tokenizer, then trains a 1-layer
GPT-NeoX (hidden 128, 4 heads) with a plain AdamW loop on packed blocks, within a wall-clock
budget. Prints JSON lines: ``{"event": "setup"}``, ``{"event": "eval", step, seconds,
train_loss, eval_loss, eval_acc}`` every ``--eval-every`` steps, then sample generations and
the topic mention rates of unprompted generations (the steering baseline).

    .venv/bin/python benchmarks/stories_calibrate.py --seconds 150
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter

import torch
import transformers as T

from codebook_features.experiments.stories import (
    TOPIC_NAMES,
    StoryConfig,
    generate_stories,
    pack_stories,
    story_rows,
    tiny_story_model_config,
    topic_mentions,
    train_story_tokenizer,
)


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def get_batch(data: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of ``data``, trimmed to their longest unpadded length."""
    out = {k: v[idx] for k, v in data.items()}
    width = int(out["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in out.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: dict[str, torch.Tensor], batch: int
             ) -> tuple[float, float]:
    """Mean next-token loss and accuracy over the labelled positions of ``data``."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(data["input_ids"]), batch):
        b = get_batch(data, torch.arange(i, min(i + batch, len(data["input_ids"]))))
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits, y = logits[:, :-1], b["labels"][:, 1:]
        loss_sum += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum",
            ignore_index=-100))
        correct += int(((logits.argmax(-1) == y) & (y != -100)).sum())
        count += int((y != -100).sum())
    model.train()
    return loss_sum / count, correct / count


def lm_data(tok: T.PreTrainedTokenizerFast, stories: list[dict], layout: str, seq_len: int
            ) -> dict[str, torch.Tensor]:
    """Training rows: one story per row (``rows``) or packed blocks (``packed``)."""
    if layout == "rows":
        return story_rows(tok, stories, seq_len)
    ids = pack_stories(tok, stories, seq_len)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@torch.no_grad()
def sample(model: torch.nn.Module, tok: T.PreTrainedTokenizerFast, prompt: str, n: int,
           tokens: int, seed: int) -> list[str]:
    """``n`` sampled continuations (temperature 1) of ``prompt`` (BOS first), decoded up to
    the first generated ``<|endoftext|>`` (the end of the story)."""
    model.eval()
    torch.manual_seed(seed)
    ids = torch.tensor([tok(prompt)["input_ids"]] * n)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=None)
    model.train()
    texts = []
    for row in out.tolist():
        gen = row[ids.shape[1]:]
        if tok.eos_token_id in gen:
            gen = gen[:gen.index(tok.eos_token_id)]
        texts.append(tok.decode(row[:ids.shape[1]] + gen, skip_special_tokens=True))
    return texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-stories", type=int, default=20000)
    p.add_argument("--eval-stories", type=int, default=500)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layout", choices=("rows", "packed"), default="rows",
                   help="one story per row (no attention across stories) or packed blocks")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--cooldown", type=float, default=0.2,
                   help="final fraction of the budget (time or steps, whichever ends first) "
                        "with linearly decaying lr")
    p.add_argument("--seconds", type=float, default=170.0, help="training wall-clock budget")
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gen-tokens", type=int, default=120)
    p.add_argument("--mention-samples", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="folder to save the model and tokenizer in")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    t0 = time.perf_counter()
    train_stories = generate_stories(StoryConfig(num_stories=a.num_stories, seed=a.seed))
    eval_stories = generate_stories(StoryConfig(num_stories=a.eval_stories, seed=a.seed + 1))
    tok = train_story_tokenizer(train_stories, a.vocab)
    train = lm_data(tok, train_stories, a.layout, a.seq_len)
    evalb = {k: v[:128] for k, v in lm_data(tok, eval_stories, a.layout, a.seq_len).items()}
    n_train = len(train["input_ids"])
    cfg = tiny_story_model_config(tok, hidden_size=a.hidden, num_layers=a.layers)
    model = T.AutoModelForCausalLM.from_config(cfg)
    model.train()
    n_params = sum(q.numel() for q in model.parameters())
    emit(event="setup", seconds=round(time.perf_counter() - t0, 2), layout=a.layout,
         train_rows=n_train, train_tokens=int(train["attention_mask"].sum()),
         eval_rows=len(evalb["input_ids"]), vocab=len(tok), params=n_params,
         seq_len=a.seq_len, batch=a.batch, lr=a.lr)

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(a.seed)
    order = torch.randperm(n_train, generator=gen)
    pos, step, run_n, run_loss, seen = 0, 0, 0, 0.0, 0
    start = time.perf_counter()
    loss0, acc0 = evaluate(model, evalb, a.batch)
    emit(event="eval", step=0, seconds=0.0, eval_loss=round(loss0, 4), eval_acc=round(acc0, 4))
    while step < a.max_steps:
        elapsed = time.perf_counter() - start
        if elapsed >= a.seconds:
            break
        progress = max(elapsed / a.seconds, step / a.max_steps)  # whichever budget ends first
        left = (1.0 - progress) / a.cooldown if a.cooldown > 0 else 1.0
        scale = min(1.0, (step + 1) / max(1, a.warmup), max(0.0, left))
        for g in opt.param_groups:
            g["lr"] = a.lr * scale
        if pos + a.batch > len(order):
            order, pos = torch.randperm(n_train, generator=gen), 0
        b = get_batch(train, order[pos:pos + a.batch])
        pos += a.batch
        seen += int(b["attention_mask"].sum())
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss += float(loss.detach())
        run_n += 1
        if step % a.eval_every == 0:
            secs = time.perf_counter() - start
            el, ea = evaluate(model, evalb, a.batch)
            emit(event="eval", step=step, seconds=round(secs, 1),
                 train_loss=round(run_loss / run_n, 4), eval_loss=round(el, 4),
                 eval_acc=round(ea, 4), tokens_seen=seen)
            run_loss, run_n = 0.0, 0
    train_secs = time.perf_counter() - start
    el, ea = evaluate(model, evalb, a.batch)
    emit(event="final", step=step, seconds=round(train_secs, 1), eval_loss=round(el, 4),
         eval_acc=round(ea, 4), eval_ppl=round(math.exp(el), 3),
         steps_per_second=round(step / train_secs, 2))

    for i, prompt in enumerate(["Once upon a time,", "", "Once upon a time, there was a dragon",
                                "Lily planted a tiny seed in her garden,"]):
        text = sample(model, tok, prompt, 1, a.gen_tokens, seed=a.seed + i)[0]
        emit(event="sample", prompt=prompt, text=text, topics=topic_mentions(text))

    t1 = time.perf_counter()
    texts = sample(model, tok, "", a.mention_samples, a.gen_tokens, seed=a.seed + 100)
    mentions = [topic_mentions(t) for t in texts]
    per_topic = Counter(t for m in mentions for t in m)
    corpus = [topic_mentions(s["text"]) for s in eval_stories]
    emit(event="mentions", prompt="", n=len(texts), tokens=a.gen_tokens,
         seconds=round(time.perf_counter() - t1, 1),
         rate={t: round(per_topic[t] / len(texts), 3) for t in TOPIC_NAMES},
         any_topic=round(sum(bool(m) for m in mentions) / len(texts), 3),
         one_topic=round(sum(len(m) == 1 for m in mentions) / len(texts), 3),
         mean_topics=round(sum(map(len, mentions)) / len(texts), 3),
         corpus_one_topic=round(sum(len(m) == 1 for m in corpus) / len(corpus), 3),
         corpus_mean_topics=round(sum(map(len, corpus)) / len(corpus), 3))
    if a.save:
        model.save_pretrained(a.save)
        tok.save_pretrained(a.save)
        emit(event="saved", path=a.save)


if __name__ == "__main__":
    main()
