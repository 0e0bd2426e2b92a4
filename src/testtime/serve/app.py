"""The ASGI application (Starlette on uvicorn): routes, limits, keys, metrics, streaming.

Each admitted request runs its strategy on a thread of a bounded pool, against the
server's `SharedEngine`, so every request's samples are batched together in the engine
(continuous batching). The event loop only parses, admits, waits and writes:

- a request is admitted while fewer than `max_queue` are in the server (running or
  waiting); beyond that it gets 429 with `Retry-After`, before any work is done;
- a client that disconnects (or a request that times out) cancels its ticket: its
  samples still waiting never start and those running stop at the engine's next step;
- `stream: true` streams: `sample` sends tokens as the engine makes them; the other
  strategies send an SSE comment per finished sample (`: progress ...`) while they work,
  then the chosen answer; with `stream_options.include_usage` a last chunk carries usage.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..engines.base import Request as EngineRequest
from ..errors import InputError
from ..flops import Usage
from ..select import AnswerKeys, aggregate, best_of_n_weighted, majority_vote
from ..spec import sample_seed
from ..strategies.base import STRATEGIES, Candidate, ProblemResult, SearchContext, trait
from .metrics import ServeMetrics
from .requests import (POLICY, SAMPLE, BadRequest, ChatBody, CompletionBody, Job, Limits, parse_job, validate)
from .scheduler import SharedEngine

log = logging.getLogger("testtime.serve.access")
DRAIN_LIMIT = 64 << 20
"""Bytes of an oversized body read and dropped before the 413 goes out; beyond this the
connection is simply closed."""


@dataclass(frozen=True)
class ServeConfig:
    limits: Limits = field(default_factory=Limits)
    max_queue: int = 64
    """Requests in the server at once (running or waiting for the engine); 429 beyond."""
    timeout_s: float = 600.0
    """A request still unanswered after this long is cancelled and gets 504."""
    max_body: int = 1 << 20
    """Largest request body in bytes (413 beyond)."""
    api_key: str | None = None
    """When set, every route but /health needs `Authorization: Bearer <key>`."""
    retry_after_s: int = 1


def choose(strategy: str, candidates: list[Candidate], keys: AnswerKeys, aggregation: str = "last") -> int:
    """The index of the candidate that carries the answer a strategy selects."""
    answers = [keys.of_text(c.text) for c in candidates]
    if strategy == SAMPLE or not answers:
        return 0
    scored = trait(strategy, "selection") == "weighted" and any(c.scores for c in candidates)
    chosen = (best_of_n_weighted(answers, [max(aggregate(list(c.scores), aggregation), 0.0) for c in candidates])
              if scored else majority_vote(answers))
    return answers.index(chosen) if chosen is not None else 0


def per_thread_usage(prm: Any) -> Any:
    """A reward model shared by concurrent requests counts its tokens per thread: its
    `usage` becomes thread-local, so each request's strategy (which reads the usage before
    and after it scores, on its own thread) is billed for its own scoring only."""
    if prm is None or not hasattr(prm, "usage") or getattr(prm, "_usage_per_thread", False):
        return prm
    local = threading.local()
    cls = type(prm)

    def get(self: Any) -> Usage:
        if not hasattr(local, "usage"):
            local.usage = Usage()
        return local.usage

    def put(self: Any, value: Usage) -> None:
        local.usage = value

    prm.__dict__.pop("usage", None)
    prm.__class__ = type(cls.__name__, (cls,), {"usage": property(get, put), "_usage_per_thread": True,
                                                "__module__": cls.__module__})
    return prm


class LastStepOnly:
    """A reward model that scores only the last of each item's unscored steps (the
    solution so far, whole) and gives that score to the earlier unscored steps too.
    A selection that aggregates by the last step ("last", the default) is unchanged,
    at one reward-model call per candidate instead of one per step: the server uses it
    for such requests, since it keeps no step scores."""

    def __init__(self, prm: Any):
        self.prm = prm

    def __getattr__(self, name: str) -> Any:
        if name == "prm":
            raise AttributeError(name)
        return getattr(self.prm, name)

    @property
    def usage(self) -> Usage:
        return self.prm.usage

    def score(self, items: list[Any]) -> list[list[float]]:
        from ..rewards.base import Scoring

        trimmed = [Scoring(it.question, it.steps, max(it.known, len(it.steps) - 1)) for it in items]
        scores = self.prm.score(trimmed)
        return [[s[-1]] * (len(it.steps) - it.known) if s else [] for it, s in zip(items, scores)]


class Runner:
    """Runs jobs on worker threads against the shared engine."""

    def __init__(self, shared: SharedEngine, judge: Any, policy: Any, workers: int):
        self.shared, self.judge, self.policy = shared, per_thread_usage(judge), policy
        self.last_step_judge = LastStepOnly(self.judge) if self.judge is not None else None
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="testtime-serve")
        self.keys = AnswerKeys()

    def run(self, job: Job, push: Callable[[tuple], None]) -> None:
        try:
            with self.shared.serving(job.ticket):
                if job.strategy == SAMPLE:
                    self._sample(job, push)
                elif job.strategy == POLICY:
                    self._policy(job)
                else:
                    self._strategy(job)
        finally:
            push(("done",))

    def _context(self, job: Job, judge: Any = None) -> SearchContext:
        from ..prompts import PromptTemplate

        return SearchContext(self.shared, judge, PromptTemplate("serve", user="{question}"), job.sampling, 0)

    def _sample(self, job: Job, push: Callable[[tuple], None]) -> None:
        """One sample, streamed token by token when asked (the engine's `on_token`)."""
        p = job.problem()
        stream = job.stream and getattr(self.shared, "streams_text", False)
        req = EngineRequest(key=0, seeds=(sample_seed(0, p.id, 0),), params=job.sampling,
                            on_token=(lambda i, text: push(("token", text))) if stream else None,
                            **self._context(job).prefix(p))
        [c] = list(self.shared.generate([req]))
        job.usage += Usage.of(c.prompt_tokens, c.cached_tokens, c.completion_tokens)
        self._finish(job, SAMPLE, [Candidate(c.text, c.seed, c.completion_tokens, c.finish_reason, c.prompt_tokens)])

    def _strategy(self, job: Job) -> None:
        impl = STRATEGIES.get(job.strategy)
        judge = self.last_step_judge if getattr(job.params, "aggregation", None) == "last" else self.judge
        results = list(impl().run([job.problem()], self._context(job, judge), job.params))
        if not results:
            raise RuntimeError(f"{job.strategy} returned no result for this request")
        res = results[0]
        self._add_usage(job, res)
        self._finish(job, job.strategy, res.candidates, {"decision": res.decision} if res.decision else None,
                     getattr(job.params, "aggregation", "last"))

    def _policy(self, job: Job) -> None:
        """The `policy` strategy on one request: probe, bin, and the bin's choice."""
        from ..strategies.policy import run_policy

        [res] = list(run_policy([job.problem()], self._context(job, self.judge), self.policy, job.n))
        self._add_usage(job, res)
        d = res.decision
        self._finish(job, d["strategy"], res.candidates,
                     {"policy": {"bin": d["bin"], "choice": f"{d['choice']} N={d['n']}"}},
                     d["params"].get("aggregation", "last"))

    @staticmethod
    def _add_usage(job: Job, res: ProblemResult) -> None:
        for u in res.usage.values():
            job.usage += u

    def _finish(self, job: Job, strategy: str, candidates: list[Candidate], extra: dict[str, Any] | None = None,
                aggregation: str = "last") -> None:
        if not candidates:
            raise RuntimeError(f"{strategy} finished this request without a candidate")
        pick = choose(strategy, candidates, self.keys, aggregation)
        answers = [self.keys.of_text(c.text) for c in candidates]
        chosen, best = answers[pick], candidates[pick]
        split = getattr(STRATEGIES.get(strategy), "reply", None) if strategy in STRATEGIES else None
        text, reasoning = split(best.text) if split is not None else (best.text, None)
        job.result = {"text": text, **({"reasoning": reasoning} if reasoning else {}),
                      "finish_reason": best.finish_reason if best.finish_reason in ("stop", "length")
                      else "stop", "votes": sum(k == chosen for k in answers) if chosen is not None else 0,
                      "candidates": len(answers), **(extra or {})}


# -- responses --------------------------------------------------------------------

def _error(e: BadRequest) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers=e.headers)


def _usage_body(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": int(u.prompt), "completion_tokens": int(u.decode), "total_tokens": int(u.prompt + u.decode),
            "prompt_tokens_details": {"cached_tokens": int(u.prompt - u.prefill)}}


def _testtime(job: Job) -> dict[str, Any]:
    r = job.result or {}
    return {"strategy": job.strategy, "n": job.n, "votes": r.get("votes", 0), "candidates": r.get("candidates", 0),
            **{k: r[k] for k in ("policy", "decision") if k in r}}


def _reply(job: Job, rid: str, chat: bool) -> dict[str, Any]:
    r = job.result
    message = {"role": "assistant", "content": r["text"], **({"reasoning": r["reasoning"]} if "reasoning" in r else {})}
    choice = ({"index": 0, "message": message} if chat else
              {"index": 0, "text": r["text"]})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": job.model, "choices": [{**choice, "finish_reason": r["finish_reason"], "logprobs": None}],
            "usage": _usage_body(job.usage), "testtime": _testtime(job)}


async def _disconnected(receive: Callable) -> None:
    """Returns once the client has gone (the body was read before this is awaited)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """Server-sent events from an async iterator, watching the client all the while: if it
    goes away the iterator is cancelled at once (not at the next write)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_disconnect: Callable[[], None]):
        self.events, self.on_disconnect = events, on_disconnect
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def pump() -> None:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        writer, watcher = asyncio.ensure_future(pump()), asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                self.on_disconnect()
            elif writer.exception() is not None:
                self.on_disconnect()
                if not isinstance(writer.exception(), OSError):
                    raise writer.exception()
        finally:
            for t in (writer, watcher):
                t.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
            await self.events.aclose()


# -- the application --------------------------------------------------------------

class Server:
    """The state behind the routes."""

    def __init__(self, shared: SharedEngine, judge: Any, policy: Any, config: ServeConfig):
        self.shared, self.judge, self.policy, self.config = shared, judge, policy, config
        self.runner = Runner(shared, judge, policy, config.max_queue)
        self.metrics = ServeMetrics(shared, self)
        self.admitted = 0
        # independent samples first (the common case), then the step-wise strategies
        self.servable = sorted((s for s in STRATEGIES.names()
                                if s != POLICY and (judge is not None or not STRATEGIES.get(s).needs_prm)),
                               key=lambda s: (not trait(s, "independent"), trait(s, "selection") == "weighted", s))

    # -- routes --

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "requests": self.admitted, "samples_running": self.shared.inflight,
                             "samples_waiting": self.shared.waiting})

    async def models(self, request: Request) -> JSONResponse:
        names = [SAMPLE] + [f"{s}@{n}" for s in self.servable for n in (4, 8, 16)]
        if self.policy is not None:
            names += [f"policy@{b}" for b in self.policy.budgets]
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "testtime"}
                                                        for m in names]})

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, False)

    async def _body(self, request: Request) -> Any:
        limit = self.config.max_body
        declared = request.headers.get("content-length")
        data, over, drained = bytearray(), declared is not None and declared.isdigit() and int(declared) > limit, 0
        async for chunk in request.stream():
            if over:  # read on without keeping it (up to a bound), so that the client sees
                drained += len(chunk)  # the 413 rather than a connection reset mid-upload
                if drained > DRAIN_LIMIT:
                    break
                continue
            data += chunk
            if len(data) > limit:
                over, data = True, bytearray()
        if over:
            raise BadRequest(f"the request body is over {limit} bytes, this server's limit", status=413,
                             code="body_too_large")
        try:
            return json.loads(data or b"null")
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"the body is not JSON: {str(e)[:200] or type(e).__name__}") from None

    def _check(self, job: Job) -> None:
        if job.strategy in STRATEGIES and STRATEGIES.get(job.strategy).needs_prm and self.judge is None:
            raise BadRequest(f"{job.strategy} needs a judge, and this server has none", "model")
        needs = getattr(STRATEGIES.get(job.strategy), "needs_engine", None) if job.strategy in STRATEGIES else None
        if needs and not getattr(self.shared, needs, False):
            raise BadRequest(f"{job.strategy} needs an engine with {needs}; this server's "
                             f"{getattr(self.shared, 'name', 'engine')} has not", "model")
        if job.strategy == POLICY and self.policy is None:
            raise BadRequest("this server has no policy (start it with --policy FILE)", "model", 404,
                             "model_not_found")

    def _fits(self, job: Job) -> None:
        """The prompt plus max_tokens must fit in one of the engine's sequences (checked
        before admission, so a stream never starts for a request that cannot run)."""
        check = getattr(self.shared.engine, "check_request", None)
        if check is None:
            return
        req = EngineRequest(key="request", seeds=(0,), params=job.sampling,
                            **self.runner._context(job).prefix(job.problem()))
        try:
            check(req)
        except InputError as e:
            raise BadRequest(str(e).replace("request 'request': ", ""), "max_tokens") from None

    def _admissible(self) -> None:
        if self.admitted >= self.config.max_queue:
            raise BadRequest(f"the server has {self.admitted} requests in hand (its limit); retry shortly",
                             status=429, code="server_busy", headers={"Retry-After": str(self.config.retry_after_s)})

    async def _complete(self, request: Request, chat: bool) -> Response:
        started = time.perf_counter()
        try:
            body = validate(ChatBody if chat else CompletionBody, await self._body(request))
            job = parse_job(body, self.config.limits)
            self._check(job)
            self._admissible()  # before tokenizing, and again after (others may have come in meanwhile)
            await asyncio.get_running_loop().run_in_executor(None, self._fits, job)
            self._admissible()
        except BadRequest as e:
            self.metrics.request("invalid", e.status, time.perf_counter() - started)
            return _error(e)
        except ClientDisconnect:
            return Response(status_code=499)
        request.state.strategy = job.strategy
        self.admitted += 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple] = asyncio.Queue()

        def push(ev: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ev)

        if job.stream and job.strategy != SAMPLE:
            job.ticket.on_completion = lambda c: push(("progress", c.completion_tokens))
        future = loop.run_in_executor(self.runner.pool, self.runner.run, job, push)

        def release(f: Any) -> None:
            self.admitted -= 1
            status = 200 if f.exception() is None and not job.ticket.cancelled else 499 if job.ticket.cancelled else 500
            self.metrics.request(job.strategy, status, time.perf_counter() - started, job)

        future.add_done_callback(release)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        request.state.usage = job.usage  # filled in place as the job runs
        if job.stream:
            return EventStream(self._events(job, future, events, rid, chat), job.ticket.cancel)
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({future, watcher}, timeout=self.config.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if future not in done:
            job.ticket.cancel()
            if watcher in done:
                return Response(status_code=499)
            return _error(BadRequest(f"no answer within {self.config.timeout_s} s", status=504, code="timeout"))
        error = future.exception()
        if error is not None:
            return _error(_failure(error))
        return JSONResponse(_reply(job, rid, chat))

    async def _events(self, job: Job, future: Any, events: asyncio.Queue, rid: str, chat: bool) -> AsyncIterator[str]:
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": job.model}

        def chunk(delta: str | None = None, finish: str | None = None, first: bool = False) -> str:
            if chat:
                d = ({"role": "assistant", "content": ""} if first else {} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps(base | {'choices': [choice]})}\n\n"

        try:
            if chat:
                yield chunk(first=True)
            sent, samples, tokens = "", 0, 0
            deadline = time.monotonic() + self.config.timeout_s
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    job.ticket.cancel()
                    yield f"data: {json.dumps(BadRequest(f'no answer within {self.config.timeout_s} s', status=504, code='timeout').body())}\n\n"
                    return
                if ev[0] == "token":
                    sent += ev[1]
                    yield chunk(ev[1])
                elif ev[0] == "progress":
                    samples, tokens = samples + 1, tokens + ev[1]
                    yield f": progress samples={samples} tokens={tokens}\n\n"
                else:
                    break
            try:
                await future  # "done" is pushed as the job's thread ends; its future settles next
                error = None if job.result is not None else RuntimeError("the strategy gave no answer")
            except Exception as e:
                error = e
            if error is not None:
                yield f"data: {json.dumps(_failure(error).body())}\n\n"
                return
            text = job.result["text"]
            if chat and "reasoning" in job.result:  # the thought of thought_response, before the answer
                choice = {"index": 0, "delta": {"reasoning": job.result["reasoning"]}, "finish_reason": None,
                          "logprobs": None}
                yield f"data: {json.dumps(base | {'choices': [choice]})}\n\n"
            rest = text[len(sent):] if text.startswith(sent) else ""
            if rest:
                yield chunk(rest)
            final = base | {"choices": [{"index": 0, "delta" if chat else "text": {} if chat else "",
                                         "finish_reason": job.result["finish_reason"], "logprobs": None}],
                            "testtime": _testtime(job)}
            yield f"data: {json.dumps(final)}\n\n"
            if job.include_usage:
                yield f"data: {json.dumps(base | {'choices': [], 'usage': _usage_body(job.usage)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not future.done():
                job.ticket.cancel()


def _failure(error: BaseException) -> BadRequest:
    if isinstance(error, InputError):
        return BadRequest(str(error))
    return BadRequest(f"the engine failed: {error}", status=502, code="upstream_error")


def make_app(engine: Any, judge: Any = None, policy: Any = None, config: ServeConfig | None = None) -> Starlette:
    """The ASGI app. engine: any `Engine` (wrapped in a `SharedEngine` unless it is one;
    a judge that draws from the same engine must be built on the shared one). policy: a
    `testtime.policy.Policy` with predicted difficulty (needs the judge)."""
    config = config or ServeConfig()
    if policy is not None:
        if policy.difficulty is None or policy.difficulty.kind != "predicted":
            raise InputError("serve needs a policy whose difficulty is predicted (testtime optimal --difficulty "
                             "predicted): oracle difficulty needs reference answers, which requests do not have")
        if judge is None:
            raise InputError("a policy needs the judge (its difficulty is the judge's score of probe samples)")
        from ..optimal import policy_candidates

        policy_candidates(policy)  # a policy file this version cannot run fails here, not per request
    shared = engine if isinstance(engine, SharedEngine) else SharedEngine(engine)
    server = Server(shared, judge, policy, config)
    routes = [Route("/health", server.health, methods=["GET"]),
              Route("/metrics", server.metrics.route, methods=["GET"])]
    for prefix in ("/v1", ""):
        routes += [Route(f"{prefix}/models", server.models, methods=["GET"]),
                   Route(f"{prefix}/chat/completions", server.chat, methods=["POST"]),
                   Route(f"{prefix}/completions", server.completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.server = server
    app.add_middleware(AccessLog)
    if config.api_key:
        app.add_middleware(ApiKey, key=config.api_key)
    return app


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return _error(BadRequest(f"no route {request.method} {request.url.path}", status=404, code="not_found"))


async def _not_allowed(request: Request, exc: Exception) -> JSONResponse:
    return _error(BadRequest(f"{request.method} is not allowed on {request.url.path}", status=405,
                             code="method_not_allowed"))


class ApiKey:
    """Every route but /health needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/") != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            given = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                e = BadRequest("a valid API key is needed: Authorization: Bearer <key>", status=401,
                               code="invalid_api_key")
                return await _error(e)(scope, receive, send)
        await self.app(scope, receive, send)


class AccessLog:
    """One JSON line per request on the `testtime.serve.access` logger."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            state = scope.get("state") or {}
            usage = state.get("usage")
            log.info(json.dumps({
                "ts": round(time.time(), 3), "client": (scope.get("client") or ("", 0))[0],
                "method": scope["method"], "path": scope["path"], "status": status[0] or 499,
                "ms": round(1000 * (time.perf_counter() - t0), 1), "strategy": state.get("strategy"),
                **({"prompt_tokens": int(usage.prompt), "completion_tokens": int(usage.decode)} if usage else {})}))
