"""Sequential revisions (the compute-optimal scaling paper's revision model, here
by prompting): N / S chains of S attempts. In each round every chain's latest
attempt is shown back to the model, which writes a revised one; all chains of
all problems advance together, one engine call per round. Every attempt is a
candidate (a chain's later attempts first), scored by the reward model when
there is one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from ..engines.base import Request
from ..rewards.base import Scoring, split_steps
from ..spec import sample_seed
from ..tasks.base import Problem
from .base import STRATEGIES, Candidate, Meter, ProblemResult, SearchContext, SpecError, StepParams

REVISE = ("Check your solution above step by step. If a step is wrong, correct it. "
          "Then write the whole solution again and end with the final answer.")


@dataclass(frozen=True)
class RevisionParams(StepParams):
    sequential: int = 2
    """S: attempts per chain (the first and S-1 revisions); N / S chains run in parallel.
    1 is plain parallel sampling, N one long chain."""
    instruction: str = REVISE
    """The user turn that asks for a revision of the attempt shown before it."""

    def check(self) -> None:
        super().check()
        if not isinstance(self.sequential, int) or self.sequential < 1 or self.n % self.sequential:
            raise SpecError(f"sequential must be an integer >= 1 that divides n, got sequential={self.sequential!r}, "
                            f"n={self.n}")
        if not self.instruction.strip():
            raise SpecError("instruction must not be empty")


@STRATEGIES.register("revision")
class Revision:
    name = "revision"
    Params = RevisionParams
    needs_prm = False

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: RevisionParams) -> Iterator[ProblemResult]:
        by_id = {p.id: p for p in problems}
        meter = Meter(ctx.prm)
        chains = params.n // params.sequential
        history: dict[tuple[str, int], list[Candidate]] = {(p.id, c): [] for p in problems for c in range(chains)}
        for rnd in range(params.sequential):
            requests = []
            for (pid, c), attempts in history.items():
                msgs = list(ctx.messages(by_id[pid]))
                if attempts:
                    msgs += [{"role": "assistant", "content": attempts[-1].text},
                             {"role": "user", "content": params.instruction}]
                requests.append(Request(key=(pid, c), seeds=(sample_seed(ctx.seed, f"{pid}/rev{rnd}", c),),
                                        params=ctx.sampling, messages=tuple(msgs),
                                        continuation=ctx.continuation(by_id[pid])))
            for comp in ctx.engine.generate(requests):
                pid, _ = comp.key
                history[comp.key].append(Candidate(comp.text, comp.seed, comp.completion_tokens, comp.finish_reason,
                                                   comp.prompt_tokens, tuple(split_steps(comp.text, params.delimiter))))
                meter.completion(pid, comp)
        done: dict[str, list[Candidate]] = {p.id: [] for p in problems}
        for (pid, _), attempts in sorted(history.items()):
            done[pid] += attempts[::-1]
        score_candidates(meter, by_id, done)
        for p in problems:
            yield ProblemResult(p.id, done[p.id], meter.of(p.id))


def score_candidates(meter: Meter, by_id: dict[str, Problem], done: dict[str, list[Candidate]]) -> None:
    """Score every step of finished candidates (nothing without a reward model)."""
    if meter.prm is None:
        return
    flat = [(pid, c) for pid, cands in done.items() for c in cands if c.steps]
    scores = meter.score([(pid, Scoring(by_id[pid].question, c.steps)) for pid, c in flat])
    for (_, c), s in zip(flat, scores):
        c.scores = tuple(s)
