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

SCRIPT = Path(__file__).with_name("ddp_train.py")


def run(cmd: list[str], out: Path, *extra: str) -> dict[str, torch.Tensor]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parent)}
    proc = subprocess.run([*cmd, str(SCRIPT), str(out), *extra], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "codebooks.safetensors"))


@pytest.mark.parametrize("stream", [False, True], ids=["map", "stream"])
def test_two_processes_match_one(tmp_path, stream):
    extra = ["stream"] if stream else []
    one = run([sys.executable], tmp_path / "one", *extra)
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={29531 + stream}"], tmp_path / "two", *extra)
    assert int(one["replaced"]) > 0  # dead codes were replaced during the run
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-9, atol=1e-9,
                                   msg=lambda m, k=k: f"{k}: {m}")
