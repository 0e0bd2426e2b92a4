"""Step-wise generation shared by the search strategies: paths, expansion, scoring.

A solution grows one step at a time: a step is what the model writes up to the
delimiter. Each parent path asks for its children in one request (they share
the parent's prefix, and `retain=True` lets the embedded engine keep each new
step's KV cache, so continuing a path never prefills it again); every problem's
requests go to the engine together, so it sees one large batch.

A path also keeps each step's per-token statistics when the engine recorded them
(`testtime.confidence`), so a reward model that scores from them (`confidence`)
scores partial solutions as search builds them, at no cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from ..confidence import from_logprobs
from ..engines.base import Request
from ..errors import InputError
from ..rewards.base import Scoring
from ..select import aggregate
from ..spec import SamplingParams, sample_seed
from ..tasks.base import Problem
from .base import Candidate, Meter, SearchContext, SpecError, StepParams


@dataclass(frozen=True)
class SteppedParams(StepParams):
    """Parameters of the strategies that grow solutions a step at a time."""

    max_steps: int = 8
    """Most steps per solution; at the last one every path is finished as it stands."""
    step_tokens: int = 64
    """Most tokens per step."""

    def check(self) -> None:
        super().check()
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise SpecError(f"max_steps must be an integer >= 1, got {self.max_steps!r}")
        if not isinstance(self.step_tokens, int) or self.step_tokens < 1:
            raise SpecError(f"step_tokens must be an integer >= 1, got {self.step_tokens!r}")


@dataclass
class Path:
    """A partial or finished solution: its steps and the reward model's score of each."""

    steps: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""
    tokens: int = 0
    """Tokens generated along this path (its own steps only)."""
    rank: float | None = None
    """What the search ranks the path by (lookahead: its rollout's score)."""
    seed: int = 0
    """The seed of its first step."""
    prompt_tokens: int = 0
    stats: list = field(default_factory=list)
    """Per-token statistics of each step (None where the engine recorded none)."""

    def text(self, delimiter: str) -> str:
        return delimiter.join(self.steps)

    def child(self, step: str, tokens: int, finished: bool, reason: str, seed: int, prompt_tokens: int,
              stats=None) -> "Path":
        kept = bool(step.strip())
        return Path(self.steps + [step] if kept else list(self.steps), list(self.scores), finished, reason,
                    self.tokens + tokens, seed=self.seed if self.steps else seed,
                    prompt_tokens=self.prompt_tokens or prompt_tokens,
                    stats=self.stats + [stats] if kept else list(self.stats))

    def copy(self) -> "Path":
        """The same path as a new object (its own rank; the lists are not shared)."""
        return Path(list(self.steps), list(self.scores), self.finished, self.finish_reason, self.tokens, None,
                    self.seed, self.prompt_tokens, list(self.stats))

    def candidate(self, delimiter: str) -> Candidate:
        return Candidate(self.text(delimiter), self.seed, self.tokens, self.finish_reason, self.prompt_tokens,
                         tuple(self.steps), tuple(self.scores))


def request(key, problem: Problem, path: Path, ctx: SearchContext, params: SamplingParams,
            seeds: tuple[int, ...], delimiter: str, final: bool) -> Request:
    """Continue a path: the chat, then the steps so far as the assistant's partial answer."""
    stop = params.stop if final else tuple(dict.fromkeys((delimiter,) + params.stop))
    return Request(key=key, seeds=seeds, params=replace(params, stop=stop), retain=not final,
                   **ctx.prefix(problem, "".join(s + delimiter for s in path.steps)))


def expand(ctx: SearchContext, meter: Meter, problems: dict[str, Problem], parents: list[tuple[str, Path, int]],
           params: SamplingParams, delimiter: str, it: int, final: bool, seed: int | None = None
           ) -> list[tuple[str, Path, int]]:
    """One generation round: parents (problem id, path, children wanted) to children
    (problem id, child, index of its parent), in a stable order."""
    seed = ctx.seed if seed is None else seed
    # a parent's seeds come from its problem and its place among that problem's parents, never
    # from the batch, so a problem searches the same whichever problems share its batch
    ordinal: dict[str, int] = {}
    requests = []
    for i, (pid, path, count) in enumerate(parents):
        k = ordinal[pid] = ordinal.get(pid, -1) + 1
        requests.append(request((pid, i), problems[pid], path, ctx, params,
                                tuple(sample_seed(seed, f"{pid}/{it}/{k}", j) for j in range(count)), delimiter,
                                final))
    children = []
    for c in ctx.engine.generate(requests):
        pid, i = c.key
        step_done = c.stop_hit == delimiter
        stats = c.token_stats if c.token_stats is not None else from_logprobs(c.logprobs or ())
        child = parents[i][1].child(c.text, c.completion_tokens, not step_done, c.finish_reason, c.seed,
                                    c.prompt_tokens, stats)
        children.append((pid, child, i, c.index))
        meter.completion(pid, c)
    children.sort(key=lambda t: (t[2], t[3]))  # whatever order the engine finished in
    return [(pid, child, i) for pid, child, i, _ in children]


def score(meter: Meter, problems: dict[str, Problem], paths: Sequence[tuple[str, Path]]) -> int:
    """Score the steps each path has no score for yet; returns how many were scored."""
    todo = [(pid, p) for pid, p in paths if len(p.scores) < len(p.steps)]
    if hasattr(meter.prm, "score_stats"):
        return _score_from_stats(meter.prm, todo)
    items = [(pid, Scoring(problems[pid].question, tuple(p.steps), len(p.scores))) for pid, p in todo]
    scored = 0
    for (_, p), new in zip(todo, meter.score(items)):
        p.scores.extend(new)
        scored += len(new)
    return scored


def _score_from_stats(prm, todo: Sequence[tuple[str, Path]]) -> int:
    """Scores from the tokens' own statistics: step k's score is the confidence of the
    partial solution up to and including it (the same measure a whole sample gets)."""
    scored = 0
    for _, p in todo:
        for k in range(len(p.scores), len(p.steps)):
            if any(s is None for s in p.stats[:k + 1]):
                raise InputError(f"the {prm.name} reward model scores steps from the token statistics the engine "
                                 "records, and this engine returned none for a step (the llamacpp engine records "
                                 "them; a server, only when asked for top log-probabilities)")
            parts = [s for s in p.stats[:k + 1] if len(s)]
            value = prm.score_stats(np.concatenate(parts)) if parts else None
            p.scores.append(0.0 if value is None else value)
            scored += 1
    return scored


def rank(paths: Sequence[Path], aggregation: str) -> None:
    for p in paths:
        if p.rank is None:
            p.rank = aggregate(p.scores, aggregation)


def step_sampling(ctx: SearchContext, step_tokens: int) -> SamplingParams:
    """The context's sampler with at most `step_tokens` per step."""
    return replace(ctx.sampling, max_tokens=step_tokens)
