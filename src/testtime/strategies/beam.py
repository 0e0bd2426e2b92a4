"""Beam search with a process reward model (the compute-optimal scaling paper's,
and search-and-learn's): N candidates per step; the N/M best unfinished paths
survive, and each gets M children."""

from __future__ import annotations

from typing import Iterator, Sequence

from ..tasks.base import Problem
from ._tree import TreeParams, keep_beams, search, start_beams
from .base import STRATEGIES, ProblemResult, SearchContext


@STRATEGIES.register("beam_search")
class BeamSearch:
    name = "beam_search"
    Params = TreeParams
    needs_prm = True

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: TreeParams) -> Iterator[ProblemResult]:
        return search(problems, ctx, params, start_beams(problems, params), keep_beams)
