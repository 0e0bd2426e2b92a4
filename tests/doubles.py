"""Test doubles shared by the test modules: deterministic engines and reward models
whose right answers are known, so strategies can be checked against them."""

from __future__ import annotations

import hashlib
import time
from typing import Any, Iterable, Iterator

from testtime.engines.base import Completion, Request
from testtime.rewards.base import split_steps


def labelled_maze_runs(ws, n_problems: int, held_from: int, n: int, n_held: int) -> tuple[list, str, str]:
    """Two labelled maze runs in workspace `ws`: problems 0..n_problems-1 with n samples each,
    and problems held_from.. (an evaluation run, overlapping the first) with n_held each;
    Monte Carlo labels (m=8) on both. Returns (problems, run id, evaluation run id)."""
    from testtime.labels import LabelConfig, label_run
    from testtime.runner import draw_samples
    from testtime.spec import SamplingParams
    from testtime.store import Store
    from testtime.tasks.base import Problem, Task
    from testtime.verifiers.math_answer import MathAnswerVerifier

    problems = [Problem(f"p{i}", f"maze {i}", "1") for i in range(n_problems)]
    train_task = Task("maze", {"name": "maze"}, lambda limit: problems[:limit], "plain", "math_answer")
    held_task = Task("maze2", {"name": "maze2"}, lambda limit: problems[held_from:][:limit], "plain", "math_answer")
    eng = MazeEngine(depth=3, p_good=0.6)
    with Store(ws) as store:
        rid = draw_samples(store, train_task, eng, n, SamplingParams(temperature=1.0), template="plain").run_id
        other = draw_samples(store, held_task, eng, n_held, SamplingParams(temperature=1.0), template="plain").run_id
        label_run(store, rid, eng, MathAnswerVerifier(), LabelConfig(m=8, delimiter="\n\n"))
        label_run(store, other, eng, MathAnswerVerifier(), LabelConfig(m=8, delimiter="\n\n"))
    return problems, rid, other


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
                    if k >= self.depth:  # every step written (a prefix may hold them all): the answer
                        ok = all("good" in s for s in prior + steps)
                        steps.append(f"The answer is {int(ok)}.")
                        break
                    good = (self.p_good > 0.5) if req.params.temperature == 0 else _u(seed, k) < self.p_good
                    steps.append(f"step {k}: {'good' if good else 'bad'}")
                    k += 1
                    if k < self.depth and "\n\n" in req.params.stop:
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




class SlotEngine:
    """A continuous-batching engine in miniature, for the server's tests: `slots` samples
    run at once, every running sample gains one word per step of `step_s` seconds, and a
    sample is `max_tokens` words long (its text a function of prefix and seed). It pulls
    requests lazily as the protocol says (None: go on and ask again), fills free slots
    from them in order, honours `Request.cancelled` at every step and streams each word
    but the last to `Request.on_token`. `active` is how many samples it holds right now;
    `started` lists (key, index) in the order samples got a slot. A prompt containing
    "CRASH" makes the engine fail as a broken one would; prompts over `max_prompt` words
    are refused by `check_request`, as the llama.cpp engine refuses what cannot fit."""

    name = "slots"
    cancels = True
    streams_text = True

    def __init__(self, slots: int = 4, step_s: float = 0.01, max_prompt: int = 1000):
        self.slots, self.step_s, self.max_prompt = slots, step_s, max_prompt
        self.active = 0
        self.started: list[tuple[Any, int]] = []
        self.steps = 0

    def identity(self) -> dict[str, Any]:
        return {"engine": "slots"}

    @staticmethod
    def _prefix(req: Request) -> str:
        return req.prompt if req.prompt is not None else " ".join(m["content"] for m in req.messages) + req.continuation

    def check_request(self, req: Request) -> None:
        from testtime.errors import InputError

        if len(self._prefix(req).split()) > self.max_prompt:
            raise InputError(f"request {req.key!r}: prompt over {self.max_prompt} words")

    def generate(self, requests: Iterable[Request | None]) -> Iterator[Completion]:
        from testtime.engines.base import StreamStalled, is_cancelled, never_started

        source, queued, running, exhausted = iter(requests), [], [], False
        try:
            while True:
                end = object()
                while not exhausted and len(queued) < 2 * self.slots:
                    req = next(source, end)
                    if req is end:
                        exhausted = True
                    if req is None and not queued and not running:
                        raise StreamStalled("waiting with nothing running")
                    if req is end or req is None:  # None: nothing yet, ask again after a step
                        break
                    queued += [(req, i) for i in range(req.n)]
                    if "CRASH" in self._prefix(req):
                        raise RuntimeError("the engine broke")
                for req, i in [q for q in queued if is_cancelled(q[0])]:
                    queued.remove((req, i))
                    yield never_started(req, i)
                while queued and len(running) < self.slots:
                    req, i = queued.pop(0)
                    self.started.append((req.key, i))
                    running.append({"req": req, "i": i, "words": []})
                self.active = len(running)
                if not running:
                    if exhausted and not queued:
                        return
                    continue
                time.sleep(self.step_s)
                self.steps += 1
                for s in list(running):
                    req = s["req"]
                    word = f"w{int(_u(self._prefix(req), req.seeds[s['i']], len(s['words'])) * 1000)}"
                    s["words"].append(word)
                    ended = "cancelled" if is_cancelled(req) else (
                        "length" if len(s["words"]) >= req.params.max_tokens else None)
                    if ended is None and req.on_token is not None:
                        req.on_token(s["i"], word if len(s["words"]) == 1 else " " + word)
                    if ended:
                        running.remove(s)
                        self.active = len(running)
                        text = " ".join(s["words"]) + ("" if ended == "cancelled" else
                                                       f" The answer is {int(_u(self._prefix(req), req.seeds[s['i']]) * 3)}.")
                        yield Completion(key=req.key, index=s["i"], seed=req.seeds[s["i"]], text=text,
                                         token_ids=list(range(len(s["words"]))),
                                         prompt_tokens=len(self._prefix(req).split()), cached_tokens=0,
                                         finish_reason=ended)
        finally:
            self.active = 0

    def close(self) -> None:
        pass
