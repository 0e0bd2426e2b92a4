"""Adaptive consistency, live: sample each problem only until its vote is decided.

Samples are drawn in rounds. Each round asks the engine, in one call, for `round`
more samples of every problem still undecided, so the batch is filled with the
problems that still need samples and a decided problem frees its slots for them.
After each round a problem's votes are checked by the stopping rule
(`testtime.adaptive`: Adaptive-Consistency's Beta criterion, or early-stopping
self-consistency's window) and it stops at the first sample where the rule fires,
or at the budget n. Sample i of problem p has the seed repeated sampling gives it,
so with `round = 1` the samples kept are exactly those `testtime adaptive` replays
on a repeated-sampling run with the same seed (tested); a larger round trades a
few samples past the stopping point (drawn, counted in usage, not kept) for
fuller batches.

The answer is the majority of the kept samples (`selection = "vote"`); each
problem's decision records where it stopped and how many samples were drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from ..adaptive import RULES, StopRule, stop_point
from ..engines.base import Request
from ..select import AnswerKeys
from ..spec import SpecError, sample_seed
from ..tasks.base import Problem
from ..verifiers.math_answer import problem_rules
from .base import STRATEGIES, Candidate, Meter, ProblemResult, SearchContext, StrategyParams


@dataclass(frozen=True)
class AdaptiveParams(StrategyParams):
    """The budget n is the most samples a problem gets."""

    rule: str = "beta"
    """beta (Adaptive-Consistency) or window (early-stopping self-consistency)."""
    threshold: float = 0.95
    """beta: the posterior probability of the leading answer that stops sampling."""
    window: int = 4
    """window: samples per window; the problem stops after a window whose answers agree."""
    min_samples: int = 2
    """Never stop before this many samples."""
    round: int = 2
    """Samples per undecided problem per engine call (1: stop exactly where the rule fires)."""

    def check(self) -> None:
        if self.rule not in RULES:
            raise SpecError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if not isinstance(self.round, int) or self.round < 1:
            raise SpecError(f"round must be an integer >= 1, got {self.round!r}")
        try:
            self.stop_rule()
        except ValueError as e:
            raise SpecError(str(e)) from None

    def stop_rule(self) -> StopRule:
        return StopRule(self.rule, float(self.threshold), int(self.window), int(self.min_samples))


@STRATEGIES.register("adaptive_consistency")
class AdaptiveConsistency:
    name = "adaptive_consistency"
    Params = AdaptiveParams
    needs_prm = False
    selection = "vote"

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: AdaptiveParams) -> Iterator[ProblemResult]:
        rule, keys, meter = params.stop_rule(), AnswerKeys(), Meter(None)
        got: dict[str, dict[int, Candidate]] = {p.id: {} for p in problems}
        answers: dict[str, dict[int, str | None]] = {p.id: {} for p in problems}
        stopped: dict[str, int] = {}
        by_id = {p.id: p for p in problems}
        while len(stopped) < len(problems):
            requests = []
            for p in problems:
                if p.id in stopped:
                    continue
                have = len(got[p.id])
                idx = range(have, min(params.n, have + params.round))
                requests.append(Request(key=(p.id, tuple(idx)), seeds=tuple(sample_seed(ctx.seed, p.id, i) for i in idx),
                                        params=ctx.sampling, messages=ctx.messages(p), continuation=ctx.continuation(p)))
            for c in ctx.engine.generate(requests):
                pid, idx = c.key
                i = idx[c.index]
                got[pid][i] = Candidate(c.text, c.seed, c.completion_tokens, c.finish_reason, c.prompt_tokens)
                answers[pid][i] = keys.of_text(c.text, problem_rules(by_id[pid].meta))
                meter.completion(pid, c)
            for p in problems:
                if p.id in stopped:
                    continue
                votes = [answers[p.id][i] for i in range(len(got[p.id]))]
                m = stop_point(votes, rule, params.n)
                if m < len(votes) or rule.decided(votes) or len(votes) >= params.n:
                    stopped[p.id] = m
                    yield ProblemResult(p.id, [got[p.id][i] for i in range(m)], meter.of(p.id),
                                        {"stopped_at": m, "drawn": len(votes), "budget": params.n})
