"""Lookahead search (the compute-optimal scaling paper): beam search that ranks
each child not by its own step's score but by the score of the last step of a
k-step greedy rollout from it; the rollout's tokens are paid for and discarded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from ..tasks.base import Problem
from ._tree import TreeParams, keep_beams, search, start_beams
from .base import STRATEGIES, ProblemResult, SearchContext, SpecError


@dataclass(frozen=True)
class LookaheadParams(TreeParams):
    lookahead: int = 1
    """k: greedy rollout steps used to rank each child."""

    def check(self) -> None:
        super().check()
        if not isinstance(self.lookahead, int) or self.lookahead < 1:
            raise SpecError(f"lookahead must be an integer >= 1, got {self.lookahead!r}")


@STRATEGIES.register("lookahead")
class Lookahead:
    name = "lookahead"
    Params = LookaheadParams
    needs_prm = True

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: LookaheadParams) -> Iterator[ProblemResult]:
        return search(problems, ctx, params, start_beams(problems, params), keep_beams, lookahead=params.lookahead)
