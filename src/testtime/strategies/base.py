"""The strategy extension point: problems in, final candidates out.

A strategy turns each problem into its final candidates; how it got them
(independent samples, beams, subtrees, revisions) is its own business. Every
strategy has one signature,

    strategy.run(problems, ctx, params) -> iterator of ProblemResult

and typed, validated parameters (`params`, a frozen dataclass with a docstring
per field). The runner stores each result the moment it is yielded: one
`samples` row per candidate, its step scores, and the usage of each role
(policy engine, reward model), so grading, reports, exports, costs and resume
work the same for every strategy.

Register an implementation with `@STRATEGIES.register("name")` on a class with
`name`, `Params`, `needs_prm` and `run`; `docs/extending.md` walks through one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Protocol, Sequence

from ..engines.base import Completion, Engine
from ..flops import Usage
from ..prompts import PromptTemplate
from ..registry import Registry
from ..rewards.base import RewardModel, Scoring
from ..select import AGGREGATIONS
from ..spec import SamplingParams, SpecError
from ..tasks.base import Problem


@dataclass
class Candidate:
    """One final solution of a problem."""

    text: str
    seed: int
    """The seed of the sample that started it (its first step)."""
    tokens: int
    """Tokens generated along this candidate's own steps."""
    finish_reason: str
    prompt_tokens: int = 0
    """The problem's prompt, in tokens."""
    steps: tuple[str, ...] = ()
    """The steps a reward model scored (empty when nothing was scored)."""
    scores: tuple[float, ...] = ()
    """One reward-model score per step."""


@dataclass
class ProblemResult:
    problem_id: str
    candidates: list[Candidate]
    usage: dict[str, Usage] = field(default_factory=dict)
    """What this problem cost, by role: "policy" (the engine, rollouts included) and
    "prm" (the reward model; a batched scoring call is shared out by text length)."""
    decision: dict[str, Any] = field(default_factory=dict)
    """What the strategy decided for this problem, stored with it (a policy's bin and
    choice); empty for strategies that decide nothing per problem."""


@dataclass(frozen=True)
class SearchContext:
    """What every strategy runs on."""

    engine: Engine
    prm: RewardModel | None
    template: PromptTemplate
    sampling: SamplingParams
    """How each token is drawn; a step-wise strategy caps `max_tokens` per step itself."""
    seed: int = 0
    scorer: str = ""
    """The reward model's name in the step-score table."""

    def messages(self, problem: Problem) -> tuple[dict[str, str], ...]:
        """The chat a problem is asked in: its own (`meta["messages"]`, a served
        request's turns) or the template's."""
        own = problem.meta.get("messages") if problem.meta else None
        return tuple(own) if own else tuple(self.template.messages(problem.question))

    def continuation(self, problem: Problem) -> str:
        """The start of the assistant's answer the template writes (none for a problem with its own chat)."""
        own = problem.meta.get("messages") if problem.meta else None
        return "" if own else self.template.continuation(problem.question)

    def prefix(self, problem: Problem, extra: str = "") -> dict[str, Any]:
        """A request's prefix for a problem, as `Request` fields, with `extra` (steps so
        far) appended: the chat and the answer's start, or the problem's own raw prompt
        (`meta["prompt"]`, a served completions request) with no chat template."""
        raw = problem.meta.get("prompt") if problem.meta else None
        if raw is not None:
            return {"prompt": raw + extra}
        return {"messages": self.messages(problem), "continuation": self.continuation(problem) + extra}


@dataclass(frozen=True)
class StrategyParams:
    """Parameters common to every strategy. Subclasses add their own, each with a
    docstring, and check them in `check()` with errors that name the parameter."""

    n: int = 8
    """The budget N: generations per problem (for step-wise search, per step)."""

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise SpecError(f"n must be an integer >= 1, got {self.n!r}")
        self.check()

    def check(self) -> None:
        """Validate the subclass's fields (raise SpecError naming the parameter)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StrategyParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SpecError(f"unknown parameters {', '.join(unknown)} for this strategy; it takes: "
                            f"{', '.join(sorted(names))}")
        return cls(**d)


@dataclass(frozen=True)
class StepParams(StrategyParams):
    """Parameters of the strategies that score solutions step by step."""

    delimiter: str = "\n"
    """What ends a step: generation of a step stops there, and finished solutions are
    split there for the reward model. Small models write one step per line; the
    llama3_math template's "## Step k:" blocks end in a blank line ("\n\n")."""
    aggregation: str = "last"
    """How step scores become one score per solution: last, min, prod or mean."""

    def check(self) -> None:
        if not isinstance(self.delimiter, str) or not self.delimiter:
            raise SpecError(f"delimiter must be a non-empty string, got {self.delimiter!r}")
        if self.aggregation not in AGGREGATIONS:
            raise SpecError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")


class Strategy(Protocol):
    name: ClassVar[str]
    Params: ClassVar[type[StrategyParams]]
    needs_prm: ClassVar[bool]
    """True when the strategy cannot run without a reward model."""
    # Optional class attributes (read with `trait`):
    #   independent = True   its candidates are independent samples: its run is a sampling
    #                        run, extendable, and every k <= N is a subset of one draw
    #   selection            how the final answer is chosen from the candidates: "weighted"
    #                        (votes weighted by aggregated step scores; a plain vote where
    #                        nothing was scored) or "vote" (a plain vote)

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: StrategyParams) -> Iterator[ProblemResult]:
        """Yield each problem's result as soon as it is final."""
        ...


STRATEGIES: Registry[type] = Registry("strategy")


def load_strategy(name: str) -> Strategy:
    return STRATEGIES.get(name)()


def trait(name: str, attr: str) -> Any:
    """A strategy's optional class attribute (see `Strategy`), with its default."""
    defaults = {"independent": False, "selection": "weighted"}
    return getattr(STRATEGIES.get(name), attr, defaults[attr])


def strategy_params(name: str, values: dict[str, Any] | None = None) -> StrategyParams:
    """A strategy's validated parameters from plain values (CLI, files, requests)."""
    return STRATEGIES.get(name).Params.from_dict(dict(values or {}))


# -- bookkeeping shared by strategies ------------------------------------------

class Meter:
    """Usage per problem and role. Engine completions carry their problem in their key;
    a batched reward-model call is shared out over its items by text length."""

    def __init__(self, prm: RewardModel | None):
        self.prm = prm
        self.by_problem: dict[str, dict[str, Usage]] = {}

    def _add(self, pid: str, role: str, u: Usage) -> None:
        self.by_problem.setdefault(pid, {}).setdefault(role, Usage())
        self.by_problem[pid][role] += u

    def completion(self, pid: str, c: Completion) -> None:
        if c.finish_reason == "cancelled" and not c.completion_tokens and not c.prompt_tokens:
            return  # cancelled before it started: it cost nothing
        self._add(pid, "policy", Usage.of(c.prompt_tokens, c.cached_tokens, c.completion_tokens))

    def score(self, items: Sequence[tuple[str, Scoring]]) -> list[list[float]]:
        """Score items (problem id, scoring) with the reward model, charging each problem."""
        if self.prm is None or not items:
            return [[] for _ in items]
        before = _usage_of(self.prm)
        scores = self.prm.score([s for _, s in items])
        spent = _usage_of(self.prm) + before.scaled(-1)
        weights = [sum(len(x) for x in s.steps) + len(s.question) for _, s in items]
        total = sum(weights) or 1
        for (pid, _), w in zip(items, weights):
            self._add(pid, "prm", spent.scaled(w / total))
        return scores

    def of(self, pid: str) -> dict[str, Usage]:
        return self.by_problem.get(pid, {"policy": Usage()})


class Ledger:
    """Per problem, the samples an adaptive strategy streamed to the engine: `sent`,
    come `back` (cancelled ones included), `drawn` (generated anything) and
    `cancelled` while running. A problem's result waits until it is `settled`
    (everything sent is back), so its usage holds the cancelled samples' tokens."""

    def __init__(self, ids: Sequence[str]):
        self.sent = dict.fromkeys(ids, 0)
        self.back = dict.fromkeys(ids, 0)
        self.drawn = dict.fromkeys(ids, 0)
        self.cancelled = dict.fromkeys(ids, 0)

    def send(self, pid: str, count: int) -> None:
        self.sent[pid] += count

    def receive(self, pid: str, c: Completion) -> None:
        self.back[pid] += 1
        ran = c.finish_reason != "cancelled" or c.completion_tokens > 0
        self.drawn[pid] += ran
        self.cancelled[pid] += ran and c.finish_reason == "cancelled"

    def settled(self, pid: str) -> bool:
        return self.back[pid] == self.sent[pid]


def _usage_of(prm: RewardModel) -> Usage:
    u = getattr(prm, "usage", None)
    return Usage.from_dict(u.to_dict()) if u is not None else Usage()
