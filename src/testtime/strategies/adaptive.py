"""Adaptive consistency, live: sample each problem only until its vote is decided.

The engine gets one lazy stream of requests, `round` samples of one problem each,
interleaved across the problems still undecided (round 1 of every problem, then
round 2, ...). The engine reads the stream as it has room, so its batch stays full
of problems that still need samples. With `max_ahead`, a problem has at most that
many samples out at once (sent, and not yet among its votes in sample order); the
stream says "wait" when every undecided problem with samples left to send is at its
limit.

After each completion the problem's votes, in sample order (the longest run of
finished samples from sample 0), are checked by the stopping rule
(`testtime.adaptive`: Adaptive-Consistency's Beta criterion, or early-stopping
self-consistency's window, either with an optional futility boundary), each
prefix once. Once it fires, or the budget n is reached, the problem is decided at
m samples: its result is yielded at once, its requests still in the stream are
never sent, and its samples still running are cancelled (`Request.cancelled`; the
embedded engine stops them at the next step and gives their slots to waiting work).
Their tokens up to that point are in the problem's usage; they do not vote.

Sample i of problem p has the seed repeated sampling gives it and the kept samples
are 0..m-1, so the samples kept are exactly those `testtime adaptive` replays on a
repeated-sampling run with the same seed, whatever `round` and however the engine
schedules (tested). `round` and `max_ahead` only set how far ahead of its votes a
problem is sampled, which trades tokens for time: samples out when a problem is
decided are cancelled part-way (or, if finished, were drawn for nothing). With no
limit the engine keeps its whole queue full (the llama.cpp engine holds three times
its slots), so once few problems are undecided, each has many samples out; a limit
spends fewer tokens past each stop and leaves slots idle once fewer than
slots / `max_ahead` problems are undecided.

The answer is the majority of the kept samples (`selection = "vote"`); each
problem's decision records where it stopped, how many samples were started and
how many were cancelled.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ..adaptive import RULES, StopRule
from ..engines.base import Request
from ..select import AnswerKeys
from ..spec import SpecError, sample_seed
from ..tasks.base import Problem
from ..verifiers.math_answer import problem_rules
from .base import STRATEGIES, Candidate, Ledger, Meter, ProblemResult, SearchContext, StrategyParams


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
    futility: float = 0.0
    """Also stop once the leading answer's share is surely below this (0: off; see
    `testtime.adaptive`)."""
    futility_prob: float = 0.1
    """futility: the posterior probability left above `futility` that counts as sure."""
    round: int = 2
    """Samples per request in the stream: how far ahead of its votes a problem is sampled
    (the samples kept do not depend on it; the tokens spent past the stop do)."""
    max_ahead: int = 0
    """Most samples of one problem out at once, sent and not yet among its votes in
    sample order (0: no limit; else at least `round`)."""

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if not self.max_ahead:  # no limit: the same run (and run id) as before the setting existed
            del d["max_ahead"]
        return d

    def check(self) -> None:
        if self.rule not in RULES:
            raise SpecError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if not isinstance(self.round, int) or self.round < 1:
            raise SpecError(f"round must be an integer >= 1, got {self.round!r}")
        if not isinstance(self.max_ahead, int) or self.max_ahead < 0 or 0 < self.max_ahead < self.round:
            raise SpecError(f"max_ahead must be 0 (no limit) or an integer >= round ({self.round}), "
                            f"got {self.max_ahead!r}")
        try:
            self.stop_rule()
        except ValueError as e:
            raise SpecError(str(e)) from None

    def stop_rule(self) -> StopRule:
        return StopRule(self.rule, float(self.threshold), int(self.window), int(self.min_samples),
                        float(self.futility), float(self.futility_prob))


@STRATEGIES.register("adaptive_consistency")
class AdaptiveConsistency:
    name = "adaptive_consistency"
    Params = AdaptiveParams
    needs_prm = False
    selection = "vote"

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: AdaptiveParams) -> Iterator[ProblemResult]:
        rule, keys, meter = params.stop_rule(), AnswerKeys(), Meter(None)
        by_id = {p.id: p for p in problems}
        answers: dict[str, dict[int, tuple[Candidate, str | None]]] = {p.id: {} for p in problems}
        ledger = Ledger([p.id for p in problems])
        decided: dict[str, int] = {}            # problem -> samples kept
        reported: set[str] = set()

        sent = {p.id: 0 for p in problems}     # samples 0..sent-1 are in the stream
        votes: dict[str, list[str | None]] = {p.id: [] for p in problems}  # samples 0.. back, in order
        # the problems that may be sent more, earliest round first, ties in problem order;
        # a problem at its max_ahead is parked until one of its samples comes back
        queue = [(0, k, p.id) for k, p in enumerate(problems)]
        parked: dict[str, int] = {}
        # problems with a sample cancelled from outside (a client gone): sent nothing more,
        # decided only if the samples before the gap settle them
        lost: set[str] = set()

        def fits(pid: str) -> bool:
            size = min(params.round, params.n - sent[pid])
            return not params.max_ahead or sent[pid] - len(votes[pid]) + size <= params.max_ahead

        def stream() -> Iterator[Request | None]:
            while True:
                while queue and (queue[0][2] in decided or queue[0][2] in lost or not fits(queue[0][2])):
                    _, k, pid = heapq.heappop(queue)
                    if pid not in decided and pid not in lost:
                        parked[pid] = k
                if not queue:
                    if not parked:
                        return
                    yield None  # every undecided problem has its most samples out: wait for one
                    continue
                _, k, pid = heapq.heappop(queue)
                first = sent[pid]
                idx = tuple(range(first, min(params.n, first + params.round)))
                sent[pid] += len(idx)
                if sent[pid] < params.n:
                    heapq.heappush(queue, (sent[pid], k, pid))
                ledger.send(pid, len(idx))
                yield Request(key=(pid, idx), seeds=tuple(sample_seed(ctx.seed, pid, i) for i in idx),
                              params=ctx.sampling, **ctx.prefix(by_id[pid]),
                              cancelled=lambda pid=pid: pid in decided)

        def result(pid: str) -> ProblemResult:
            """A decided problem's result, once every sample it was sent has come back
            (so its usage holds the tokens of the samples cancelled past its stop)."""
            reported.add(pid)
            m = decided[pid]
            return ProblemResult(pid, [answers[pid][j][0] for j in range(m)], meter.of(pid),
                                 {"stopped_at": m, "drawn": ledger.drawn[pid], "cancelled": ledger.cancelled[pid],
                                  "budget": params.n})

        for c in ctx.engine.generate(stream()):
            pid, idx = c.key
            meter.completion(pid, c)
            ledger.receive(pid, c)
            if pid not in decided and c.finish_reason != "cancelled":
                i = idx[c.index]
                answers[pid][i] = (Candidate(c.text, c.seed, c.completion_tokens, c.finish_reason, c.prompt_tokens),
                                   keys.of_text(c.text, problem_rules(by_id[pid].meta)))
                have, before = votes[pid], len(votes[pid])
                while len(have) in answers[pid]:
                    have.append(answers[pid][len(have)][1])
                # the prefixes up to `before` did not stop it: check each new one once
                m = next((k for k in range(before + 1, len(have) + 1) if rule.decided(have[:k])), None)
                if m is None and len(have) >= params.n:
                    m = params.n
                if m is not None:
                    decided[pid] = m
                    parked.pop(pid, None)
                elif pid in parked:  # a sample of it came back: it may be sent more
                    heapq.heappush(queue, (sent[pid], parked.pop(pid), pid))
            elif pid not in decided:  # its votes can never pass this sample: send it nothing more
                lost.add(pid)
                parked.pop(pid, None)
            if pid in decided and pid not in reported and ledger.settled(pid):
                yield result(pid)
        for p in problems:  # an engine that ignores cancellation returned everything by now
            if p.id in decided and p.id not in reported:
                yield result(p.id)
