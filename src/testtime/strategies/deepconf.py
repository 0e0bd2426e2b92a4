"""DeepConf online (Fu et al. 2025, "Deep Think with Confidence"): stop samples whose
confidence drops, and stop the problem once its confident votes agree.

Per problem:

1. Warm-up: `warmup` samples run to the end. Each one's lowest group confidence
   (the least confident window of `window` tokens, `testtime.confidence`) is
   measured, and the stopping threshold set so that a fraction `eta` of such
   traces would pass it (the (1 - eta) quantile; DeepConf-low keeps 10%,
   DeepConf-high 90%).
2. Then requests of `round` samples, each ended by the engine the moment the mean
   confidence of its last `window` tokens falls below the threshold (finish reason
   "low_confidence"; the slot goes to waiting work at once). Until the budget n is
   spent, or the leading answer holds a share `consensus` of the
   confidence-weighted votes; then the problem's samples still queued or running
   are cancelled (`Request.cancelled`), and its result is yielded once they are back.

All problems share one lazy request stream: a problem's post-warm-up requests
enter it as soon as its own warm-up is in (while other problems are still warming
up), so the engine's batch stays full; the stream says "wait" (None) only when
every open problem is still warming up.

Samples ended early or cancelled do not vote and are not kept; their tokens are
counted in the problem's usage. The answer is the confidence-weighted majority of
the kept samples: each candidate carries its lowest group confidence as its one
score, so the weighted selection applies. Needs an engine that can stop a sample
on confidence: the llama.cpp engine (from the full distribution, at the token),
or the OpenAI engine, which streams such a sample with the top 20
log-probabilities of every token and drops the connection once its confidence
falls (vLLM aborts a request whose client went away; its default
--max-logprobs is 20).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np

from ..confidence import TOP_K, WINDOW, from_logprobs, trace_score
from ..engines.base import Request
from ..select import AnswerKeys
from ..spec import SpecError, sample_seed
from ..tasks.base import Problem
from ..verifiers.math_answer import problem_rules
from .base import STRATEGIES, Candidate, Ledger, Meter, ProblemResult, SearchContext, StrategyParams


@dataclass(frozen=True)
class DeepConfParams(StrategyParams):
    """The budget n is the most samples a problem gets, warm-up included."""

    warmup: int = 4
    """Samples per problem that run to the end and set the threshold."""
    eta: float = 0.9
    """The share of warm-up traces that would pass the threshold (0.1: DeepConf-low, 0.9: high)."""
    window: int = WINDOW
    """Tokens per confidence group."""
    consensus: float = 0.95
    """Stop the problem once the leading answer holds this share of the weighted votes."""
    round: int = 2
    """Samples per request after the warm-up (how far ahead of its votes a problem is sampled)."""

    def check(self) -> None:
        if not isinstance(self.warmup, int) or not 1 <= self.warmup <= self.n:
            raise SpecError(f"warmup must be an integer in 1..n={self.n}, got {self.warmup!r}")
        if not 0 < float(self.eta) <= 1:
            raise SpecError(f"eta must be in (0, 1], got {self.eta!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise SpecError(f"window must be an integer >= 1, got {self.window!r}")
        if not 0.5 < float(self.consensus) <= 1:
            raise SpecError(f"consensus must be in (0.5, 1], got {self.consensus!r}")
        if not isinstance(self.round, int) or self.round < 1:
            raise SpecError(f"round must be an integer >= 1, got {self.round!r}")


@STRATEGIES.register("deepconf_online")
class DeepConfOnline:
    name = "deepconf_online"
    Params = DeepConfParams
    needs_prm = False
    selection = "weighted"
    scorer = "confidence:lowest_group"
    """The name its candidates' own scores are stored under."""
    needs_engine = "stops_on_confidence"
    """The engine capability it needs (`serve` refuses a request up front without it)."""

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: DeepConfParams) -> Iterator[ProblemResult]:
        if not getattr(ctx.engine, "stops_on_confidence", False) or not getattr(ctx.engine, "token_stats", True):
            name = getattr(ctx.engine, "name", "this engine")
            raise SpecError(f"deepconf_online needs an engine that sees the logits and stops samples on confidence "
                            f"(llamacpp with token_stats on, or an OpenAI-compatible server); {name} does not")
        keys, meter = AnswerKeys(), Meter(None)
        # an engine that does not compute the statistics itself (a server) is asked for
        # every token's top log-probabilities, and the statistics come from those
        native = getattr(ctx.engine, "token_stats", False) is True
        sampling = ctx.sampling if native or (ctx.sampling.logprobs or 0) >= TOP_K \
            else replace(ctx.sampling, logprobs=TOP_K)
        by_id = {p.id: p for p in problems}
        kept: dict[str, list[tuple[int, Candidate, str | None]]] = {p.id: [] for p in problems}
        ledger = Ledger([p.id for p in problems])
        stopped_early = {p.id: 0 for p in problems}
        threshold: dict[str, float] = {}
        done: set[str] = set()
        reported: set[str] = set()

        def request(p: Problem, count: int, stop: tuple[float, int] | None) -> Request:
            idx = range(ledger.sent[p.id], ledger.sent[p.id] + count)
            ledger.send(p.id, len(idx))
            return Request(key=(p.id, tuple(idx)), seeds=tuple(sample_seed(ctx.seed, p.id, i) for i in idx),
                           params=sampling, **ctx.prefix(p),
                           stop_below=stop, cancelled=lambda pid=p.id: pid in done)

        def stream() -> Iterator[Request | None]:
            for p in problems:
                yield request(p, params.warmup, None)
            while True:
                open_ = [p for p in problems if p.id not in done and ledger.sent[p.id] < params.n]
                if not open_:
                    return
                ready = [p for p in open_ if p.id in threshold]
                if not ready:
                    yield None  # every open problem is warming up
                    continue
                for p in ready:
                    if p.id not in done and ledger.sent[p.id] < params.n:
                        yield request(p, min(params.round, params.n - ledger.sent[p.id]),
                                      (threshold[p.id], params.window))

        def result(pid: str) -> ProblemResult:
            reported.add(pid)
            cands = [cand for _, cand, _ in sorted(kept[pid], key=lambda t: t[0])]
            return ProblemResult(pid, cands, meter.of(pid),
                                 {"threshold": threshold.get(pid), "drawn": ledger.drawn[pid], "kept": len(cands),
                                  "stopped_early": stopped_early[pid], "cancelled": ledger.cancelled[pid],
                                  "budget": params.n})

        for c in ctx.engine.generate(stream()):
            pid, idx = c.key
            meter.completion(pid, c)
            ledger.receive(pid, c)
            if c.finish_reason == "low_confidence":
                stopped_early[pid] += 1
            elif c.finish_reason != "cancelled" and pid not in done:
                stats = c.token_stats if c.token_stats is not None else from_logprobs(c.logprobs or ())
                if stats is None:
                    raise SpecError("deepconf_online: the engine returned no token statistics")
                conf = trace_score(stats, "lowest_group", params.window)
                cand = Candidate(c.text, c.seed, c.completion_tokens, c.finish_reason, c.prompt_tokens,
                                 steps=(c.text,), scores=(max(conf, 0.0),))
                kept[pid].append((idx[c.index], cand, keys.of_text(c.text, problem_rules(by_id[pid].meta))))
            if pid not in threshold and ledger.back[pid] >= params.warmup:  # the warm-up is in: set the bar
                confs = [cand.scores[0] for _, cand, _ in kept[pid]]
                threshold[pid] = float(np.quantile(confs, 1 - params.eta)) if confs else 0.0
            if pid not in done and pid in threshold and (
                    self._agreed(kept[pid], params.consensus) or ledger.back[pid] >= params.n):
                done.add(pid)
            if pid in done and pid not in reported and ledger.settled(pid):
                yield result(pid)
        for p in problems:
            if p.id not in reported:
                yield result(p.id)

    @staticmethod
    def _agreed(kept: list[tuple[int, Candidate, str | None]], consensus: float) -> bool:
        """Whether the leading answer holds `consensus` of the confidence-weighted votes."""
        totals: dict[str, float] = {}
        for _, cand, key in kept:
            if key is not None:
                totals[key] = totals.get(key, 0.0) + cand.scores[0]
        whole = sum(totals.values())
        return whole > 0 and max(totals.values()) / whole >= consensus
