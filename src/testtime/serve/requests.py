"""Served requests: typed bodies, checked into a `Job` with every error naming its parameter."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..flops import Usage
from ..searchspec import DEFAULT_STRATEGY
from ..spec import SamplingParams, SpecError
from ..strategies.base import STRATEGIES, StrategyParams, strategy_params
from ..tasks.base import Problem
from .scheduler import Ticket

SAMPLE, POLICY = "sample", "policy"
"""Model names served apart from the registry: one plain sample, and the server's own policy
file (the registered `policy` strategy, with the file the server was started with; a
request can never name a file)."""
_MODEL = re.compile(r"^([a-z_]+)(?:@(\d+))?$")


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.param, self.status, self.code, self.headers = param, status, code, headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# -- typed bodies -------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class TesttimeField(_Body):
    """The `testtime` body field: a strategy, its budget N and its parameters."""

    strategy: str | None = None
    n: int | None = Field(None, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)


class _Common(_Body):
    model: str = ""
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None)
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    testtime: TesttimeField | None = None

    def stops(self) -> tuple[str, ...]:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > 4 or any(not s for s in stop):
            raise BadRequest("stop takes at most 4 non-empty strings", "stop")
        return stop


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Common):
    prompt: str | list[str]


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "TextPart", "StreamOptions", "TesttimeField"}
"""Entries pydantic puts in an error's location for a union member, not a field."""


def validate(model: type[_Body], data: Any) -> Any:
    """A body as `model`, or BadRequest naming the first field that is wrong."""
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"] if not ("[" in str(x) or str(x) in _TYPE_NAMES)]
        param = ".".join(loc) or None
        raise BadRequest(f"{param or 'body'}: {err['msg']}" + (f" (got {err['input']!r:.60})" if loc else ""),
                         param) from None


# -- jobs -----------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """Per-request caps a server enforces (400 beyond them)."""

    max_n: int = 64
    max_tokens: int = 4096
    max_budget: int = 64 * 1024
    """Most tokens a request may ask the engine to generate: n x max_tokens."""


@dataclass(eq=False)
class Job:
    strategy: str
    """A registered strategy, `sample` or `policy`."""
    n: int
    params: StrategyParams | None
    """The strategy's parameters at budget n (None for a policy: its choice decides)."""
    sampling: SamplingParams
    seed: int
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    """A completions request's raw prompt (no chat template)."""
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    ticket: Ticket = field(default_factory=Ticket)
    usage: Usage = field(default_factory=Usage)
    result: dict[str, Any] | None = None

    def problem(self) -> Problem:
        """The request as a problem: its own chat (or raw prompt), the last user turn as the
        question (for the judge), and an id from the seed, so a request's samples depend on
        its seed only."""
        if self.prompt is not None:
            return Problem(f"request-{self.seed}", self.prompt, None, meta={"prompt": self.prompt})
        question = next((m["content"] for m in reversed(self.messages or []) if m["role"] == "user"), "")
        return Problem(f"request-{self.seed}", question, None, meta={"messages": tuple(self.messages or ())})


def _check_turns(msgs: list[dict[str, str]]) -> None:
    """A policy's probe and choice need a chat that ends with the user's turn."""
    system = msgs[0]["role"] == "system"
    rest = msgs[1:] if system else msgs
    if len(rest) % 2 != 1 or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(rest)):
        raise BadRequest("a policy request needs an optional system turn, then user and assistant turns "
                         "alternating, ending with the user's", "messages")


def _strategy(body: _Common, limits: Limits) -> tuple[str, int]:
    extra = body.testtime or TesttimeField()
    m = _MODEL.match(body.model)
    known = [SAMPLE, POLICY] + STRATEGIES.names()
    if extra.strategy:
        strategy, n = extra.strategy, extra.n or 8
        if strategy not in known:
            raise BadRequest(f"unknown strategy {strategy!r}; known: {', '.join(known)}", "testtime.strategy")
    elif m and m.group(1) in known:
        strategy, n = m.group(1), int(m.group(2) or (1 if m.group(1) == SAMPLE else 8))
    else:
        raise BadRequest(f"model {body.model!r} names no strategy; use sample, policy@B or NAME@N for a strategy "
                         f"({', '.join(STRATEGIES.names())}), or the 'testtime' body field", "model", 404,
                         "model_not_found")
    if not 1 <= n <= limits.max_n:
        raise BadRequest(f"n must be an integer in [1, {limits.max_n}], got {n!r}", "testtime.n")
    return strategy, n


def parse_job(body: _Common, limits: Limits) -> Job:
    """A validated body as a job: its strategy from the model name or `testtime`, its
    sampling over testtime's defaults (a truncated sampler), and the server's caps."""
    strategy, n = _strategy(body, limits)
    if body.n != 1:
        raise BadRequest("n > 1 choices is not supported: the server returns one answer chosen from its samples",
                         "n")
    msgs, prompt = None, None
    if isinstance(body, ChatBody):
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if strategy == POLICY:
            _check_turns(msgs)
    else:
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt[:1])
        if isinstance(body.prompt, list) and len(body.prompt) != 1:
            raise BadRequest("prompt must be one string (or a list of exactly one)", "prompt")
        if strategy in (POLICY, "revision"):
            raise BadRequest(f"{strategy} needs a chat: use /v1/chat/completions", "model")
    max_tokens = (getattr(body, "max_completion_tokens", None) or body.max_tokens
                  or min(512, limits.max_tokens))
    if max_tokens > limits.max_tokens:
        raise BadRequest(f"max_tokens must be at most {limits.max_tokens} on this server, got {max_tokens}",
                         "max_tokens")
    if strategy != POLICY and n * max_tokens > limits.max_budget:
        raise BadRequest(f"n x max_tokens = {n} x {max_tokens} = {n * max_tokens} tokens is over this server's "
                         f"budget of {limits.max_budget} per request", "max_tokens")
    default = SamplingParams()
    try:
        sampling = SamplingParams(
            temperature=body.temperature if body.temperature is not None else
            (1.0 if strategy == SAMPLE else default.temperature),
            top_p=body.top_p if body.top_p is not None else default.top_p,
            top_k=body.top_k if body.top_k is not None else default.top_k,
            min_p=body.min_p if body.min_p is not None else default.min_p,
            max_tokens=max_tokens, stop=body.stops())
    except SpecError as e:
        raise BadRequest(str(e)) from None
    params = None
    if strategy != POLICY:
        values = (body.testtime.params if body.testtime else {}) or {}
        try:
            params = strategy_params(DEFAULT_STRATEGY if strategy == SAMPLE else strategy, {**values, "n": n})
        except SpecError as e:
            raise BadRequest(str(e), "testtime.params") from None
    seed = body.seed if body.seed is not None else int(uuid.uuid4().int % 2 ** 31)
    return Job(strategy, n, params, sampling, seed, messages=msgs, prompt=prompt, stream=body.stream,
               include_usage=bool(body.stream_options and body.stream_options.include_usage),
               model=body.model or strategy, ticket=Ticket(size=n))
