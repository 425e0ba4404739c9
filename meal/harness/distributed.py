"""Data parallelism over processes started by ``accelerate launch`` (one process per GPU or CPU slot).

    accelerate launch --num_processes 2 -m meal.cli.train trainer.batch_size=16 ...

Every rank draws the same global batch of prompts and target preferences (same seed) and keeps its
own slice: sampling, scoring and both steps are sharded. Gradients of the policy and of the
preference-weight-net are averaged across ranks before each optimiser step (what DDP would do,
without wrapping the module, so that ``torch.func.functional_call`` sees the plain model). Rank 0
logs, checkpoints and evaluates; the others wait. With a single process every operation is a no-op.

The policy's optimiser step (step 10) is one of two engines, chosen by the launcher:

* :class:`AdamWStep` (default): torch AdamW, gradients averaged over ranks as above, then clipped;
* :class:`DeepSpeedStep`, when ``accelerate launch`` runs with a DeepSpeed config
  (``distributed_type: DEEPSPEED``, e.g. ``experiments/accelerate/deepspeed_zero2.yaml``): the same
  AdamW wrapped by a DeepSpeed ZeRO stage 1 or 2 engine, which reduce-scatters the gradients and
  shards the optimiser state (and, at stage 2, the gradients) over the ranks. Stage 3 is refused:
  it partitions the weights themselves, and the virtual step of the meta-learner needs them whole.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from typing import Any, Iterable

import torch

from meal.config import ConfigError


class Dist:
    """Rank, world size and the few collectives the trainer needs."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.device = None
        if self.world > 1:
            from accelerate import PartialState

            cpu = not torch.cuda.is_available()
            if cpu and deepspeed_requested():
                _skip_deepspeed_cpu_shm_build()
            # initialises the process group from the launcher's environment (gloo on CPU-only machines)
            state = PartialState(cpu=cpu)
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

    def shard_halves(self, items: list) -> list:
        """This rank's share of each half of a global batch, its share of the first half first: Meal's meta
        step splits a rank's prompts into the inner and the meta half, and these are then the global
        batch's halves on any number of processes (one process: ``items`` unchanged)."""
        if len(items) % (2 * self.world):
            raise ValueError(f"trainer.batch_size: the inner and the meta half of {len(items)} prompts do not split "
                             f"over {self.world} processes")
        half = len(items) // 2
        return self.shard(items[:half]) + self.shard(items[half:])

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its sum over ranks, in place, in one all-reduce (one process: unchanged)."""
        if self.world == 1 or not tensors:
            return
        import torch.distributed as dist

        dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)  # never below fp32
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors]).to(self._comm_device())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t).to(t))
            offset += n

    def sum_autograd(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s sum over ranks as a new tensor, differentiable: its gradient reaches every rank's ``t``
        (:class:`_SumOverRanks`, whose backward sums the gradients over ranks); a collective, in forward and
        in backward."""
        if self.world == 1:
            return t
        return _SumOverRanks.apply(t.to(self._comm_device())).to(t.device)

    @property
    def batch_sum(self):
        """The sum over ranks that normalises a weight over the whole batch (``sum_autograd``), or None in one
        process (the single-process code path, unchanged)."""
        return self.sum_autograd if self.world > 1 else None

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

    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's tensors (as DDP does with a module at start-up)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t.data, src=0)

    def mean(self, value: float) -> float:
        """The mean of a scalar over ranks."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.item() / self.world

    def mean_values(self, values: dict[str, float]) -> dict[str, float]:
        """Each value's mean over ranks, in one all-reduce (every rank passes the same keys). For a metric
        that is a mean over this rank's share of the batch, the global batch's mean (the shares are equal)."""
        if self.world == 1:
            return dict(values)
        import torch.distributed as dist

        keys = list(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return dict(zip(keys, (t / self.world).tolist()))

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

    def gather(self, obj: Any) -> list | None:
        """Every rank's ``obj`` as a list on rank 0 (None elsewhere); a collective."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, as a list in rank order, on every rank; a collective."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self):
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")


class _SumOverRanks(torch.autograd.Function):
    """y = the sum of x over ranks; dL/dx on each rank = the sum over ranks of dL_r/dy (every rank's loss
    depends on y). A collective in forward and in backward: every rank must take both."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _skip_deepspeed_cpu_shm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce (``deepspeed_shm_comm``, g++ -O2) when its
    process group starts: 40-80 s on 2 cores, again in every new environment (a fresh clone's first DeepSpeed
    launch). That kernel serves DeepSpeed-Inference's ``inference_all_reduce`` alone, which meal never calls
    (ZeRO's collectives go through torch.distributed, gloo on CPU, with or without it), so it is marked
    incompatible in DeepSpeed's probe of its ops, which DeepSpeed keeps for such edits (deepspeed/ops/__init__.py)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_requested() -> bool:
    """True when ``accelerate launch`` was given a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


class AdamWStep:
    """Step 10's optimiser: AdamW on the trainable weights, gradients averaged over ranks, then clipped."""

    def __init__(self, params: dict[str, torch.Tensor], lr: float, weight_decay: float, max_grad_norm: float,
                 dist: Dist):
        self.params, self.max_grad_norm, self.dist = params, max_grad_norm, dist
        self.optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        """Average, clip and step; returns the gradient norm before clipping."""
        self.dist.average_grads(self.params.values())
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.max_grad_norm).item()
        self.optimizer.step()
        return norm

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "deepspeed_zero" in state:
            raise ConfigError("trainer.resume: this checkpoint was written under DeepSpeed ZeRO; resume it with "
                              "the same accelerate DeepSpeed config")
        self.optimizer.load_state_dict(state)


def resolve_deepspeed_config(raw: dict[str, Any], *, micro_batch_size: int, accumulation: int, world: int,
                             max_grad_norm: float, dtype: torch.dtype) -> dict[str, Any]:
    """Fill the values meal owns into a DeepSpeed config and refuse what the trainer cannot honour.

    Batch sizes, accumulation and clipping come from ``trainer.*`` (a different explicit value in the
    DeepSpeed file is an error, ``auto`` is filled); bf16/fp16 follow the policy's dtype; other
    ``auto`` entries are dropped so that DeepSpeed's defaults apply.
    """
    cfg = copy.deepcopy(raw)
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        raise ConfigError(f"DeepSpeed zero_optimization.stage={stage}: stage 3 partitions the policy's weights over "
                          f"processes, but the meta-learner's virtual step needs them whole on every rank; "
                          f"use stage 1 or 2")
    if stage not in (1, 2):
        raise ConfigError(f"DeepSpeed zero_optimization.stage={stage}: meal runs DeepSpeed for ZeRO stage 1 or 2 "
                          f"only (without ZeRO, launch with experiments/accelerate/multi_gpu.yaml)")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(f"DeepSpeed config defines '{key}': meal builds the policy's AdamW from trainer.lr "
                              f"and trainer.weight_decay; remove '{key}' from the DeepSpeed config")
    owned = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": accumulation,
             "train_batch_size": micro_batch_size * accumulation * world, "gradient_clipping": max_grad_norm}
    for key, value in owned.items():
        given = cfg.get(key, "auto")
        if given == "auto":
            cfg[key] = value
        elif float(given) != float(value):
            raise ConfigError(f"DeepSpeed config {key}={given}, but meal's trainer settings give {value} "
                              f"(set it to auto, or change trainer.micro_batch_size / batch_size / max_grad_norm)")
    for key, on in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        cfg[key] = {**{k: v for k, v in cfg.get(key, {}).items() if v != "auto"}, "enabled": on}

    def drop_auto(node):
        if isinstance(node, dict):
            return {k: drop_auto(v) for k, v in node.items() if v != "auto"}
        return node

    cfg = drop_auto(cfg)
    cfg.setdefault("steps_per_print", 2 ** 31)
    return cfg


class DeepSpeedStep:
    """Step 10 under a DeepSpeed ZeRO (stage 1/2) engine, configured by ``accelerate launch``.

    The forward passes stay on the plain module (so ``torch.func.functional_call`` in the meta step
    sees it); ``backward`` goes through the engine, whose hooks reduce-scatter the gradients, and
    the engine steps, clips and re-gathers the updated weights on every rank.
    """

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor], lr: float, weight_decay: float,
                 dist: Dist, config: dict[str, Any]):
        import deepspeed

        self.dist, self.config = dist, config
        self.accumulation = config["gradient_accumulation_steps"]
        optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=list(params.values()), config=self.config)
        self._micro = 0

    def zero_grad(self) -> None:
        self._micro = 0

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # the loss is already a share of the batch mean: no division by the accumulation steps
        self._micro += 1
        if last and self._micro != self.accumulation:
            raise RuntimeError(f"{self._micro} micro-batches this step, DeepSpeed was configured for "
                               f"{self.accumulation}")
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def state_dict(self) -> dict[str, Any]:
        """Every rank's optimiser shard, gathered on rank 0 (a collective: all ranks call it)."""
        from torch.utils._pytree import tree_map

        shard = tree_map(lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x,
                         self.optimizer.state_dict())
        return {"deepspeed_zero": self.dist.gather(shard)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shards = state.get("deepspeed_zero") if isinstance(state, dict) else None
        if shards is None:
            raise ConfigError("trainer.resume: this checkpoint was written without DeepSpeed; resume it the way "
                              "it was launched")
        if len(shards) != self.dist.world:
            raise ConfigError(f"trainer.resume: the checkpoint holds DeepSpeed ZeRO shards of {len(shards)} "
                              f"processes, this launch has {self.dist.world}")
        self.optimizer.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)


def deepspeed_config(trainer_cfg, dist: Dist, dtype: torch.dtype, extra_rows: int = 0) -> dict[str, Any] | None:
    """The resolved DeepSpeed config when ``accelerate launch`` asks for DeepSpeed, else None.

    Called before the policy is loaded, so that a config meal cannot honour fails in seconds.
    ``dtype`` is the policy's compute dtype (it switches DeepSpeed's bf16/fp16 mode). ``extra_rows``:
    rows every real step trains on besides the kept responses (the replayed stage rows), global.
    """
    if not deepspeed_requested():
        return None
    from accelerate.utils import DeepSpeedPlugin

    t = trainer_cfg
    per_rank = t.batch_size // dist.world * t.top_m + extra_rows // dist.world
    return resolve_deepspeed_config(DeepSpeedPlugin().deepspeed_config, micro_batch_size=t.micro_batch_size,
                                    accumulation=math.ceil(per_rank / t.micro_batch_size), world=dist.world,
                                    max_grad_norm=t.max_grad_norm, dtype=dtype)


def make_policy_optimizer(model: torch.nn.Module, params: dict[str, torch.Tensor], trainer_cfg, dist: Dist,
                          ds_config: dict[str, Any] | None):
    """The engine of step 10: DeepSpeed ZeRO given a resolved DeepSpeed config, plain AdamW otherwise."""
    t = trainer_cfg
    if ds_config is not None:
        return DeepSpeedStep(model, params, t.lr, t.weight_decay, dist, ds_config)
    return AdamWStep(params, t.lr, t.weight_decay, t.max_grad_norm, dist)
