"""Run by tests/test_ddp.py, alone or under torchrun: a short CodebookTrainer run whose global
batch is the same whatever the number of processes (accelerate's split_batches)."""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file
from transformers import default_data_collator

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_training import args, make_data, make_model  # noqa: E402

from codebook_features.training import CodebookTrainer, kmeans_init_codebooks  # noqa: E402


def main(out: str, stream: bool = False) -> None:
    # float64: the two runs differ only by the order of gradient sums, far below any near-tie
    # between codes that could change which code fires.
    model = make_model().double()
    data = make_data()
    kmeans_init_codebooks(model, [default_data_collator([data[i] for i in range(64)])], iters=5)
    targs = args(out, max_steps=4, per_device_train_batch_size=16, dead_code_interval=2,
                 accelerator_config={"split_batches": True}, dataloader_drop_last=True)
    # stream: an IterableDataset in row order, which accelerate reads on rank 0 and dispatches.
    train = data.to_iterable_dataset() if stream else data
    trainer = CodebookTrainer(model, targs, train_dataset=train,
                              data_collator=default_data_collator)
    trainer.train()
    if trainer.args.process_index == 0:
        tensors = {f"{n}.{k}": v.detach().clone() for n, layer in model.sites.items()
                   for k, v in layer.named_parameters()}
        tensors["replaced"] = torch.tensor([trainer._replaced])
        save_file(tensors, f"{out}/codebooks.safetensors")
    if torch.distributed.is_initialized():  # a clean shutdown of the gloo threads
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], stream=sys.argv[2:] == ["stream"])
