"""`testtime serve`: an OpenAI-compatible chat-completions endpoint that spends
test-time compute on every request.

Clients keep the API they already call and choose a strategy per request,
through the model name or an extra body field:

    model "majority@8"      self-consistency: 8 samples, the most common final answer
    model "best_of_n@4"     4 samples scored by a judge (the engine asked, step by step,
                            whether each step is right); the best answer by summed score
    model "sample"          one sample, as is
    model "policy@16"       a compute-optimal policy (`testtime optimal --difficulty predicted`)
                            at budget 16: 4 probe samples scored by the judge give the
                            difficulty bin, and the bin's choice runs (best-of-N, majority,
                            beam search, DVTS) with the chat's turns as its prompt
    extra body {"testtime": {"strategy": "majority", "n": 8}}   the same, explicitly

The reply is the candidate that carries the chosen answer (the earliest of them),
whole. `usage` counts every token spent inside: all samples' prompts and
completions, and the judge's. With `"stream": true` the final answer arrives as
server-sent events (a role chunk, one content chunk, a finish chunk, [DONE]).
Bad requests get OpenAI-style error bodies (`{"error": {"message", "type",
"param", "code"}}`).

Requests are served by one worker that batches every request waiting for it into
one engine call (the embedded engine then decodes them together), and then
judges all of their candidates in one call.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .engines.base import Engine, Request
from .flops import Usage
from .rewards.base import Scoring, split_steps
from .select import AnswerKeys, aggregate, best_of_n_weighted, majority_vote
from .spec import SamplingParams, SpecError, sample_seed

STRATEGIES = ("sample", "majority", "best_of_n", "policy")
_MODEL = re.compile(r"^(sample|majority|best_of_n|policy)(?:@(\d+))?$")


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class Job:
    messages: list[dict[str, str]]
    strategy: str
    n: int
    params: SamplingParams
    seed: int
    done: threading.Event = field(default_factory=threading.Event)
    texts: list[str] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    result: dict[str, Any] | None = None
    error: Exception | None = None


def _turns(msgs: list[dict[str, str]]) -> tuple[str | None, tuple[tuple[str, str], ...], str]:
    """A chat as (system, earlier (user, assistant) pairs, last user turn), as a policy's
    search needs it; a chat of another shape is a bad request."""
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    rest = msgs[1:] if system is not None else msgs
    if len(rest) % 2 != 1 or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(rest)):
        raise BadRequest("a policy request needs an optional system turn, then user and assistant turns "
                         "alternating, ending with the user's", "messages")
    pairs = tuple((rest[i]["content"], rest[i + 1]["content"]) for i in range(0, len(rest) - 1, 2))
    return system, pairs, rest[-1]["content"]


def parse_request(body: Any, max_n: int) -> Job:
    """Validate a chat-completions body; the strategy comes from the model name or `testtime`."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] needs a string 'role' and a string 'content'", f"messages.{i}")
    model = str(body.get("model") or "majority@8")
    extra = body.get("testtime") or {}
    if not isinstance(extra, dict):
        raise BadRequest("'testtime' must be an object like {\"strategy\": \"majority\", \"n\": 8}", "testtime")
    m = _MODEL.match(model)
    if extra.get("strategy"):
        strategy, n = str(extra["strategy"]), extra.get("n", 8)
    elif m:
        strategy, n = m.group(1), int(m.group(2) or (1 if m.group(1) == "sample" else 8))
    else:
        raise BadRequest(f"model {model!r} names no strategy; use one of sample, majority@N, best_of_n@N "
                         "(or the 'testtime' body field)", "model", 404, "model_not_found")
    if strategy not in STRATEGIES:
        raise BadRequest(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}", "testtime.strategy")
    if not isinstance(n, int) or not 1 <= n <= max_n:
        raise BadRequest(f"n must be an integer in [1, {max_n}], got {n!r}", "testtime.n")
    if strategy == "policy":
        _turns([{"role": m["role"], "content": m["content"]} for m in msgs])
    if body.get("n", 1) != 1:
        raise BadRequest("n > 1 choices is not supported: the server returns one answer chosen from its samples",
                         "n")
    try:
        params = SamplingParams(temperature=float(body.get("temperature", 0.7 if strategy != "sample" else 1.0)),
                                top_p=float(body.get("top_p", 1.0)),
                                max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 512),
                                stop=tuple(body.get("stop") or ()) if not isinstance(body.get("stop"), str)
                                else (body["stop"],))
    except (SpecError, TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None
    seed = body.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise BadRequest("seed must be an integer", "seed")
    return Job([{"role": m["role"], "content": m["content"]} for m in msgs], strategy, n, params,
               seed if seed is not None else int(uuid.uuid4().int % 2 ** 31))


class Worker:
    """Owns the engine: batches waiting jobs into one generate call, then one judge call."""

    def __init__(self, engine: Engine, judge: Any | None = None, max_batch: int = 64, policy: Any = None):
        self.engine, self.judge, self.max_batch, self.policy = engine, judge, max_batch, policy
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.keys = AnswerKeys()
        self._thread = threading.Thread(target=self._run, name="testtime-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def _run(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                self._serve(batch)
            except Exception as e:  # the engine failed: every job of the batch gets the error
                for j in batch:
                    if not j.done.is_set():
                        j.error = e
                        j.done.set()

    def _serve(self, batch: list[Job]) -> None:
        for j in [j for j in batch if j.strategy == "policy"]:
            try:
                self._policy_job(j)
            except Exception as e:
                j.error = e
            j.done.set()
        batch = [j for j in batch if j.strategy != "policy"]
        if not batch:
            return
        requests = [Request(key=i, seeds=tuple(sample_seed(j.seed, "serve", k) for k in range(j.n)),
                            params=j.params, messages=tuple(j.messages)) for i, j in enumerate(batch)]
        got: dict[int, list[tuple[int, str, str]]] = {i: [] for i in range(len(batch))}
        for c in self.engine.generate(requests):
            got[c.key].append((c.index, c.text, c.finish_reason))
            batch[c.key].usage += Usage.of(c.prompt_tokens, c.cached_tokens, c.completion_tokens)
        for i, j in enumerate(batch):
            rows = sorted(got[i])
            j.texts, j.finish = [t for _, t, _ in rows], [f for _, _, f in rows]
        judged = [j for j in batch if j.strategy == "best_of_n"]
        scores: dict[int, list[float]] = {}
        if judged and self.judge is not None:
            items, owners = [], []
            for j in judged:
                question = next((m["content"] for m in reversed(j.messages) if m["role"] == "user"), "")
                for k, t in enumerate(j.texts):
                    items.append(Scoring(question, tuple(split_steps(t, "\n") or [t])))
                    owners.append((id(j), k))
            before = Usage.from_dict(self.judge.usage.to_dict()) if hasattr(self.judge, "usage") else Usage()
            out = self.judge.score(items)
            spent = (self.judge.usage + before.scaled(-1)) if hasattr(self.judge, "usage") else Usage()
            for (owner, k), s in zip(owners, out):
                scores.setdefault(owner, []).append(aggregate(s, "last"))
            for j in judged:  # the judge's tokens, shared out by the candidates each job had judged
                j.usage += spent.scaled(len(j.texts) / max(1, len(items)))
        for j in batch:
            keys = [self.keys.of_text(t) for t in j.texts]
            if j.strategy == "best_of_n" and self.judge is not None:
                chosen = best_of_n_weighted(keys, [max(s, 0.0) for s in scores[id(j)]])
            elif j.strategy == "sample":
                chosen = keys[0]
            else:
                chosen = majority_vote(keys)
            pick = keys.index(chosen) if chosen is not None else 0
            j.result = {"text": j.texts[pick], "finish_reason": j.finish[pick], "answer_key": chosen,
                        "votes": sum(k == chosen for k in keys) if chosen is not None else 0, "candidates": len(keys)}
            j.done.set()


    def _judge_usage(self) -> Usage:
        return Usage.from_dict(self.judge.usage.to_dict()) if hasattr(self.judge, "usage") else Usage()

    def _policy_job(self, j: Job) -> None:
        """Probe, bin, and run the bin's choice for one request."""
        from .policy import parse_config
        from .prompts import PromptTemplate
        from .strategies.search import Path, SearchConfig, tree_search
        from .tasks.base import Problem

        pol, s = self.policy, self.policy.meta.get("search", {})
        system, pairs, question = _turns(j.messages)
        tmpl = PromptTemplate("serve", user="{question}", system=system, shots=pairs)
        problem = Problem("request", question, None)
        if pol.difficulty is None:
            raise ValueError("the policy has no difficulty bins")
        delim, agg = s.get("delimiter", "\n"), s.get("aggregation", "last")
        step = SamplingParams(temperature=j.params.temperature, max_tokens=int(s.get("step_tokens", 48)))
        full = SamplingParams(temperature=j.params.temperature, top_p=j.params.top_p, stop=j.params.stop,
                              max_tokens=int(s.get("step_tokens", 48)) * int(s.get("iterations", 4)))
        before = self._judge_usage()
        probe_n = int(s.get("probe", 4))

        def draw(indices: range) -> list[Any]:
            """Samples `indices` of this request (seeds as in best-of-N), each scored by the judge."""
            if not indices:
                return []
            req = Request(key=0, seeds=tuple(sample_seed(j.seed, problem.id, i) for i in indices), params=full,
                          messages=tuple(tmpl.messages(question)))
            got = sorted(self.engine.generate([req]), key=lambda c: c.index)
            out = []
            for c in got:
                j.usage += Usage.of(c.prompt_tokens, c.cached_tokens, c.completion_tokens)
                out.append(Path(split_steps(c.text, delim), [], True, c.finish_reason, c.completion_tokens))
            for p_, sc in zip(out, self.judge.score([Scoring(question, tuple(p_.steps)) for p_ in out])):
                p_.scores, p_.rank = list(sc), aggregate(sc, agg)
            return out

        paths = draw(range(probe_n))  # the probe: its samples are also the first of a best-of-N draw
        level = pol.difficulty.bin_of(sum(max(p.rank, 0.0) for p in paths) / len(paths))
        choice = pol.choose(j.n, level)
        strategy, params = parse_config(choice.config)
        if strategy in ("beam_search", "dvts"):
            cfg = SearchConfig(n=choice.n, width=int(params.get("width", 4)), max_iterations=int(s.get("iterations", 4)),
                               delimiter=delim, aggregation=agg, lookahead=int(params.get("lookahead", 0)))
            res = tree_search([problem], self.engine, self.judge, tmpl, step, cfg,
                              mode="beam" if strategy == "beam_search" else "dvts", seed=j.seed)
            paths = res.paths[problem.id]
            j.usage += res.stats.usage
        elif strategy in ("best_of_n", "majority"):
            paths = (paths + draw(range(probe_n, choice.n)))[:choice.n]
        else:
            raise ValueError(f"serve cannot run the policy's choice {choice.config!r}")
        j.usage += self._judge_usage() + before.scaled(-1)
        texts = [p.text(delim) for p in paths]
        keys = [self.keys.of_text(t) for t in texts]
        chosen = majority_vote(keys) if strategy == "majority" else \
            best_of_n_weighted(keys, [max(p.rank if p.rank is not None else 0.0, 0.0) for p in paths])
        pick = keys.index(chosen) if chosen is not None else 0
        j.texts, j.finish = texts, [p.finish_reason if p.finish_reason in ("stop", "length") else "stop" for p in paths]
        j.result = {"text": texts[pick], "finish_reason": j.finish[pick], "answer_key": chosen,
                    "votes": sum(k == chosen for k in keys) if chosen is not None else 0, "candidates": len(keys),
                    "policy": {"bin": level, "choice": f"{choice.config} N={choice.n}"}}


def _response(job: Job, model: str) -> dict[str, Any]:
    u = job.usage
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": job.result["text"]},
                         "finish_reason": job.result["finish_reason"], "logprobs": None}],
            "usage": {"prompt_tokens": int(u.prompt), "completion_tokens": int(u.decode),
                      "total_tokens": int(u.prompt + u.decode),
                      "prompt_tokens_details": {"cached_tokens": int(u.cached)}},
            "testtime": {"strategy": job.strategy, "n": job.n, "votes": job.result["votes"],
                         "candidates": job.result["candidates"], **({"policy": job.result["policy"]}
                                                                    if "policy" in job.result else {})}}


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, judge: Any | None = None,
                max_n: int = 64, timeout_s: float = 600.0, policy: Any = None) -> ThreadingHTTPServer:
    """policy: a `testtime.policy.Policy` with predicted difficulty (needs the judge)."""
    if policy is not None:
        if policy.difficulty is None or policy.difficulty.kind != "predicted":
            raise ValueError("serve needs a policy whose difficulty is predicted (testtime optimal --difficulty "
                             "predicted): oracle difficulty needs reference answers, which requests do not have")
        if judge is None:
            raise ValueError("a policy needs the judge (its difficulty is the judge's score of probe samples)")
    worker = Worker(engine, judge, policy=policy)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _json(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: BadRequest) -> None:
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            self._json(e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}})

        def do_GET(self):
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                names = ["sample"] + [f"{s}@{n}" for s in ("majority", "best_of_n") for n in (4, 8, 16)]
                if policy is not None:
                    names += [f"policy@{b}" for b in policy.budgets]
                self._json(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "testtime"}
                                                            for m in names]})
            else:
                self._error(BadRequest(f"no route GET {self.path}", status=404, code="not_found"))

        def do_POST(self):
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self._error(BadRequest(f"no route POST {self.path}", status=404, code="not_found"))
            try:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except json.JSONDecodeError as e:
                    raise BadRequest(f"the body is not JSON: {e}") from None
                job = parse_request(body, max_n)
                if job.strategy == "best_of_n" and judge is None:
                    raise BadRequest("best_of_n needs a judge, and this server has none", "model")
                if job.strategy == "policy" and policy is None:
                    raise BadRequest("this server has no policy (start it with --policy FILE)", "model", 404,
                                     "model_not_found")
            except BadRequest as e:
                return self._error(e)
            worker.submit(job)
            if not job.done.wait(timeout_s):
                return self._error(BadRequest(f"no answer within {timeout_s} s", status=504, code="timeout"))
            if job.error is not None:
                return self._error(BadRequest(f"the engine failed: {job.error}", status=502, code="upstream_error"))
            resp = _response(job, str(body.get("model") or "majority@8"))
            if not body.get("stream"):
                return self._json(200, resp)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            base = {k: resp[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
            finish = resp["choices"][0]["finish_reason"]
            chunks = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
                      {"index": 0, "delta": {"content": resp["choices"][0]["message"]["content"]}, "finish_reason": None},
                      {"index": 0, "delta": {}, "finish_reason": finish}]
            for i, ch in enumerate(chunks):
                event = base | {"choices": [ch]}
                if i == len(chunks) - 1 and (body.get("stream_options") or {}).get("include_usage"):
                    event["usage"] = resp["usage"]
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
