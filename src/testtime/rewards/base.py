"""Process reward models: one score per step of a partial or complete solution.

A solution is a list of steps (text split on a delimiter, a blank line by
default). A reward model scores every step given the problem and the steps
before it; reducing those to one number is `testtime.select.aggregate`, kept
apart so the same stored scores serve every aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from ..registry import Registry


@dataclass(frozen=True)
class Scoring:
    """Score the steps of one solution. Scores for the first `known` steps are
    already known to the caller (a search extends solutions one step at a time),
    so a reward model whose step scores do not depend on later steps may skip them."""

    question: str
    steps: tuple[str, ...]
    known: int = 0


class RewardModel(Protocol):
    name: str

    def score(self, items: Sequence[Scoring]) -> list[list[float]]:
        """For each item, scores for steps known..len(steps)-1, each in [0, 1]."""
        ...

    def identity(self) -> dict[str, Any]: ...

    # Optional: `usage` (a `flops.Usage`) accumulating what scoring computed, and
    # `shape()` (a `flops.ModelShape`) to turn it into FLOPs.


REWARD_MODELS: Registry[Callable[..., RewardModel]] = Registry("reward model")


def load_reward_model(name: str, **kwargs: Any) -> RewardModel:
    return REWARD_MODELS.build(name, **kwargs)


def split_steps(text: str, delimiter: str = "\n\n") -> list[str]:
    """Steps of a solution: the text split on the delimiter, empty pieces dropped."""
    return [s for s in (p.strip() for p in text.split(delimiter)) if s]
