"""What a stage of training cost, reported beside every front (method.md, evaluation protocol: "Cost").

The online stage and the conditioning stage each keep one :class:`Budget`; they are reported apart.
Counts are global (summed over data-parallel processes); ``seconds`` is wall time, summed over the
launches of a resumed run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Budget:
    """Responses sampled, tokens generated, reward evaluations (responses scored x objectives),
    optimiser steps of the policy and of the preference-weight-net, wall seconds."""

    responses: int = 0
    tokens: int = 0
    reward_calls: int = 0
    steps: int = 0
    meta_steps: int = 0
    seconds: float = 0.0

    def add_sampling(self, responses: int, tokens: int, objectives: int) -> None:
        self.responses += responses
        self.tokens += tokens
        self.reward_calls += responses * objectives

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Budget":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def summary(self) -> str:
        """One line of what was spent.

        >>> Budget(960, 41233, 1920, 30, 30, 474.0).summary()
        '960 responses, 41,233 tokens, 1,920 reward calls, 30 (+30 meta) steps, 7.9 min'
        """
        meta = f" (+{self.meta_steps} meta)" if self.meta_steps else ""
        return (f"{self.responses:,} responses, {self.tokens:,} tokens, {self.reward_calls:,} reward calls, "
                f"{self.steps}{meta} steps, {self.seconds / 60:.1f} min")
