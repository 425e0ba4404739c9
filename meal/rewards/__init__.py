"""Reward registry: every reward a run can use is an entry of the config's ``rewards`` mapping.

An entry is a Hydra ``_target_`` spec (e.g. ``{_target_: meal.rewards.embedded.Brevity}``) or a
dotted path to a user's callable or Reward class (``+rewards.mine=mypkg.scoring.my_reward``).
"""

from typing import Any, Mapping

from meal.rewards.base import CallableReward, Reward, RewardError, RewardNormalizer, RewardSet, build_reward

__all__ = ["CallableReward", "Reward", "RewardError", "RewardNormalizer", "RewardSet", "build_reward",
           "reward_names_known"]


def reward_names_known(specs: Mapping[str, Any]) -> set[str]:
    """Names a task may list as objectives (the keys of the config's ``rewards`` mapping)."""
    return set(specs.keys())
