"""Calibrate the TokFSM demo: how fast does a GPT-NeoX learn an FSM on this machine?

Trains a GPT-NeoX-style model from scratch (no codebooks) on fresh TokFSM batches with a plain
torch AdamW loop at a constant learning rate, and prints one JSON line per evaluation:
step, training seconds (evaluation excluded), wall seconds, training loss (mean since the last
evaluation) and sampled state accuracy
(``codebook_features.experiments.tokfsm.metrics.state_accuracy``). A final line summarises
the first step/second at which each accuracy target was reached.

Example::

    python benchmarks/tokfsm_calibrate.py --num-states 40 --successors 5 --batch 32 \\
        --lr 3e-3 --steps 400 --eval-every 50

``--demo`` runs the whole demo instead
(``codebook_features.experiments.tokfsm.job.run_demo``) with ``--set`` overrides and appends
one record, settings -> figures and verdicts, to
``benchmarks/tokfsm_calibration.json`` (the curve the demo's defaults were chosen from)::

    python benchmarks/tokfsm_calibrate.py --demo --label "64 wide" --set hidden=64 ks=1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from codebook_features.experiments.tokfsm import BOS_TOKEN_ID, VOCAB_SIZE, TokFSM, TokFSMConfig
from codebook_features.experiments.tokfsm.metrics import state_accuracy


def build_model(layers: int, hidden: int, heads: int, mlp: int, seq_len: int, seed: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=mlp,
                        max_position_embeddings=max(seq_len, 256),
                        bos_token_id=BOS_TOKEN_ID, eos_token_id=BOS_TOKEN_ID)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(cfg)


RECORD = Path(__file__).with_name("tokfsm_calibration.json")
FIGURES = ("base.state_acc", "attn_k1.state_acc", "attn_mlp_k1.state_acc",
           "attn_mlp_k4.state_acc", "attn_mlp_k16.state_acc", "state_codes.mean_precision",
           "state_codes.mean_recall", "state_codes.states_covered", "neurons.mean_precision",
           "intervention.normalized_jsd", "intervention.success",
           "intervention.success_before")


def _get(report: dict, path: str):
    cur = report
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def demo_main(argv: list[str]) -> None:
    """One demo run with ``--set`` overrides, recorded in ``--record``."""
    import tempfile

    from codebook_features.experiments.tokfsm.job import DemoConfig, apply_overrides, run_demo
    from codebook_features.io import write_json

    p = argparse.ArgumentParser(description="record one demo run (settings -> figures)")
    p.add_argument("--demo", action="store_true")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--label", default="", help="what this run tries")
    p.add_argument("--record", default=str(RECORD))
    p.add_argument("--out", default=None, help="demo output folder (default: a temporary one)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = apply_overrides(DemoConfig(out=a.out or tmp), a.set, frozen=("variants", "out"))
        t0 = time.time()
        report = run_demo(cfg)
        wall = time.time() - t0
    row = {"label": a.label, "set": a.set, "date": time.strftime("%Y-%m-%d %H:%M"),
           "torch_threads": torch.get_num_threads(), "wall_s": round(wall, 1),
           "figures": {k: _get(report, k) for k in FIGURES},
           "targets": {t["target"]: t["met"] for t in report["targets"]},
           "timings": report["timings"]}
    path = Path(a.record)
    rows = json.loads(path.read_text()) if path.exists() else []
    write_json(path, rows + [row])
    print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--demo" in argv:
        demo_main(argv)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-states", type=int, default=100)
    p.add_argument("--successors", type=int, default=10)
    p.add_argument("--states-per-sequence", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="constant",
                   help="learning-rate schedule after a warmup of a tenth of the steps "
                        "(at most 50), as transformers' get_scheduler")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-sequences", type=int, default=100)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--stop-at", type=float, default=None,
                   help="stop once state accuracy reaches this value")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    fsm = TokFSM(TokFSMConfig(num_states=a.num_states, successors=a.successors,
                              states_per_sequence=a.states_per_sequence, seed=a.seed))
    model = build_model(a.layers, a.hidden, a.heads, a.mlp, fsm.config.seq_len, a.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    from transformers import get_scheduler

    warmup = 0 if a.schedule == "constant" else min(50, a.steps // 10)
    sched = get_scheduler(a.schedule, opt, num_warmup_steps=warmup, num_training_steps=a.steps)
    gen = torch.Generator().manual_seed(a.seed + 12345)
    settings = {k: v for k, v in vars(a).items()}
    settings.update(fsm=fsm.name, params=sum(x.numel() for x in model.parameters()),
                    torch_threads=torch.get_num_threads())
    print(json.dumps({"settings": settings}), flush=True)

    train_s, losses, t_wall = 0.0, [], time.perf_counter()
    targets = {0.5: None, 0.8: None, 0.9: None, 0.95: None}
    for step in range(1, a.steps + 1):
        t0 = time.perf_counter()
        model.train()
        ids = fsm.encode(fsm.sample_states(a.batch, generator=gen))
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB_SIZE), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t0
        losses.append(loss.item())
        if step % a.eval_every == 0 or step == a.steps:
            acc = state_accuracy(model, fsm, n_sequences=a.eval_sequences, seed=step)
            row = {"step": step, "train_s": round(train_s, 1),
                   "wall_s": round(time.perf_counter() - t_wall, 1),
                   "loss": round(sum(losses) / len(losses), 4), "state_accuracy": round(acc, 4)}
            losses = []
            for t in targets:
                if targets[t] is None and acc >= t:
                    targets[t] = {"step": step, "train_s": row["train_s"]}
            print(json.dumps(row), flush=True)
            if a.stop_at is not None and acc >= a.stop_at:
                break
    print(json.dumps({"reached": {str(k): v for k, v in targets.items()}}), flush=True)


if __name__ == "__main__":
    main()
