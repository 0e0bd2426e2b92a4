"""Diverse verifier tree search (DVTS, search-and-learn): N/M independent subtrees
of width M. Each subtree expands its own path into M children and keeps its single
best child, so the subtrees stay diverse where beam search collapses onto the
reward model's favourite; it wins at large budgets."""

from __future__ import annotations

from typing import Iterator, Sequence

from ..tasks.base import Problem
from ._steps import Path
from ._tree import Children, Frontier, TreeParams, search
from .base import STRATEGIES, ProblemResult, SearchContext


def keep_best_child(frontier: Frontier, children: Children, params: TreeParams, final: bool):
    """Each subtree keeps its best child: done if that child finished (or it is the
    last step), else expanded again."""
    nxt, finished = [], []
    for i, (pid, _, _, group) in enumerate(frontier):
        mine = [path for _, path, parent in children if parent == i]
        if not mine:
            continue
        best = max(mine, key=lambda x: x.rank)
        if best.finished or final:
            finished.append((pid, best))
        else:
            nxt.append((pid, best, params.width, group))
    return nxt, finished


@STRATEGIES.register("dvts")
class DVTS:
    name = "dvts"
    Params = TreeParams
    needs_prm = True

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: TreeParams) -> Iterator[ProblemResult]:
        subtrees = params.n // params.width
        start = [(p.id, Path(), params.width, g) for p in problems for g in range(subtrees)]
        return search(problems, ctx, params, start, keep_best_child)
