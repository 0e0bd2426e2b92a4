"""The engine protocol: requests in, completions out, as they finish.

A request asks for `len(seeds)` samples from one prefix. The prefix is a chat
(`messages`, rendered once with the model's own chat template) optionally
followed by a partial assistant message (`continuation`) that generation
resumes from without re-templating; or a raw `prompt` string for base models.
Engines stream completions back in whatever order they finish, so callers can
store each sample the moment it exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

from ..registry import Registry
from ..spec import SamplingParams


@dataclass(frozen=True)
class Request:
    """n samples from one prefix; one seed per sample, so sample i is reproducible alone."""

    key: Any
    """Caller's handle, returned on every completion of this request."""
    seeds: tuple[int, ...]
    params: SamplingParams
    messages: tuple[dict[str, str], ...] | None = None
    """Chat messages, rendered with the model's chat template and a generation prompt."""
    continuation: str = ""
    """Partial assistant text appended verbatim after the generation prompt."""
    prompt: str | None = None
    """Raw text prompt, used as is (no chat template); excludes `messages`."""
    retain: bool = False
    """A hint that requests continuing these samples will follow (step-wise search):
    an engine with a prefix cache keeps each finished sample's KV cache, so the
    continuation computes only what is new. Never changes the text generated."""
    stop_below: tuple[float, int] | None = None
    """(threshold, window): end a sample once the mean token confidence of its last
    `window` tokens falls below threshold (DeepConf online), with finish reason
    "low_confidence". Only engines with `stops_on_confidence = True` honour it."""
    cancelled: Callable[[], bool] | None = field(default=None, compare=False)
    """Asked by the engine as it works; once it returns True the request's samples not yet
    started never start (each is yielded with finish reason "cancelled" and no tokens) and
    those running end with "cancelled", reporting the tokens they generated. Adaptive
    strategies cancel a problem's outstanding samples once its answer is decided. Engines
    that can stop a running sample have `cancels = True`; the others skip only samples
    not yet started."""
    on_token: Callable[[int, str], None] | None = field(default=None, compare=False)
    """Called as (sample index, new text) while a sample is generated, for streaming to a
    client. The pieces of a sample join to a prefix of its final text, never more: a
    token that ends the sample (EOS, a stop string, the length limit) is not passed, and
    text that might begin a stop string is held back until it is settled. Engines that
    stream text have `streams_text = True`; the others never call it. Must be quick and
    must not raise: it runs on the engine's thread between decode steps."""

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a request needs exactly one of messages or prompt")
        if not self.seeds:
            raise ValueError(f"request {self.key!r} asks for no samples (seeds is empty)")
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))
            for m in self.messages:
                if set(m) < {"role", "content"}:
                    raise ValueError(f"request {self.key!r}: each message needs 'role' and 'content', got {m}")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)


@dataclass
class Completion:
    key: Any
    index: int
    """Position of this sample's seed in the request's seeds."""
    seed: int
    text: str
    token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int | None
    """Prompt tokens this sample did not compute itself (served from a shared KV cache);
    None when the engine cannot tell (a server that does not report it)."""
    finish_reason: str
    """'stop' (EOS or a stop string) or 'length' (max_tokens reached); 'low_confidence' when
    the request's `stop_below` ended it; 'abort', 'error' or 'repetition' when the engine,
    not the model, ended the sample."""
    logprobs: list[TokenLogprob] | None = None
    latency_s: float = 0.0
    stop_hit: str | None = None
    """The stop string that ended the sample, if one did (step-wise search tells a
    finished step from a finished solution this way)."""
    n_tokens: int | None = None
    """Generated tokens, for engines that report a count but not the ids (servers)."""
    reasoning: str | None = None
    """Text a server's reasoning parser split off from `text` (vLLM's `message.reasoning`)."""
    token_stats: Any = None
    """Per generated token, `testtime.confidence.FIELDS` as a (tokens, 3) float32 array,
    from engines that see the logits (llama.cpp); None elsewhere (the runner derives
    them from top log-probabilities where a server returned those)."""

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids) if self.n_tokens is None else self.n_tokens


class Engine(Protocol):
    name: str

    def generate(self, requests: Iterable[Request | None]) -> Iterator[Completion]:
        """Generate every sample of every request; yield each when it finishes.
        Requests are read lazily, so a long stream keeps the batch full. A None in the
        stream means "nothing to add yet": the engine goes on with the work it has and
        asks again once it has yielded more (a strategy whose next requests depend on
        results still running). A stream that waits while nothing is running is an
        error (`StreamStalled`), never a hang."""
        ...

    def identity(self) -> dict[str, Any]:
        """What about this engine changes outputs (model fingerprint...), for the run id."""
        ...

    def close(self) -> None: ...


class StreamStalled(RuntimeError):
    """The request stream said "wait" while no sample was running: nothing could change."""


def is_cancelled(req: Request) -> bool:
    return req.cancelled is not None and bool(req.cancelled())


def never_started(req: Request, index: int) -> Completion:
    """The completion of a cancelled request's sample that never started: no tokens."""
    return Completion(key=req.key, index=index, seed=req.seeds[index], text="", token_ids=[], prompt_tokens=0,
                      cached_tokens=0, finish_reason="cancelled")


ENGINES: Registry[Callable[..., Engine]] = Registry("engine")


def load_engine(name: str, **kwargs: Any) -> Engine:
    return ENGINES.build(name, **kwargs)
