"""Thought preference data (Thought Preference Optimization, Wu et al. 2024) for
instructions that have no verifier.

1. `testtime sample -t instructions -n 8` (template `thought`): the model writes its
   thoughts, then the line "Here is my response:", then the response the user
   would see. The `response_format` verifier passes an output that has a response.
   With `--strategy thought_response` the marker is written for the model once its
   thought ends (`strategies.thought`), so a model too small to follow the format
   still yields outputs to judge.
2. `testtime judge-responses RUN`: a judge (any engine; an LLM-as-judge prompt
   written here) rates each *response* from 1 to 9. The judge never sees the
   thought: the point of TPO is that thoughts are optimised only through the
   responses they lead to. The score is the expected rating under the judge's
   next-token distribution over the digits 1-9 (top log-probabilities), stored
   with the run as a one-step score.
3. `testtime export RUN pairs.jsonl --format tpo [--rho 0.5]`: per instruction, the
   best and the worst full outputs (thought and response) by length-controlled
   score, s - rho * (L - mean L) / std L over the instruction's judged outputs
   with L the response's length in words (TPO's length control against a judge
   that prefers long answers), as a DPO pair in TRL's conversational preference
   format. Outputs without a response are never paired.

An iteration trains on the pairs (TRL's `DPOTrainer`) and samples again from the
trained model (`--model`), as TPO's iterations do.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

from .engines.base import Engine, Request
from .errors import InputError
from .flops import Usage
from .spec import SamplingParams, stable_hash
from .store import Store
from .verifiers.response import split_thought

JUDGE_SYSTEM = "You are a fair and careful judge of answers written for users."
JUDGE_USER = ("Instruction:\n{instruction}\n\nResponse:\n{response}\n\n"
              "How well does the response carry out the instruction? Consider whether it is helpful, correct, "
              "clear and complete. Rate it from 1 (useless) to 9 (excellent). Answer with the number only.")


class ResponseJudge:
    """Rates a response to an instruction from 1 to 9; sees the response only."""

    name = "response_judge"

    def __init__(self, engine: Engine, top_logprobs: int = 20, system: str = JUDGE_SYSTEM, user: str = JUDGE_USER):
        self.engine, self.system, self.user = engine, system, user
        self.params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=top_logprobs)
        self.usage = Usage()

    def identity(self) -> dict[str, Any]:
        return {"judge": "response", "engine": self.engine.identity(), "prompt": stable_hash([self.system, self.user])}

    def messages(self, instruction: str, response: str) -> tuple[dict[str, str], ...]:
        return ({"role": "system", "content": self.system},
                {"role": "user", "content": self.user.format(instruction=instruction, response=response)})

    def rate(self, items: Sequence[tuple[Any, str, str]]) -> Iterator[tuple[Any, float | None, Usage]]:
        """(key, instruction, response) -> (key, expected rating or None, what it cost)."""
        reqs = [Request(key=k, seeds=(0,), params=self.params, messages=self.messages(q, r)) for k, q, r in items]
        for c in self.engine.generate(reqs):
            u = Usage.of(c.prompt_tokens, c.cached_tokens, c.completion_tokens)
            self.usage += u
            yield c.key, expected_rating(c.logprobs[0].top if c.logprobs else {}), u


def expected_rating(top: dict[str, float]) -> float | None:
    """The mean rating under the judge's distribution over the tokens '1'..'9' (their
    probabilities renormalised); None when no digit is among the top alternatives."""
    mass: dict[int, float] = {}
    for tok, lp in top.items():
        t = tok.strip()
        if len(t) == 1 and t in "123456789":
            mass[int(t)] = mass.get(int(t), 0.0) + math.exp(lp)
    total = sum(mass.values())
    return None if total == 0 else sum(k * p for k, p in mass.items()) / total


def scorer_id(judge: ResponseJudge) -> str:
    return "response_judge:" + stable_hash(judge.identity())[:10]


def judge_run(store: Store, run_id: str, judge: ResponseJudge, chunk: int = 64) -> tuple[int, int]:
    """Rate the response of every stored output the judge has not rated; returns (rated
    now, without a response). Ratings are stored as one-step scores with their cost."""
    scorer = scorer_id(judge)
    have = store.step_scores(run_id, scorer)
    questions = {p["problem_id"]: p["question"] for p in store.problems(run_id)}
    todo, malformed = [], 0
    for s in store.samples(run_id):
        if (s.problem_id, s.sample_index) in have:
            continue
        _, response = split_thought(s.text)
        if response is None:
            malformed += 1
        else:
            todo.append(((s.problem_id, s.sample_index), questions[s.problem_id], response))
    rated = 0
    for i in range(0, len(todo), chunk):
        rows, usage = [], []
        for (pid, idx), rating, u in judge.rate(todo[i:i + chunk]):
            if rating is not None:
                rows.append((pid, idx, [rating]))
                usage.append(u.to_dict())
        store.add_step_scores(run_id, scorer, rows, usage)
        rated += len(rows)
    return rated, malformed


def tpo_rows(store: Store, run_id: str, rho: float = 0.5, scorer: str | None = None) -> Iterator[dict[str, Any]]:
    """DPO pairs: per instruction, the best and worst full outputs by length-controlled score."""
    from .export import _prompt_for

    if rho < 0:
        raise InputError(f"rho (the length penalty) must be >= 0, got {rho}")
    known = [s for s in store.scorers(run_id) if s.startswith("response_judge:")]
    if scorer is None:
        if len(known) != 1:
            raise InputError(f"run {run_id} has {len(known)} sets of response ratings ({', '.join(known) or 'none'}); "
                             + ("rate it first: testtime judge-responses RUN" if not known else "choose one"))
        scorer = known[0]
    elif scorer not in known:
        raise InputError(f"run {run_id} has no ratings from {scorer!r}; it has: {', '.join(known) or 'none'}")
    ratings = store.step_scores(run_id, scorer)
    messages, opening = _prompt_for(store, run_id, drop_shots=False)
    by_problem: dict[str, list[tuple[int, str, float, int]]] = {}
    questions = {p["problem_id"]: p["question"] for p in store.problems(run_id)}
    for s in store.samples(run_id):
        r = ratings.get((s.problem_id, s.sample_index))
        _, response = split_thought(s.text)
        if r is not None and response is not None:
            by_problem.setdefault(s.problem_id, []).append((s.sample_index, s.text, r[0], len(response.split())))
    for pid, outs in by_problem.items():
        if len(outs) < 2:
            continue
        lengths = [o[3] for o in outs]
        mean = sum(lengths) / len(lengths)
        sd = math.sqrt(sum((x - mean) ** 2 for x in lengths) / len(lengths))
        scored = [(o[2] - (rho * (o[3] - mean) / sd if sd > 0 else 0.0), o) for o in outs]
        scored.sort(key=lambda x: (-x[0], x[1][0]))
        (best, c), (worst, r) = scored[0], scored[-1]
        if best <= worst or c[1] == r[1]:
            continue  # no preference to learn
        q = questions[pid]
        yield {"prompt": messages(q),
               "chosen": [{"role": "assistant", "content": opening(q) + c[1]}],
               "rejected": [{"role": "assistant", "content": opening(q) + r[1]}],
               "metadata": {"run_id": run_id, "problem_id": pid, "chosen_index": c[0], "rejected_index": r[0],
                            "chosen_rating": c[2], "rejected_rating": r[2], "chosen_score": best,
                            "rejected_score": worst, "chosen_words": c[3], "rejected_words": r[3], "rho": rho,
                            "scorer": scorer}}

