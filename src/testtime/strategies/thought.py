"""Thought, then response, in two phases: TPO's output format made reliable for models
too small to follow it (`testtime.tpo`).

Thought Preference Optimization asks the model to write private thoughts, then a
marker line, then the response the user sees, and discards outputs that break the
format. A small model rarely writes the marker (SmolLM2-135M wrote it in none of 12
outputs), so sampling alone leaves nothing to judge. This strategy writes the format
itself:

1. the thought: sampled from the prompt until the model writes the marker itself,
   ends its text, or has written `thought_tokens` tokens;
2. the response: the marker line is appended to the thought and generation goes on
   from there (`Request.continuation`), up to the run's `max_tokens`, or until the
   model writes the marker again (small models loop), so every output has one.

Each sample's response request joins the engine's stream the moment its thought is
back, so the batch stays full; the thought is retained (`Request.retain`), so an
engine with a prefix cache computes only the marker line before the response.

Sample i's thought has the seed repeated sampling gives it; its response a seed of
its own. The stored text is thought, marker line, response, as `split_thought`
reads it; its tokens are both phases'. Each problem's decision records how many
thoughts ended with the model's own marker, at its end of text, or at the limit.
Served (`testtime serve`, model `thought_response@N`), the reply is the response
and the thought goes in `reasoning`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

from ..engines.base import Completion, Request
from ..prompts import RESPONSE_MARKER
from ..spec import SpecError, sample_seed
from ..tasks.base import Problem
from ..verifiers.response import split_thought
from .base import STRATEGIES, Candidate, Meter, ProblemResult, SearchContext, StrategyParams


@dataclass(frozen=True)
class ThoughtParams(StrategyParams):
    """n outputs per instruction, each a thought then a response."""

    thought_tokens: int = 256
    """The most tokens of thought; the response then gets the run's max_tokens."""

    def check(self) -> None:
        if not isinstance(self.thought_tokens, int) or self.thought_tokens < 1:
            raise SpecError(f"thought_tokens must be an integer >= 1, got {self.thought_tokens!r}")


def join_thought(thought: str, response: str) -> str:
    """The stored output: the thought, the marker on a line of its own, the response."""
    thought = thought.rstrip()
    return (thought + "\n" if thought else "") + RESPONSE_MARKER + "\n" + response


def ending(c: Completion) -> str:
    """How a thought ended: the model's own marker, its end of text, or the limit."""
    if c.stop_hit == RESPONSE_MARKER:
        return "marker"
    return "length" if c.finish_reason == "length" else "end_of_text"


@STRATEGIES.register("thought_response")
class ThoughtResponse:
    name = "thought_response"
    Params = ThoughtParams
    needs_prm = False
    selection = "vote"

    @staticmethod
    def reply(text: str) -> tuple[str, str | None]:
        """(what the user sees, the thought): `serve` answers with the response and puts
        the thought in the message's `reasoning` field, as vLLM's reasoning parsers do."""
        thought, response = split_thought(text)
        return response or "", thought or None

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: ThoughtParams) -> Iterator[ProblemResult]:
        by_id = {p.id: p for p in problems}
        meter = Meter(None)
        # a thought ends where the model writes the marker; a response where it would
        # begin another (small models loop), so every output has exactly one marker
        stop = tuple(ctx.sampling.stop) + (RESPONSE_MARKER,)
        think = replace(ctx.sampling, max_tokens=params.thought_tokens, stop=stop)
        answer = replace(ctx.sampling, stop=stop)
        thoughts: dict[tuple[str, int], Completion] = {}
        ready: list[Request] = []          # responses whose thought is back
        out: dict[str, dict[int, Candidate]] = {p.id: {} for p in problems}
        endings: dict[str, dict[str, int]] = {p.id: {} for p in problems}
        pending = len(problems) * params.n  # thoughts not yet back

        def stream() -> Iterator[Request | None]:
            for p in problems:
                yield Request(key=("thought", p.id), params=think, retain=True, **ctx.prefix(p),
                              seeds=tuple(sample_seed(ctx.seed, p.id, i) for i in range(params.n)))
            while pending or ready:
                if ready:
                    yield ready.pop(0)
                else:
                    yield None  # every remaining thought is still being written

        for c in ctx.engine.generate(stream()):
            phase, pid = c.key[0], c.key[1]
            meter.completion(pid, c)
            if c.finish_reason == "cancelled":
                raise SpecError(f"thought_response: the engine cancelled a sample of {pid} that nobody cancelled")
            if phase == "thought":
                pending -= 1
                thoughts[pid, c.index] = c
                e = ending(c)
                endings[pid][e] = endings[pid].get(e, 0) + 1
                ready.append(Request(key=("response", pid, c.index),
                                     seeds=(sample_seed(ctx.seed, f"{pid}/response", c.index),),
                                     params=answer, **ctx.prefix(by_id[pid], join_thought(c.text, ""))))
                continue
            i = c.key[2]
            t = thoughts.pop((pid, i))
            out[pid][i] = Candidate(join_thought(t.text, c.text), t.seed, t.completion_tokens + c.completion_tokens,
                                    c.finish_reason, t.prompt_tokens)
            if len(out[pid]) == params.n:
                yield ProblemResult(pid, [out[pid][j] for j in range(params.n)], meter.of(pid),
                                    {"thought_ended": dict(sorted(endings[pid].items())),
                                     "thought_tokens": params.thought_tokens})
