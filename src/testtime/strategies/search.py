"""The previous search API, kept as a thin layer over the registered strategies
while `compare`, `optimal` and `serve` move onto strategy runs (issue 12). Every
algorithm lives in its own module (`beam`, `dvts`, `lookahead`, `revision`,
`sampling`); this only converts `SearchConfig` into their parameters and their
results into per-problem paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..engines.base import Engine
from ..flops import Usage
from ..prompts import PromptTemplate
from ..rewards.base import RewardModel
from ..select import aggregate
from ..spec import SamplingParams
from ..tasks.base import Problem
from ._steps import Path
from .base import STRATEGIES, ProblemResult, SearchContext


@dataclass(frozen=True)
class SearchConfig:
    n: int = 8
    """The budget N: completions generated per problem per iteration."""
    width: int = 4
    """M: children per expanded path."""
    max_iterations: int = 12
    delimiter: str = "\n\n"
    aggregation: str = "last"
    lookahead: int = 0
    """k: steps of greedy rollout used to rank each child (0: rank by the child itself)."""
    sequential: int = 1
    """Revision: attempts per chain."""

    def __post_init__(self) -> None:
        if self.n < 1 or self.width < 1 or self.n % self.width:
            raise ValueError(f"search needs n and width >= 1 with width dividing n, got n={self.n}, width={self.width}")
        if self.max_iterations < 1 or self.lookahead < 0:
            raise ValueError("max_iterations must be >= 1 and lookahead >= 0")
        if not self.delimiter:
            raise ValueError("the step delimiter must not be empty")
        if self.sequential < 1 or self.n % self.sequential:
            raise ValueError(f"sequential must divide n, got n={self.n}, sequential={self.sequential}")


@dataclass
class SearchStats:
    generated_tokens: int = 0
    """Every token the policy generated, pruned paths and rollouts included."""
    usage: Usage = field(default_factory=Usage)
    by_problem: dict[str, dict[str, Usage]] = field(default_factory=dict)


@dataclass
class SearchResult:
    paths: dict[str, list[Path]]
    stats: SearchStats


def _run(name: str, problems: Sequence[Problem], engine: Engine, prm: RewardModel | None, template: PromptTemplate,
         params: SamplingParams, cfg: SearchConfig, seed: int, **extra) -> SearchResult:
    impl = STRATEGIES.get(name)
    values = {"n": cfg.n, "delimiter": cfg.delimiter, "aggregation": cfg.aggregation, **extra}
    sampling = params
    if "step_tokens" in {f for f in impl.Params.__dataclass_fields__}:
        values.update(width=cfg.width, max_steps=cfg.max_iterations, step_tokens=params.max_tokens)
    results: list[ProblemResult] = list(impl().run(problems, SearchContext(engine, prm, template, sampling, seed),
                                                   impl.Params(**values)))
    stats = SearchStats()
    paths = {}
    for r in results:
        paths[r.problem_id] = [Path(list(c.steps), list(c.scores), True, c.finish_reason, c.tokens,
                                    aggregate(list(c.scores), cfg.aggregation), c.seed, c.prompt_tokens)
                               for c in r.candidates]
        stats.by_problem[r.problem_id] = r.usage
        stats.usage += r.usage.get("policy", Usage())
    stats.generated_tokens = int(stats.usage.decode)
    return SearchResult(paths, stats)


def best_of_n(problems, engine, prm, template, params, cfg, seed: int = 0) -> SearchResult:
    """N independent complete samples per problem, every step scored afterwards."""
    return _run("repeated_sampling", problems, engine, prm, template, params, cfg, seed)


def tree_search(problems, engine, prm, template, params, cfg, mode: str = "beam", seed: int = 0) -> SearchResult:
    """Beam search (mode='beam', with lookahead when cfg.lookahead > 0) or DVTS."""
    if mode not in ("beam", "dvts"):
        raise ValueError(f"mode must be 'beam' or 'dvts', got {mode!r}")
    if mode == "dvts":
        return _run("dvts", problems, engine, prm, template, params, cfg, seed)
    if cfg.lookahead:
        return _run("lookahead", problems, engine, prm, template, params, cfg, seed, lookahead=cfg.lookahead)
    return _run("beam_search", problems, engine, prm, template, params, cfg, seed)


def revision(problems, engine, prm, template, params, cfg, seed: int = 0) -> SearchResult:
    """N / cfg.sequential chains of revisions; every attempt is a candidate."""
    return _run("revision", problems, engine, prm, template, params, cfg, seed, sequential=cfg.sequential)
