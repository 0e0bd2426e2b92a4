"""Majority vote (self-consistency): N independent samples and their most common
final answer. No reward model is asked, even when one is configured: the vote
needs none, and its cost is the samples alone.

A selection over a repeated-sampling run, like best-of-N: maj@k at every k <= N
comes from the same stored samples.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Sequence

from ..tasks.base import Problem
from .base import STRATEGIES, ProblemResult, SearchContext
from .sampling import RepeatedParams, RepeatedSampling


@STRATEGIES.register("majority")
class Majority(RepeatedSampling):
    name = "majority"
    needs_prm = False
    selection = "vote"

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: RepeatedParams) -> Iterator[ProblemResult]:
        return super().run(problems, replace(ctx, prm=None), params)
