"""The reward protocol, the reward set (B, K) and its z-normalisation.

A reward is anything with ``score(prompts, responses) -> Tensor (B,)`` where ``prompts`` are the
task texts (the user request, the dialogue or the post: not the templated prompt) and
``responses`` the generated texts. A :class:`RewardSet` stacks K of them into a ``(B, K)`` matrix
in the order of the task's objectives; :class:`RewardNormalizer` z-normalises each column with
statistics fixed before training (method.md, "Rewards are z-normalised per objective") and is
saved with the run as ``reward_stats.json``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch


class RewardError(RuntimeError):
    """A reward could not be built or returned a bad value; the message names the reward."""


@runtime_checkable
class Reward(Protocol):
    """One objective: ``score(prompts, responses)`` returns a float tensor of shape (B,)."""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor: ...


class CallableReward:
    """Wrap a user's plain function ``fn(prompts, responses) -> sequence of B floats`` as a Reward.

    >>> r = CallableReward(lambda ps, rs: [len(x) for x in rs])
    >>> r.score(["q"], ["abc"]).tolist()
    [3.0]
    """

    def __init__(self, fn: Callable[[Sequence[str], Sequence[str]], Any]):
        self.fn = _resolve(fn) if isinstance(fn, str) else fn

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return torch.as_tensor(self.fn(list(prompts), list(responses)), dtype=torch.float32).reshape(-1)


def _resolve(dotted: str) -> Any:
    module, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise RewardError(f"cannot import reward {dotted!r}: {e}") from e


def build_reward(name: str, spec: Any) -> Reward:
    """Build one reward from its config: a ``_target_`` mapping, or a dotted path to a class/callable."""
    from hydra.utils import instantiate

    try:
        if isinstance(spec, str):
            obj = _resolve(spec)
            if inspect.isclass(obj):
                obj = obj()
            reward = obj if isinstance(obj, Reward) else CallableReward(obj)
        else:
            reward = instantiate(spec, _convert_="all")
            if not isinstance(reward, Reward):
                reward = CallableReward(reward) if callable(reward) else reward
    except RewardError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the reward's name
        raise RewardError(f"reward {name!r} could not be built from {spec}: {e}") from e
    if not isinstance(reward, Reward):
        raise RewardError(f"reward {name!r} has no score(prompts, responses) method")
    return reward


class RewardSet:
    """K rewards scored together: ``score(prompts, responses) -> Tensor (B, K)`` of raw values."""

    def __init__(self, rewards: Mapping[str, Reward], objectives: Sequence[str]):
        missing = [o for o in objectives if o not in rewards]
        if missing:
            raise RewardError(f"unknown reward(s) {missing}; defined: {sorted(rewards)}")
        self.objectives = list(objectives)
        self.rewards = {o: rewards[o] for o in self.objectives}

    @classmethod
    def from_config(cls, specs: Mapping[str, Any], objectives: Sequence[str]) -> "RewardSet":
        """Build only the rewards the task's objectives use."""
        unknown = [o for o in objectives if o not in specs]
        if unknown:
            raise RewardError(f"unknown reward(s) {unknown}; defined: {sorted(specs)}")
        return cls({o: build_reward(o, specs[o]) for o in objectives}, objectives)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        cols = []
        for name, reward in self.rewards.items():
            col = torch.as_tensor(reward.score(prompts, responses), dtype=torch.float32).reshape(-1).cpu()
            if col.numel() != len(responses):
                raise RewardError(f"reward {name!r} returned {col.numel()} values for {len(responses)} responses")
            bad = (~torch.isfinite(col)).nonzero().flatten().tolist()
            if bad:
                i = bad[0]
                raise RewardError(f"reward {name!r} returned {col[i].item()} (non-finite) for {len(bad)} "
                                  f"response(s), first at index {i}: {responses[i][:80]!r}")
            cols.append(col)
        return torch.stack(cols, dim=1)  # (B, K)


@dataclass
class RewardNormalizer:
    """Per-objective z-normalisation ``(r - mean) / std`` with statistics fixed before training."""

    objectives: list[str]
    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, raw: torch.Tensor, objectives: Sequence[str]) -> "RewardNormalizer":
        """Statistics of a (M, K) matrix of raw rewards from the scoring pass."""
        if raw.ndim != 2 or raw.shape[0] < 2:
            raise ValueError(f"need a (M >= 2, K) matrix of raw rewards, got {tuple(raw.shape)}")
        std = raw.std(dim=0)
        flat = std < 1e-6
        if flat.any():  # a reward that did not vary in the pass: centre it, do not blow it up
            logging.getLogger(__name__).warning("rewards %s did not vary in the normalisation pass; std set to 1",
                                                [o for o, f in zip(objectives, flat.tolist()) if f])
            std = torch.where(flat, torch.ones_like(std), std)
        return cls(list(objectives), raw.mean(dim=0).tolist(), std.tolist())

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=raw.dtype, device=raw.device)
        std = torch.tensor(self.std, dtype=raw.dtype, device=raw.device)
        return (raw - mean) / std

    def save(self, path: str, extra: Mapping[str, Any] | None = None) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"objectives": self.objectives, "mean": self.mean, "std": self.std, **(extra or {})}, f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, objectives: Sequence[str] | None = None) -> "RewardNormalizer":
        try:
            with open(path) as f:
                d = json.load(f)
            norm = cls(list(d["objectives"]), [float(x) for x in d["mean"]], [float(x) for x in d["std"]])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RewardError(f"reward statistics {path} are unreadable: {e}") from e
        if objectives is not None and list(objectives) != norm.objectives:
            raise RewardError(f"reward statistics {path} are for {norm.objectives}, not {list(objectives)}")
        if not all(math.isfinite(v) for v in norm.mean + norm.std):
            raise RewardError(f"reward statistics {path} contain non-finite values")
        return norm
