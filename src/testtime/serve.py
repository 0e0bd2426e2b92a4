"""`testtime serve`: an OpenAI-compatible chat-completions endpoint that spends
test-time compute on every request.

Clients keep the API they already call and choose a strategy per request,
through the model name or an extra body field. Every registered strategy is
servable (`testtime.strategies`), with its parameters at their defaults or set
in the body:

    model "majority@8"      self-consistency: 8 samples, the most common final answer
    model "best_of_n@4"     4 samples scored by the judge; the answer with the highest
                            summed score
    model "beam_search@8"   any registered strategy at budget N (step-wise ones need the judge)
    model "sample"          one sample, as is
    model "policy@16"       a compute-optimal policy (`testtime optimal --difficulty predicted`)
                            at budget 16: probe samples scored by the judge give the
                            difficulty bin, and the bin's choice runs with the chat's turns
                            and the sampler the policy was fitted with
    extra body {"testtime": {"strategy": "beam_search", "n": 8, "params": {"width": 2}}}

The reply is the candidate that carries the chosen answer (the earliest of them),
whole. `usage` counts every token spent inside: all samples' prompts and
completions, and the judge's. `adaptive_consistency@N` stops sampling a request
once its vote is decided: its samples still queued are never started, those
running are cancelled (the embedded engine frees their slots at the next step),
the reply goes out at once while other requests go on sampling, `usage` counts
the tokens actually generated, and `testtime.decision` says where it stopped
(`stopped_at`, `drawn`, `cancelled`). With `"stream": true` the final answer arrives as
server-sent events (a role chunk, one content chunk, a finish chunk, [DONE]).
Bad requests get OpenAI-style error bodies (`{"error": {"message", "type",
"param", "code"}}`).

Requests are served by one worker that takes every request waiting for it and
runs those with the same strategy, parameters and sampling as one strategy call
(the embedded engine then decodes them together).
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

from .errors import InputError
from .engines.base import Engine
from .flops import Usage
from .prompts import PromptTemplate
from .searchspec import DEFAULT_STRATEGY
from .select import AnswerKeys, aggregate, best_of_n_weighted, majority_vote
from .spec import SamplingParams, SpecError
from .strategies.base import STRATEGIES, Candidate, ProblemResult, SearchContext, StrategyParams, strategy_params, trait
from .tasks.base import Problem

SAMPLE, POLICY = "sample", "policy"
"""Model names served apart from the registry: one plain sample, and the server's own policy
file (the registered `policy` strategy, with the file the server was started with; a
request can never name a file)."""
_MODEL = re.compile(r"^([a-z_]+)(?:@(\d+))?$")
_CHAT = PromptTemplate("serve", user="{question}")
"""Unused for prompts (each request brings its own turns); names the context's template."""


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class Job:
    messages: list[dict[str, str]]
    strategy: str
    """A registered strategy, `sample` or `policy`."""
    n: int
    params: StrategyParams | None
    """The strategy's parameters at budget n (None for a policy: its choice decides)."""
    sampling: SamplingParams
    seed: int
    done: threading.Event = field(default_factory=threading.Event)
    usage: Usage = field(default_factory=Usage)
    result: dict[str, Any] | None = None
    error: Exception | None = None

    def problem(self) -> Problem:
        """The request as a problem: its own chat, the last user turn as the question (for
        the judge), and an id from the seed, so a request's samples depend on its seed only."""
        question = next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")
        return Problem(f"request-{self.seed}", question, None, meta={"messages": tuple(self.messages)})


def _check_turns(msgs: list[dict[str, str]]) -> None:
    """A policy's probe and choice need a chat that ends with the user's turn."""
    system = msgs[0]["role"] == "system"
    rest = msgs[1:] if system else msgs
    if len(rest) % 2 != 1 or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(rest)):
        raise BadRequest("a policy request needs an optional system turn, then user and assistant turns "
                         "alternating, ending with the user's", "messages")


def _sampling(body: dict[str, Any], strategy: str) -> SamplingParams:
    """The request's sampling fields over testtime's defaults (a truncated sampler)."""
    default = SamplingParams()
    stop = body.get("stop")
    try:
        return SamplingParams(
            temperature=float(body.get("temperature", 1.0 if strategy == SAMPLE else default.temperature)),
            top_p=float(body.get("top_p", default.top_p)), top_k=int(body.get("top_k", default.top_k)),
            min_p=float(body.get("min_p", default.min_p)),
            max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 512),
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()))
    except (SpecError, TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None


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
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    model = str(body.get("model") or "")
    extra = body.get("testtime") or {}
    if not isinstance(extra, dict):
        raise BadRequest("'testtime' must be an object like {\"strategy\": NAME, \"n\": 8}", "testtime")
    m = _MODEL.match(model)
    known = [SAMPLE, POLICY] + STRATEGIES.names()
    if extra.get("strategy"):
        strategy, n = str(extra["strategy"]), extra.get("n", 8)
        if strategy not in known:
            raise BadRequest(f"unknown strategy {strategy!r}; known: {', '.join(known)}", "testtime.strategy")
    elif m and m.group(1) in known:
        strategy, n = m.group(1), int(m.group(2) or (1 if m.group(1) == SAMPLE else 8))
    else:
        raise BadRequest(f"model {model!r} names no strategy; use sample, policy@B or NAME@N for a strategy "
                         f"({', '.join(STRATEGIES.names())}), or the 'testtime' body field", "model", 404,
                         "model_not_found")
    if not isinstance(n, int) or not 1 <= n <= max_n:
        raise BadRequest(f"n must be an integer in [1, {max_n}], got {n!r}", "testtime.n")
    if body.get("n", 1) != 1:
        raise BadRequest("n > 1 choices is not supported: the server returns one answer chosen from its samples",
                         "n")
    seed = body.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise BadRequest("seed must be an integer", "seed")
    params = None
    if strategy == POLICY:
        _check_turns(msgs)
    else:
        values = extra.get("params") or {}
        if not isinstance(values, dict):
            raise BadRequest("'testtime.params' must be an object of the strategy's parameters", "testtime.params")
        try:
            params = strategy_params(DEFAULT_STRATEGY if strategy == SAMPLE else strategy, {**values, "n": n})
        except SpecError as e:
            raise BadRequest(str(e), "testtime.params") from None
    return Job(msgs, strategy, n, params, _sampling(body, strategy),
               seed if seed is not None else int(uuid.uuid4().int % 2 ** 31))


def choose(strategy: str, candidates: list[Candidate], keys: AnswerKeys, aggregation: str = "last") -> int:
    """The index of the candidate that carries the answer a strategy selects."""
    answers = [keys.of_text(c.text) for c in candidates]
    if strategy == SAMPLE or not answers:
        return 0
    scored = trait(strategy, "selection") == "weighted" and any(c.scores for c in candidates)
    chosen = (best_of_n_weighted(answers, [max(aggregate(list(c.scores), aggregation), 0.0) for c in candidates])
              if scored else majority_vote(answers))
    return answers.index(chosen) if chosen is not None else 0


class Worker:
    """Owns the engine: runs waiting jobs that share a strategy, parameters and sampling
    as one strategy call."""

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

    def _strategy(self, name: str, jobs: list[Job], params: StrategyParams, sampling: SamplingParams) -> None:
        """One strategy call for jobs that share everything but their chats and seeds. Each
        job is answered the moment the strategy yields its result (an adaptive strategy
        yields a decided request while the others are still sampling)."""
        impl = STRATEGIES.get(DEFAULT_STRATEGY if name == SAMPLE else name)
        ctx = SearchContext(self.engine, self.judge if name != SAMPLE else None, _CHAT, sampling, 0)
        by_id = {j.problem().id: j for j in jobs}
        for res in impl().run([j.problem() for j in jobs], ctx, params):
            self._finish(by_id[res.problem_id], name, res, {"decision": res.decision} if res.decision else None)
        for j in jobs:
            if not j.done.is_set():
                j.error = RuntimeError(f"{name} returned no result for this request")
                j.done.set()

    def _serve(self, batch: list[Job]) -> None:
        for j in [j for j in batch if j.strategy == POLICY]:
            try:
                self._policy_job(j)
            except Exception as e:
                j.error = e
            j.done.set()
        groups: list[tuple[tuple, list[Job]]] = []
        for j in batch:
            if j.strategy == POLICY:
                continue
            key = (j.strategy, j.params, j.sampling)
            # requests with the same seed are the same problem: they go to separate calls
            home = next((g for k, g in groups if k == key and all(o.seed != j.seed for o in g)), None)
            if home is None:
                groups.append((key, home := []))
            home.append(j)
        for (name, params, sampling), jobs in groups:
            self._strategy(name, jobs, params, sampling)

    def _finish(self, j: Job, strategy: str, res: ProblemResult, extra: dict[str, Any] | None = None,
                aggregation: str | None = None) -> None:
        for u in res.usage.values():
            j.usage += u
        if not res.candidates:
            j.error = RuntimeError(f"{strategy} finished this request without a candidate")
            j.done.set()
            return
        pick = choose(strategy, res.candidates, self.keys, aggregation or getattr(j.params, "aggregation", "last"))
        answers = [self.keys.of_text(c.text) for c in res.candidates]
        chosen = answers[pick] if answers else None
        best = res.candidates[pick]
        j.result = {"text": best.text, "finish_reason": best.finish_reason if best.finish_reason in ("stop", "length")
                    else "stop", "answer_key": chosen,
                    "votes": sum(k == chosen for k in answers) if chosen is not None else 0,
                    "candidates": len(answers), **(extra or {})}
        j.done.set()

    def _policy_job(self, j: Job) -> None:
        """The `policy` strategy on one request: probe, bin, and the bin's choice."""
        from .strategies.policy import run_policy

        ctx = SearchContext(self.engine, self.judge, _CHAT, j.sampling, 0)
        [res] = list(run_policy([j.problem()], ctx, self.policy, j.n))
        d = res.decision
        self._finish(j, d["strategy"], res, {"policy": {"bin": d["bin"], "choice": f"{d['choice']} N={d['n']}"}},
                     aggregation=d["params"].get("aggregation", "last"))


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
                         "candidates": job.result["candidates"],
                         **{k: job.result[k] for k in ("policy", "decision") if k in job.result}}}


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, judge: Any | None = None,
                max_n: int = 64, timeout_s: float = 600.0, policy: Any = None) -> ThreadingHTTPServer:
    """policy: a `testtime.policy.Policy` with predicted difficulty (needs the judge).
    (Long because the HTTP handler class lives inside it, closing over the worker; the
    ASGI rewrite of `serve` replaces this handler as a whole.)"""
    if policy is not None:
        if policy.difficulty is None or policy.difficulty.kind != "predicted":
            raise InputError("serve needs a policy whose difficulty is predicted (testtime optimal --difficulty "
                             "predicted): oracle difficulty needs reference answers, which requests do not have")
        if judge is None:
            raise InputError("a policy needs the judge (its difficulty is the judge's score of probe samples)")
        from .optimal import policy_candidates

        policy_candidates(policy)  # a policy file this version cannot run fails here, not per request
    worker = Worker(engine, judge, policy=policy)
    # independent samples first (the common case), then the step-wise strategies
    servable = sorted((s for s in STRATEGIES.names() if s != POLICY and (judge is not None or not STRATEGIES.get(s).needs_prm)),
                      key=lambda s: (not trait(s, "independent"), trait(s, "selection") == "weighted", s))

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
                names = [SAMPLE] + [f"{s}@{n}" for s in servable for n in (4, 8, 16)]
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
                if job.strategy in STRATEGIES and STRATEGIES.get(job.strategy).needs_prm and judge is None:
                    raise BadRequest(f"{job.strategy} needs a judge, and this server has none", "model")
                needs = getattr(STRATEGIES.get(job.strategy), "needs_engine", None) if job.strategy in STRATEGIES \
                    else None
                if needs and not getattr(engine, needs, False):
                    raise BadRequest(f"{job.strategy} needs an engine with {needs}; this server's "
                                     f"{getattr(engine, 'name', 'engine')} has not", "model")
                if job.strategy == POLICY and policy is None:
                    raise BadRequest("this server has no policy (start it with --policy FILE)", "model", 404,
                                     "model_not_found")
            except BadRequest as e:
                return self._error(e)
            worker.submit(job)
            if not job.done.wait(timeout_s):
                return self._error(BadRequest(f"no answer within {timeout_s} s", status=504, code="timeout"))
            if job.error is not None:
                return self._error(BadRequest(f"the engine failed: {job.error}", status=502, code="upstream_error"))
            resp = _response(job, str(body.get("model") or job.strategy))
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
