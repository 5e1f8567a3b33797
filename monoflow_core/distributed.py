"""Data-parallel training across processes (``torchrun``), with the flow's extra state kept in sync.

Every process draws the *same* global batch (the data stream is seeded identically), trains on its slice of it,
and the gradients are summed across processes with one ``all_reduce`` per step. Because each slice's loss is
divided by the global batch size, the summed gradient equals that of one process on the whole global batch, so
a K-process run takes the same steps as a single-process run (up to floating-point summation order).

What plain ``DistributedDataParallel`` would not keep in sync, this does:

* **spectral-norm state**: power-iteration vectors are buffers updated from the (identical) weights after every
  step, and they are broadcast from rank 0 when training starts;
* **ActNorm's data-dependent initialisation**: done with the whole global batch, which every process holds, so
  every process computes the same statistics (the same as a single-process run);
* **dequantization noise**: drawn for the global batch from a seeded generator and sliced like the data.

Launch: ``torchrun --nproc_per_node=K -m monoflow_core train ...`` (backend ``nccl`` on CUDA, ``gloo`` on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistributedContext", "init_from_environment"]


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a data-parallel run (``world_size == 1``: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        """Whether there are other processes to synchronise with."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and evaluations."""
        return self.rank == 0

    @classmethod
    def current(cls) -> DistributedContext:
        """The context of an initialised ``torch.distributed`` process group, else single-process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def shard(self, batch: Tensor) -> Tensor:
        """This process's contiguous slice of a global batch (sizes differ by at most one)."""
        if not self.active:
            return batch
        return torch.tensor_split(batch, self.world_size)[self.rank]

    def all_reduce_sum(self, flat: Tensor) -> Tensor:
        """Sum a tensor over all processes, in place; returns it."""
        if self.active:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return flat

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers (power-iteration vectors, ActNorm flags) to every process."""
        if not self.active:
            return
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_from_environment(device: str = "cpu") -> tuple[DistributedContext, str]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), if not joined yet.

    Args:
        device: the configured device; on CUDA each process takes ``cuda:LOCAL_RANK``.

    Returns:
        ``(context, device)`` with the device this process should train on.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistributedContext.current(), device
    cuda = torch.device(device).type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return DistributedContext.current(), device
