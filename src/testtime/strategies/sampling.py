"""Repeated sampling: N independent samples per problem (Large Language Monkeys).

The samples are independent, so a run of them is extendable: asking for more
draws only the missing ones, with seeds that continue the sequence, and N is
not part of the run's identity (`independent = True`; the runner draws them one
by one into the store, `runner.draw_samples`). Selections over such a run
(majority vote, best-of-N with a reward model's step scores) are computed from
the stored samples, unbiased at every k <= N (`metrics.selection_at_k`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from ..engines.base import Request
from ..rewards.base import split_steps
from ..spec import sample_seed
from ..tasks.base import Problem
from .base import STRATEGIES, Candidate, Meter, ProblemResult, SearchContext, StepParams
from .revision import score_candidates


@dataclass(frozen=True)
class RepeatedParams(StepParams):
    """N samples; `delimiter` and `aggregation` matter only when a reward model scores them."""


@STRATEGIES.register("repeated_sampling")
class RepeatedSampling:
    name = "repeated_sampling"
    Params = RepeatedParams
    needs_prm = False
    independent = True
    selection = "weighted"

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: RepeatedParams) -> Iterator[ProblemResult]:
        by_id = {p.id: p for p in problems}
        meter = Meter(ctx.prm)
        requests = [Request(key=p.id, seeds=tuple(sample_seed(ctx.seed, p.id, i) for i in range(params.n)),
                            params=ctx.sampling, **ctx.prefix(p))
                    for p in problems]
        got: dict[str, list[tuple[int, Candidate]]] = {p.id: [] for p in problems}
        for c in ctx.engine.generate(requests):
            got[c.key].append((c.index, Candidate(c.text, c.seed, c.completion_tokens, c.finish_reason,
                                                  c.prompt_tokens, tuple(split_steps(c.text, params.delimiter)))))
            meter.completion(c.key, c)
        done = {pid: [cand for _, cand in sorted(v, key=lambda t: t[0])] for pid, v in got.items()}
        score_candidates(meter, by_id, done)
        for p in problems:
            yield ProblemResult(p.id, done[p.id], meter.of(p.id))
