"""Run by tests/test_ddp.py, alone or under torchrun: a short CodebookTrainer run whose global
batch is the same whatever the number of processes (accelerate's split_batches)."""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import default_data_collator

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_dead_codes import Recorder  # noqa: E402
from test_training import args, make_data, make_model  # noqa: E402

from codebook_features.training import CodebookTrainer, kmeans_init_codebooks  # noqa: E402


def main(out: str, stream: bool = False) -> None:
    # float64: the two runs differ only by the order of gradient sums, far below any near-tie
    # between codes that could change which code fires.
    model = make_model().double()
    data = make_data()
    targs = args(out, max_steps=4, per_device_train_batch_size=16, dead_code_interval=2,
                 accelerator_config={"split_batches": True}, dataloader_drop_last=True)
    targs.device  # noqa: B018 (sets up the devices, and the process group under torchrun)
    rank = targs.process_index
    os.makedirs(out, exist_ok=True)
    assert torch.distributed.is_initialized() == (targs.world_size > 1)
    # k-means on different rows on each process: only its broadcast of rank 0's codes makes
    # the processes start alike (and like one process, which uses rank 0's rows).
    rows = range(32 * rank, 32 * rank + 64)
    kmeans_init_codebooks(model, [default_data_collator([data[i] for i in rows])], iters=5)
    save_file({f"{n}.codebook": layer.codebook.detach().clone()
               for n, layer in model.sites.items()}, f"{out}/kmeans-rank{rank}.safetensors")
    # stream: an IterableDataset in row order, which accelerate reads on rank 0 and dispatches.
    train = data.to_iterable_dataset() if stream else data
    trainer = CodebookTrainer(model, targs, train_dataset=train,
                              data_collator=default_data_collator)
    rec = Recorder(model)  # this process's fired codes and every replacement, step by step
    trainer.add_callback(rec)
    trainer.train()
    torch.save({"fired": rec.fired, "replaced": rec.replaced}, f"{out}/record-rank{rank}.pt")
    if rank == 0:
        tensors = {f"{n}.{k}": v.detach().clone() for n, layer in model.sites.items()
                   for k, v in layer.named_parameters()}
        tensors["replaced"] = torch.tensor([trainer._replaced])
        save_file(tensors, f"{out}/codebooks.safetensors")
    if torch.distributed.is_initialized():  # a clean shutdown of the gloo threads
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], stream=sys.argv[2:] == ["stream"])
