"""Test doubles shared by the test modules: deterministic engines and reward models
whose right answers are known, so strategies can be checked against them."""

from __future__ import annotations

import hashlib
import time
from typing import Any, Iterable, Iterator

from testtime.engines.base import Completion, Request
from testtime.rewards.base import split_steps


def _u(*parts) -> float:
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") / 2 ** 64


class MazeEngine:
    """Each step is 'good' with probability p_good (by the sample's seed), else 'bad';
    after `depth` steps the solution ends with answer 1 if every step was good, else 0.
    Greedy decoding always takes the likelier step, 'bad'. Records every call."""

    name = "maze"

    def __init__(self, depth: int = 4, p_good: float = 0.3, delay_s: float = 0.0):
        self.depth, self.p_good, self.delay_s = depth, p_good, delay_s
        self.calls: list[list[Request]] = []

    def identity(self) -> dict[str, Any]:
        return {"engine": "maze"}

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        requests = list(requests)
        self.calls.append(requests)
        for req in requests:
            prior = split_steps(req.continuation)
            for i, seed in enumerate(req.seeds):
                steps, k, hit = [], len(prior), None
                while True:
                    good = (self.p_good > 0.5) if req.params.temperature == 0 else _u(seed, k) < self.p_good
                    steps.append(f"step {k}: {'good' if good else 'bad'}")
                    k += 1
                    if k >= self.depth:
                        ok = all("good" in s for s in prior + steps)
                        steps.append(f"The answer is {int(ok)}.")
                        break
                    if "\n\n" in req.params.stop:
                        hit = "\n\n"
                        break
                text = "\n\n".join(steps)
                if self.delay_s:
                    time.sleep(self.delay_s)
                yield Completion(req.key, i, seed, text, [0] * (3 * len(steps)), 10, 0, "stop", stop_hit=hit)

    def close(self) -> None:
        pass


class MazePRM:
    name = "maze_prm"

    def identity(self):
        return {"reward_model": "maze"}

    def score(self, items):
        return [[0.9 if "good" in s else 0.1 if "bad" in s else 0.5 for s in it.steps[it.known:]] for it in items]


