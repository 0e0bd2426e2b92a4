"""Any OpenAI-compatible server as an engine: vLLM, SGLang, llama.cpp's server,
Ollama, hosted APIs.

Built on the official `openai` client (async), which retries with exponential
backoff on connection errors, timeouts, 408, 409, 429 and 5xx. On top of it:

- **Bounded concurrency**: at most `concurrency` calls in flight; requests are
  read lazily, so a long stream never builds a backlog in memory.
- **Every sampling field the run records is sent**, neutral values included
  (top_k 0, min_p 0, no repetition penalty). A server fills what a request
  leaves out from its own defaults: vLLM from the model's
  `generation_config.json` (Qwen2.5-Instruct ships top_k=20 and
  repetition_penalty=1.05), llama-cpp-python from its own (top_k=40,
  min_p=0.05, repeat_penalty=1.1); the stored settings would then not be the
  ones used.
- **One call per sample by default**, each with its own seed, so sample i is
  reproducible alone and a resumed run draws exactly what is missing (the
  protocol's promise). `n_per_request=True` asks for n samples in one call;
  vLLM then seeds choice j with `seed + j`, and that is the seed stored with
  it (samples then depend on their batch). Greedy requests always go one per
  call (vLLM rejects n > 1 at temperature 0). A server that answers with fewer
  choices (llama.cpp's) gets the rest asked one by one.
- **Continuing a partial assistant message** (step-wise search) without
  re-templating: `continuation="completions"` renders the chat with the
  model's chat template (given, or read from llama.cpp's `/props`) and sends
  the text plus the continuation to the completions endpoint with
  `add_special_tokens: false`, since a rendered template already holds the
  BOS it wants (Llama 3, Gemma and Mistral templates print it);
  `continuation="vllm"` asks a vLLM server's `/tokenize` for the token ids of
  the chat (its own template, generation prompt added) and of the
  continuation, and sends the ids. Nothing is re-templated or trimmed: vLLM's
  `continue_final_message` drops trailing whitespace when a template trims
  message content, so a step ending in its delimiter would stop at once.
- **Stopping on confidence and cancelling** (DeepConf online, adaptive
  strategies): a request with `stop_below` is streamed, one sample per call,
  with the top 20 log-probabilities of every token (vLLM's default
  `--max-logprobs`); once the mean confidence of its last `window` tokens falls
  below the threshold the stream is closed, and vLLM aborts a request whose
  client went away (`AsyncLLM.generate` aborts on cancellation). A cancelled
  request (`Request.cancelled`) is never sent again, and its calls in flight are
  dropped the same way. A request with `on_token` (`testtime serve` streaming a
  sample) is streamed too, its text passed on as the server sends it.
- **Clear errors**: an unreachable server, or a model name the server does not
  serve (with the names it does), stop the run with an `EngineError`. Samples
  already returned are stored by the caller, so a rerun resumes. Finish
  reasons `abort`, `error` and `repetition` (vLLM's) are passed on as they are;
  the runner treats them as infrastructure failures, never as answers.

Token counts come from the server's `usage` (prompt, completion, and cached
prompt tokens when reported: vLLM reports them only with
`--enable-prompt-tokens-details`; otherwise they are unknown, not 0). Which
stop string ended a sample is read from vLLM's `stop_reason` when present. A
`--reasoning-parser` server's `message.reasoning` is kept with the sample.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any, Iterable, Iterator

from ..confidence import TOP_K, from_logprobs, from_top_logprobs
from ..errors import InfrastructureError, InputError
from ..spec import SpecError
from .base import ENGINES, Completion, Request, StreamStalled, TokenLogprob, is_cancelled, never_started
from .chat import ChatTemplate, TemplateError, read_template

MAX_TEMPERATURE = 2.0
"""The OpenAI API's bound, which vLLM enforces ("temperature must be in [0, 2]")."""


class EngineError(InfrastructureError):
    """The server could not produce samples (unreachable, unknown model, bad request)."""


@ENGINES.register("openai")
class OpenAIEngine:
    name = "openai"
    cancels = True
    stops_on_confidence = True
    """A request with `stop_below` is streamed and dropped once its confidence falls (`_stream`)."""
    streams_text = True
    """A request with `on_token` is streamed, one sample per call, its text passed on as it comes."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", model: str | None = None,
                 api_key: str | None = None, concurrency: int = 16, max_retries: int = 5, timeout_s: float = 300.0,
                 n_per_request: bool = False, continuation: str = "completions", chat_template: str | None = None,
                 shape: Any = None):
        """
        base_url: the server's OpenAI root, e.g. http://host:8000/v1.
        model: the served model's name [default: the only one /models lists].
        api_key: [default: $OPENAI_API_KEY, else "none" for local servers].
        concurrency: most calls in flight.
        continuation: "completions" (render the chat template here) or "vllm" (continue_final_message).
        chat_template: for "completions": Jinja source, or a path to the model's .gguf file or Hugging
            Face tokenizer_config.json to read it from [default: llama.cpp's /props, else an error when needed].
        shape: the model's `flops.ModelShape`, for FLOPs accounting.
        """
        import openai

        if continuation not in ("completions", "vllm"):
            raise InputError(f"continuation must be 'completions' or 'vllm', got {continuation!r}")
        if concurrency < 1:
            raise InputError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.concurrency, self.n_per_request, self.continuation_mode = concurrency, n_per_request, continuation
        self.max_retries, self.timeout_s = max_retries, timeout_s
        self._openai = openai
        self._template_source, self._bos = None, ""
        if chat_template:
            self._template_source, self._bos = _template_source(chat_template)
        self._token_ids: dict[Any, list[int]] = {}  # continuation="vllm": /tokenize results
        self._prompt_tokens: dict[str, int] = {}  # what the server reported per prompt (for aborted streams)
        self._shape = shape
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-engine", daemon=True)
        self._thread.start()
        self._client = self._call(self._make_client())
        self.model = model or self._only_model()

    async def _make_client(self):
        return self._openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=self.max_retries,
                                        timeout=self.timeout_s)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _served(self) -> list[str]:
        try:
            async def names() -> list[str]:
                return [m.id async for m in self._client.models.list()]

            return self._call(names())
        except self._openai.APIConnectionError:
            raise EngineError(f"OpenAI-compatible server at {self.base_url} is unreachable "
                              f"(after {self.max_retries} retries)") from None
        except self._openai.APIStatusError as e:
            raise EngineError(f"server at {self.base_url} answered HTTP {e.status_code} to GET /models: {e.message}") from None

    def _only_model(self) -> str:
        names = self._served()
        if len(names) != 1:
            raise EngineError(f"server at {self.base_url} serves {len(names)} models ({', '.join(names) or 'none'}); "
                              "name one with model=...")
        return names[0]

    def identity(self) -> dict[str, Any]:
        ident = {"engine": "openai", "model": self.model}
        if self._template_source:
            ident["chat_template"] = hashlib.sha256(self._template_source.encode()).hexdigest()[:12]
        return ident

    def shape(self) -> Any:
        return self._shape

    # -- the chat template, for continuations -----------------------------------

    def _template(self) -> ChatTemplate:
        if self._template_source is None:
            root = self.base_url.removesuffix("/v1")
            try:
                with urllib.request.urlopen(f"{root}/props", timeout=10) as r:
                    props = json.loads(r.read())
                self._template_source = props.get("chat_template") or None
                self._bos = props.get("bos_token") or ""
            except (OSError, ValueError):
                self._template_source = None
            if not self._template_source:
                raise EngineError(f"continuing a partial assistant message needs the model's chat template: pass "
                                  f"chat_template=..., or continuation='vllm' for a vLLM server ({self.base_url} "
                                  "has no llama.cpp /props to read it from)")
        return ChatTemplate(self._template_source, bos_token=self._bos)

    # -- one call -------------------------------------------------------------------

    def _body(self, req: Request, seed: int, n: int) -> tuple[str, dict[str, Any]]:
        p = req.params
        body: dict[str, Any] = {"model": self.model, "temperature": p.temperature, "top_p": p.top_p,
                                "max_tokens": p.max_tokens, "seed": seed, "n": n,
                                "presence_penalty": 0.0, "frequency_penalty": 0.0}
        if p.stop:
            body["stop"] = list(p.stop)
        # vLLM's names, then llama.cpp's for the same penalty: unsent, each server uses its own default
        extra: dict[str, Any] = {"top_k": p.top_k, "min_p": p.min_p, "repetition_penalty": 1.0,
                                 "repeat_penalty": 1.0}
        if req.prompt is not None or (req.continuation and self.continuation_mode == "completions"):
            if req.prompt is not None:
                body["prompt"] = req.prompt
            else:
                body["prompt"] = self._template().render(req.messages, add_generation_prompt=True) + req.continuation
                extra["add_special_tokens"] = False  # the rendered template holds its own BOS
            if p.logprobs is not None:
                body["logprobs"] = max(1, p.logprobs)
            kind = "completions"
        elif req.continuation:  # continuation="vllm": token ids from the server's own tokenizer
            body["prompt"] = self._token_ids[_ids_key(req)]
            if p.logprobs is not None:
                body["logprobs"] = max(1, p.logprobs)
            kind = "completions"
        else:
            body["messages"] = [dict(m) for m in req.messages]
            if p.logprobs is not None:
                body["logprobs"] = True
                body["top_logprobs"] = p.logprobs
            kind = "chat"
        body["extra_body"] = extra
        return kind, body

    async def _tokenize(self, req: Request) -> None:
        """Token ids of a chat (the server's template, generation prompt added) followed
        by the continuation tokenized on its own, from a vLLM server's /tokenize."""
        key = _ids_key(req)
        if key in self._token_ids:
            return
        root = self.base_url.removesuffix("/v1")
        chat = await asyncio.to_thread(self._tokenize_call, root, {
            "model": self.model, "messages": [dict(m) for m in req.messages], "add_generation_prompt": True})
        cont = await asyncio.to_thread(self._tokenize_call, root, {
            "model": self.model, "prompt": req.continuation, "add_special_tokens": False})
        self._token_ids[key] = chat + cont

    def _tokenize_call(self, root: str, body: dict[str, Any]) -> list[int]:
        req = urllib.request.Request(f"{root}/tokenize", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return [int(t) for t in json.loads(r.read())["tokens"]]
        except urllib.error.HTTPError as e:
            raise EngineError(f"continuation='vllm' needs a vLLM server's /tokenize; {root}/tokenize answered "
                              f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EngineError(f"server at {root} did not answer /tokenize usably: {e}") from None

    async def _sample(self, req: Request, indices: list[int]) -> list[Completion]:
        """Samples `indices` of a request in one call (one seed: the first's)."""
        seed = req.seeds[indices[0]]
        if req.continuation and req.prompt is None and self.continuation_mode == "vllm":
            await self._tokenize(req)
        kind, body = self._body(req, seed, len(indices))
        t = time.perf_counter()
        resp = await self._create(kind, body)
        latency = time.perf_counter() - t
        usage = resp.usage
        prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
        self._prompt_tokens[_prompt_key(body)] = prompt_tokens
        details = getattr(usage, "prompt_tokens_details", None)
        reported = getattr(details, "cached_tokens", None) if details is not None else None
        cached = None if reported is None else min(prompt_tokens, int(reported))  # None: the server did not say
        total_completion = getattr(usage, "completion_tokens", 0) or 0
        out = []
        choices = sorted(resp.choices, key=lambda c: c.index)[:len(indices)]
        for j, (choice, i) in enumerate(zip(choices, indices)):
            message = choice.message if kind == "chat" else None
            text = (message.content if message is not None else choice.text) or ""
            stop_reason = getattr(choice, "stop_reason", None)
            if stop_reason is None:
                stop_reason = (getattr(choice, "model_extra", None) or {}).get("stop_reason")
            hit = stop_reason if isinstance(stop_reason, str) and stop_reason in req.params.stop else None
            if hit is None and choice.finish_reason == "stop" and len(req.params.stop) == 1 and stop_reason is None:
                hit = req.params.stop[0]  # the server does not say; assume the one stop string (see module doc)
            n_tokens = total_completion // len(choices) if len(choices) > 1 else total_completion
            out.append(Completion(key=req.key, index=i, seed=seed + j, text=text, token_ids=[],
                                  prompt_tokens=prompt_tokens,
                                  cached_tokens=(cached if j == 0 else prompt_tokens),
                                  finish_reason=_finish(choice.finish_reason),
                                  logprobs=_logprobs(choice, kind), latency_s=latency, stop_hit=hit,
                                  n_tokens=n_tokens, reasoning=_reasoning(message)))
        return out

    async def _stream(self, req: Request, index: int) -> list[Completion]:
        """One sample, streamed: of a request with `on_token` (its text passed on as it
        arrives), or with `stop_below` (DeepConf online), then with the top `TOP_K`
        log-probabilities of every token. Once the mean confidence of its
        last `window` tokens falls below the threshold, the stream is closed: the
        connection drops, and vLLM aborts a request whose client went away. Its finish
        reason is then "low_confidence", with the tokens received counted; the prompt's
        tokens are those the server reported for the same prompt before (the usage
        chunk comes last, so an aborted stream never gets one), else unknown (0)."""
        seed = req.seeds[index]
        if req.continuation and req.prompt is None and self.continuation_mode == "vllm":
            await self._tokenize(req)
        wanted = max(req.params.logprobs or 0, TOP_K) if req.stop_below is not None else req.params.logprobs
        kind, body = self._body(replace(req, params=replace(req.params, logprobs=wanted)), seed, 1)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        threshold, window = req.stop_below or (None, 0)
        t = time.perf_counter()
        pieces, tokens, finish, usage, stop_reason = [], [], None, None, None
        stream = await self._create(kind, body)
        try:
            async for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    pieces.append((choice.delta.content if kind == "chat" else choice.text) or "")
                    if pieces[-1] and req.on_token is not None:  # the server cut stop strings already
                        try:
                            req.on_token(index, pieces[-1])
                        except Exception:  # a client's callback never stops the sample
                            pass
                    tokens += _logprobs(choice, kind) or []
                    if choice.finish_reason:
                        finish = choice.finish_reason
                        stop_reason = getattr(choice, "stop_reason", None) or \
                            (getattr(choice, "model_extra", None) or {}).get("stop_reason")
                if threshold is not None and finish is None and len(tokens) >= window:
                    recent = [from_top_logprobs(x.logprob, list(x.top.values()), None)[0] for x in tokens[-window:]]
                    if sum(recent) / window < threshold:
                        finish = "low_confidence"
                        break
        finally:
            await stream.close()
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        if prompt_tokens is None:
            prompt_tokens = self._prompt_tokens.get(_prompt_key(body), 0)
        else:
            self._prompt_tokens[_prompt_key(body)] = prompt_tokens
        details = getattr(usage, "prompt_tokens_details", None)
        reported = getattr(details, "cached_tokens", None) if details is not None else None
        hit = stop_reason if isinstance(stop_reason, str) and stop_reason in req.params.stop else None
        if hit is None and finish == "stop" and len(req.params.stop) == 1 and stop_reason is None:
            hit = req.params.stop[0]
        return [Completion(key=req.key, index=index, seed=seed, text="".join(pieces), token_ids=[],
                           prompt_tokens=prompt_tokens,
                           cached_tokens=None if reported is None else min(prompt_tokens, int(reported)),
                           finish_reason=finish if finish == "low_confidence" else _finish(finish),
                           logprobs=tokens, latency_s=time.perf_counter() - t, stop_hit=hit,
                           n_tokens=getattr(usage, "completion_tokens", None) or len(tokens),
                           token_stats=from_logprobs(tokens))]

    async def _create(self, kind: str, body: dict[str, Any]) -> Any:
        """One call to the server, its failures as `EngineError`s that say what went wrong."""
        o = self._openai
        try:
            if kind == "chat":
                return await self._client.chat.completions.create(**body)
            return await self._client.completions.create(**body)
        except o.NotFoundError as e:
            raise EngineError(f"server at {self.base_url} does not serve model {self.model!r} "
                              f"(HTTP 404: {e.message})") from None
        except o.APITimeoutError:
            raise EngineError(f"server at {self.base_url} did not answer within {self.timeout_s} s "
                              f"(after {self.max_retries} retries)") from None
        except o.APIConnectionError:
            raise EngineError(f"OpenAI-compatible server at {self.base_url} is unreachable "
                              f"(after {self.max_retries} retries)") from None
        except o.APIStatusError as e:
            raise EngineError(f"server at {self.base_url} answered HTTP {e.status_code}: {e.message}") from None

    # -- the stream -----------------------------------------------------------------

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        results: queue.Queue = queue.Queue()
        in_flight = 0
        pending: list[tuple[Request, list[int]]] = []
        source = iter(requests)
        exhausted = False
        futures: dict = {}

        def submit(req: Request, idx: list[int]) -> None:
            nonlocal in_flight
            streamed = req.stop_below is not None or req.on_token is not None
            call = self._stream(req, idx[0]) if streamed else self._sample(req, idx)
            fut = asyncio.run_coroutine_threadsafe(call, self._loop)
            futures[fut] = req
            fut.add_done_callback(lambda f, req=req, idx=idx: results.put((f, req, idx)))
            in_flight += 1

        try:
            while True:
                # a cancelled request's calls in flight are cancelled: the connection closes,
                # and a server that watches for that (vLLM does) aborts the generation
                for fut, req in list(futures.items()):
                    if req.cancelled is not None and is_cancelled(req):
                        fut.cancel()
                gone = [x for x in pending if is_cancelled(x[0])]
                if gone:
                    pending = [x for x in pending if not is_cancelled(x[0])]
                    for req, idx in gone:
                        yield from (never_started(req, i) for i in idx)
                waits = False
                while in_flight < self.concurrency:
                    if not pending:
                        if exhausted:
                            break
                        try:
                            req = next(source)
                        except StopIteration:
                            exhausted = True
                            break
                        if req is None:  # nothing yet: ask again after the next result
                            waits = True
                            break
                        _check_params(req)
                        if req.continuation and req.prompt is None and self.continuation_mode == "completions":
                            self._template()  # resolved here, never inside the event loop
                        if self.n_per_request and not req.params.greedy and req.stop_below is None \
                                and req.on_token is None:
                            pending.append((req, list(range(req.n))))
                        else:
                            pending += [(req, [i]) for i in range(req.n)]
                    req, idx = pending.pop(0)
                    if is_cancelled(req):
                        yield from (never_started(req, i) for i in idx)
                        continue
                    submit(req, idx)
                if in_flight == 0:
                    if waits:
                        raise StreamStalled("the request stream waits for results, but no call is in flight")
                    return
                fut, req, idx = results.get()
                in_flight -= 1
                futures.pop(fut, None)
                if fut.cancelled():  # what the server generated before the call was dropped is not known
                    yield from (never_started(req, i) for i in idx)
                    continue
                exc = fut.exception()
                if exc is not None:
                    raise exc if isinstance(exc, EngineError) else EngineError(f"{type(exc).__name__}: {exc}")
                got = fut.result()
                if len(got) < len(idx):  # fewer choices than asked: ask for the rest one by one
                    pending += [(req, [i]) for i in idx[len(got):]]
                yield from got
        finally:
            for f in futures:
                f.cancel()

    def close(self) -> None:
        if self._loop.is_running():
            try:
                self._call(self._client.close())
            except Exception:
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)


def _template_source(value: str) -> tuple[str, str]:
    """Jinja source and the BOS text it prints (from a tokenizer_config.json), read
    from `value`: the source itself or a Jinja, tokenizer_config.json or .gguf file."""
    from pathlib import Path

    try:
        source = read_template(value)
    except TemplateError as e:
        raise InputError(f"chat_template must be Jinja source or a path to a .gguf or tokenizer_config.json: "
                         f"{e}") from None
    bos = ""
    p = Path(value)
    if source != value and p.name.endswith(".json"):
        tok = json.loads(p.read_text()).get("bos_token") or ""
        bos = tok.get("content", "") if isinstance(tok, dict) else str(tok)
    return source, bos


def _ids_key(req: Request) -> Any:
    return tuple(tuple(sorted(m.items())) for m in req.messages), req.continuation


def _check_params(req: Request) -> None:
    """What an OpenAI-compatible server would reject, refused before anything is sent."""
    t = req.params.temperature
    if t > MAX_TEMPERATURE:
        raise SpecError(f"temperature must be in [0, {MAX_TEMPERATURE:g}] for an OpenAI-compatible server "
                        f"(vLLM rejects more), got {t!r}")


def _prompt_key(body: dict[str, Any]) -> str:
    """What identifies a call's prompt (its chat, or its text or token ids)."""
    what = body.get("messages", body.get("prompt"))
    return hashlib.blake2b(json.dumps(what, sort_keys=True).encode(), digest_size=12).hexdigest()


def _finish(reason: str | None) -> str:
    """'length' and 'stop' as the store knows them; anything that says the server ended
    the sample ('abort', 'error', 'repetition', or none at all) is passed on as such."""
    if reason == "length":
        return "length"
    if reason in ("stop", "tool_calls", "eos", "stop_sequence", "end_turn"):
        return "stop"
    return reason or "error"


def _reasoning(message: Any) -> str | None:
    """A reasoning parser's text: vLLM's `reasoning` field (`reasoning_content` before 0.17)."""
    if message is None:
        return None
    extra = getattr(message, "model_extra", None) or {}
    value = getattr(message, "reasoning", None) or extra.get("reasoning") or extra.get("reasoning_content")
    return value or None


def _logprobs(choice: Any, kind: str) -> list[TokenLogprob] | None:
    lp = getattr(choice, "logprobs", None)
    if lp is None:
        return None
    if kind == "chat":
        return [TokenLogprob(t.token, t.logprob, {x.token: x.logprob for x in (t.top_logprobs or [])})
                for t in (lp.content or [])]
    tops = lp.top_logprobs or [None] * len(lp.tokens or [])
    return [TokenLogprob(tok, float(l if l is not None else float("-inf")), dict(top or {}))
            for tok, l, top in zip(lp.tokens or [], lp.token_logprobs or [], tops)]
