"""Data parallelism over processes started by ``accelerate launch`` (one process per GPU or CPU slot).

    accelerate launch --num_processes 2 -m meal.train trainer.batch_size=16 ...

Every rank draws the same global batch of prompts and target preferences (same seed) and keeps its
own slice: sampling, scoring and both steps are sharded. Gradients of the policy and of the
preference-weight-net are averaged across ranks before each optimiser step (what DDP would do,
without wrapping the module, so that ``torch.func.functional_call`` sees the plain model). Rank 0
logs, checkpoints and evaluates; the others wait. With a single process every operation is a no-op.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch


class Dist:
    """Rank, world size and the few collectives the trainer needs."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.device = None
        if self.world > 1:
            from accelerate import PartialState

            # initialises the process group from the launcher's environment (gloo on CPU-only machines)
            state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world, self.device = state.process_index, state.num_processes, state.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of a global batch (the batch size must divide)."""
        if len(items) % self.world:
            raise ValueError(f"trainer.batch_size: {len(items)} prompts do not split over {self.world} processes")
        per = len(items) // self.world
        return items[self.rank * per:(self.rank + 1) * per]

    def average_grads(self, params: Iterable[torch.Tensor]) -> None:
        """All-reduce the mean of each parameter's ``.grad`` (missing grads count as zeros)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.world

    def mean(self, value: float) -> float:
        """The mean of a scalar over ranks."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.item() / self.world

    def check_same(self, params: Iterable[torch.Tensor]) -> None:
        """Raise if the ranks' copies of the parameters have drifted apart (a bug, never expected)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        s = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(self._comm_device())
        lo, hi = s.clone(), s.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"rank {self.rank}: parameters differ across processes ({lo.item()} vs {hi.item()})")

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self):
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")
