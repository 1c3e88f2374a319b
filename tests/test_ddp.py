"""Two processes (torchrun, gloo) train the same codebooks as one process on the same global
batches, dead-code replacement and k-means initialisation included; also from a streamed
(iterable) dataset, which accelerate reads on rank 0 and dispatches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_dead_codes import check_replacements

SCRIPT = Path(__file__).with_name("ddp_train.py")


def run(cmd: list[str], out: Path, *extra: str) -> dict[str, torch.Tensor]:
    path = os.pathsep.join([str(SCRIPT.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run([*cmd, str(SCRIPT), str(out), *extra], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "codebooks.safetensors"))


@pytest.mark.parametrize("stream", [False, True], ids=["map", "stream"])
def test_two_processes_match_one(tmp_path, stream):
    extra = ["stream"] if stream else []
    one = run([sys.executable], tmp_path / "one", *extra)
    # --standalone: the rendezvous port is a free one the OS picks (tests run in parallel).
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2"], tmp_path / "two", *extra)
    assert int(one["replaced"]) > 0  # dead codes were replaced during the run
    # Independently of the code under test: the dead codes replaced at each step are those
    # that no process fired within the window (the union of both processes' codes), replaced
    # alike on both, and exactly the single process's.
    ranks = [torch.load(tmp_path / "two" / f"record-rank{r}.pt") for r in (0, 1)]
    fired = {s: {n: ranks[0]["fired"][s][n] | ranks[1]["fired"][s][n] for n in ranks[0]["fired"][s]}
             for s in ranks[0]["fired"]}
    for rec in ranks:
        assert check_replacements(fired, rec["replaced"], max_steps=4, interval=2) == int(
            two["replaced"])
    single = torch.load(tmp_path / "one" / "record-rank0.pt")
    assert check_replacements(single["fired"], single["replaced"], max_steps=4,
                              interval=2) == int(one["replaced"])
    # k-means ran in the process group on different rows per rank; its broadcast made rank 1
    # start from rank 0's codes, which are the single process's.
    starts = [load_file(str(d / f"kmeans-rank{r}.safetensors"))
              for d, r in ((tmp_path / "one", 0), (tmp_path / "two", 0), (tmp_path / "two", 1))]
    for k in starts[0]:
        assert torch.equal(starts[1][k], starts[0][k]) and torch.equal(starts[2][k], starts[0][k])
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-9, atol=1e-9,
                                   msg=lambda m, k=k: f"{k}: {m}")
