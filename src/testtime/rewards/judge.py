"""A process reward model made from any engine: ask, step by step, "is this step
correct?" and read P(yes) from the next token's log-probabilities.

The prompt lists the problem and the steps so far with the step to judge last,
so the judgements of steps 1..k of one solution share every token up to step k:
an engine with a prefix cache (the embedded one) computes each step once.

The score is P(yes) / (P(yes) + P(no)) over the top log-probabilities of the
first answer token, where a token counts as yes/no when its text, stripped and
lower-cased, is "yes"/"no". When neither appears in the top alternatives the
score is 0.5: the judge has no opinion.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..engines.base import Engine, Request
from ..flops import Usage
from ..spec import SamplingParams, stable_hash
from .base import REWARD_MODELS, Scoring

JUDGE_SYSTEM = "You are a strict math teacher. You check one step of a student's solution at a time."
JUDGE_USER = ("Problem:\n{question}\n\nThe student's steps so far:\n\n{steps}\n\n"
              "Is the last step above correct? Answer Yes or No.")


@REWARD_MODELS.register("judge")
class JudgePRM:
    name = "judge"

    def __init__(self, engine: Engine, top_logprobs: int = 20, system: str = JUDGE_SYSTEM, user: str = JUDGE_USER,
                 good: tuple[str, ...] = ("yes",), bad: tuple[str, ...] = ("no",)):
        """good/bad: answer-token texts (stripped, lower-cased) meaning a correct or a
        wrong step; ("+",) and ("-",) for PRMs trained that way (RLHFlow's)."""
        self.engine = engine
        self.top = top_logprobs
        self.system, self.user = system, user
        self.good, self.bad = tuple(good), tuple(bad)
        self.params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=top_logprobs)
        self.usage = Usage()
        """Every token the judge's engine computed for this reward model."""

    def identity(self) -> dict[str, Any]:
        return {"reward_model": "judge", "engine": self.engine.identity(),
                "prompt": stable_hash([self.system, self.user, self.good, self.bad])}

    def shape(self) -> Any:
        shape = getattr(self.engine, "shape", None)
        return shape() if shape else None

    def request(self, key: Any, question: str, steps: Sequence[str]) -> Request:
        numbered = "\n\n".join(steps)
        messages = ({"role": "system", "content": self.system},
                    {"role": "user", "content": self.user.format(question=question, steps=numbered)})
        return Request(key=key, seeds=(0,), params=self.params, messages=messages)

    def score(self, items: Sequence[Scoring]) -> list[list[float]]:
        out: list[list[float]] = [[0.5] * (len(it.steps) - it.known) for it in items]
        requests = [self.request((i, j), it.question, it.steps[:j + 1])
                    for i, it in enumerate(items) for j in range(it.known, len(it.steps))]
        for c in self.engine.generate(requests):
            i, j = c.key
            self.usage += Usage.of(c.prompt_tokens, c.cached_tokens, c.completion_tokens)
            out[i][j - items[i].known] = p_yes(c.logprobs[0].top if c.logprobs else {}, self.good, self.bad)
        return out


def p_yes(top: dict[str, float], good: tuple[str, ...] = ("yes",), bad: tuple[str, ...] = ("no",)) -> float:
    """P(good) / (P(good) + P(bad)) from a token -> logprob map; 0.5 without evidence."""
    yes = sum(math.exp(lp) for t, lp in top.items() if t.strip().lower() in good)
    no = sum(math.exp(lp) for t, lp in top.items() if t.strip().lower() in bad)
    return 0.5 if yes + no == 0 else yes / (yes + no)
