"""The loop beam search, DVTS and lookahead share: expand, score, rank, keep, repeat.

Every iteration advances all problems together (one engine call, one reward-model
call). What survives an iteration is the one thing the strategies differ in:
`keep(frontier, children, params)` returns the next frontier and the paths that
are done. A path that ends (end of text, or max tokens) is finished and kept.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

from ..select import aggregate
from ..tasks.base import Problem
from ._steps import Path, SteppedParams, expand, rank, score, step_sampling
from .base import Meter, ProblemResult, SearchContext, SpecError

Frontier = list[tuple[str, Path, int, int]]
"""Parents to expand: (problem id, path, children wanted, group)."""
Children = list[tuple[str, Path, int]]
"""(problem id, child, index of its parent in the frontier)."""
Keep = Callable[[Frontier, Children, "TreeParams", bool], tuple[Frontier, list[tuple[str, Path]]]]


@dataclass(frozen=True)
class TreeParams(SteppedParams):
    width: int = 4
    """M: children per expanded path. N / M paths (beams, or subtrees) go on per step."""

    def check(self) -> None:
        super().check()
        if not isinstance(self.width, int) or self.width < 1 or self.n % self.width:
            raise SpecError(f"width must be an integer >= 1 that divides n, got width={self.width!r}, n={self.n}")


def search(problems: Sequence[Problem], ctx: SearchContext, params: TreeParams, start: Frontier, keep: Keep,
           lookahead: int = 0) -> Iterator[ProblemResult]:
    by_id = {p.id: p for p in problems}
    meter = Meter(ctx.prm)
    step = step_sampling(ctx, params.step_tokens)
    done: dict[str, list[Path]] = {p.id: [] for p in problems}
    frontier = start
    for it in range(params.max_steps):
        if not frontier:
            break
        final = it == params.max_steps - 1
        children = expand(ctx, meter, by_id, [(pid, path, count) for pid, path, count, _ in frontier],
                          step, params.delimiter, it, final)
        score(meter, by_id, [(pid, path) for pid, path, _ in children])
        if lookahead and not final:
            rank_by_rollout(ctx, meter, by_id, children, step, params, lookahead)
        rank([path for _, path, _ in children], params.aggregation)
        frontier, finished = keep(frontier, children, params, final)
        for pid, path in finished:
            done[pid].append(path)
    for p in problems:
        yield ProblemResult(p.id, [path.candidate(params.delimiter) for path in done[p.id]], meter.of(p.id))


def rank_by_rollout(ctx: SearchContext, meter: Meter, by_id: dict[str, Problem], children: Children, step,
                    params: TreeParams, k: int) -> None:
    """Rank each unfinished child by the score of the last step of a k-step greedy
    rollout from it (the rollout is then discarded); finished children keep their own."""
    greedy = replace(step, temperature=0.0)
    owners = {id(p): p for _, p, _ in children if not p.finished}
    live = [(pid, p.copy(), id(p)) for pid, p, _ in children if not p.finished]
    for j in range(k):
        active = [(pid, path, owner) for pid, path, owner in live if not path.finished]
        if not active:
            break
        grown = expand(ctx, meter, by_id, [(pid, path, 1) for pid, path, _ in active], greedy,
                       params.delimiter, -1 - j, False, seed=0)
        live = [(pid, path, active[i][2]) for pid, path, i in grown] + \
               [(pid, path, owner) for pid, path, owner in live if path.finished]
    score(meter, by_id, [(pid, path) for pid, path, _ in live])
    for _, path, owner in live:
        owners[owner].rank = aggregate(path.scores[-1:], "last")


def keep_beams(frontier: Frontier, children: Children, params: TreeParams, final: bool):
    """Beam search: per problem, the N/M best unfinished children go on, M children each."""
    beams = params.n // params.width
    nxt, finished = [], []
    for pid in dict.fromkeys(pid for pid, _, _, _ in frontier):
        mine = [path for q, path, _ in children if q == pid]
        finished += [(pid, path) for path in mine if path.finished]
        alive = sorted((path for path in mine if not path.finished), key=lambda x: -x.rank)
        if final:
            finished += [(pid, path) for path in alive]
        else:
            nxt += [(pid, path, params.width, 0) for path in alive[:beams]]
    return nxt, finished


def start_beams(problems: Sequence[Problem], params: TreeParams) -> Frontier:
    return [(p.id, Path(), params.n, 0) for p in problems]
