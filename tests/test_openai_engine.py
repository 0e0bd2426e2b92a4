"""The `openai` engine against a scripted OpenAI-compatible server, and against
llama-cpp-python's real server on the embedded model (killed mid-run, resumed)."""

import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from testtime import api
from testtime.engines.base import Request
from testtime.engines.chat import CHATML, ChatTemplate
from testtime.engines.openai import EngineError, OpenAIEngine
from testtime.spec import SamplingParams
from testtime.store import Store


GENERATION_CONFIG = {"top_k": 20, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8}
"""Qwen2.5-Instruct's generation_config.json: what vLLM uses for every field a request leaves out."""


class FakeServer:
    """Answers as vLLM's OpenAI-compatible server does, where it matters here:

    - text is a pure function of the prompt and the seed; with n > 1, choice j gets
      seed + j (vLLM's fan-out);
    - a sampling field the request leaves out is filled from GENERATION_CONFIG, and
      the parameters in effect are recorded per request (`effective`);
    - prompts are tokenized (one token per word) with BOS added unless the body says
      `add_special_tokens: false` (its default is true on /v1/completions), so a
      template that prints BOS shows a doubled one (`tokens`);
    - greedy with n > 1, and temperature > 2, are rejected with HTTP 400;
    - `usage.prompt_tokens_details` is null unless started with details=True
      (vLLM's --enable-prompt-tokens-details);
    - `/tokenize` (at the root, as vLLM serves it) renders a chat with a ChatML
      template or tokenizes a prompt;
    - `finish` forces a finish reason (e.g. 'abort'); `reasoning` is put in
      `message.reasoning`, as a `--reasoning-parser` server does.

    `fail_first` requests get 503 (or 429); `single_choice` ignores n (as llama.cpp's
    server does); `slow` maps seeds to seconds the answer takes."""

    def __init__(self, fail_first=0, status=503, single_choice=False, props=True, models=("fake-model",),
                 details=True, finish=None, bos_template=False, reasoning=None, slow=None):
        self.requests, self.fail_first, self.status = [], fail_first, status
        self.single_choice, self.props, self.models = single_choice, props, models
        self.details, self.finish, self.effective, self.tokens = details, finish, [], []
        self.reasoning, self.slow = reasoning, dict(slow or {})
        self.dropped = []
        self.template = ("<s>" if bos_template else "") + CHATML
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models]})
                elif self.path == "/props" and fake.props:
                    self._send(200, {"chat_template": fake.template, "bos_token": "<s>"})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def _stream(self, body, chat):
                """Server-sent events, one token (word) per chunk, each with its top log-
                probabilities: flat (confidence 3) for seeds divisible by 3, peaked (7.6)
                otherwise; then the finish chunk, the usage chunk and [DONE]. A client that
                hangs up is noticed at the next write (`dropped`)."""
                prompt = json.dumps(body["messages"]) if chat else str(body["prompt"])
                seed = body["seed"]
                h = int(hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest()[:8], 16)
                words = [f"step {h % 97}"] + ["so"] * 20 + [f"The answer is {h % 10}."]
                words = words[:body["max_tokens"]]
                k = (body.get("top_logprobs") if chat else body.get("logprobs")) or 0
                top = [-3.0] * k if seed % 3 == 0 else [-0.01] + [-8.0] * (k - 1)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()

                def event(obj):
                    self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
                    self.wfile.flush()

                try:
                    for i, w in enumerate(words):
                        piece = w if i == 0 else " " + w
                        tops = {f"{piece}#{j}" if j else piece: v for j, v in enumerate(top)}
                        if not k:
                            choice = {"index": 0, "finish_reason": None, "logprobs": None,
                                      **({"delta": {"content": piece}} if chat else {"text": piece})}
                        elif chat:
                            choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None,
                                      "logprobs": {"content": [{"token": piece, "logprob": top[0], "bytes": None,
                                                                "top_logprobs": [{"token": t, "logprob": v, "bytes": None}
                                                                                 for t, v in tops.items()]}]}}
                        else:
                            choice = {"index": 0, "text": piece, "finish_reason": None,
                                      "logprobs": {"tokens": [piece], "token_logprobs": [top[0]],
                                                   "top_logprobs": [tops], "text_offset": [0]}}
                        event({"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": 0, "model": body["model"], "choices": [choice]})
                        time.sleep(0.01)
                    end = {"index": 0, "finish_reason": "stop"}
                    end.update({"delta": {}} if chat else {"text": ""})
                    event({"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
                           "model": body["model"], "choices": [end]})
                    event({"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
                           "model": body["model"], "choices": [],
                           "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words),
                                     "total_tokens": 0}})
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    fake.dropped.append(seed)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body))
                if self.path == "/tokenize":
                    if "messages" in body:
                        text = ChatTemplate(fake.template).render(body["messages"], body.get("add_generation_prompt", True))
                        toks = _tokens(text, body.get("add_special_tokens", False))
                    else:
                        toks = _tokens(body["prompt"], body.get("add_special_tokens", True))
                    return self._send(200, {"count": len(toks), "max_model_len": 4096, "tokens": toks})
                if len(fake.requests) <= fake.fail_first:
                    return self._send(fake.status, {"error": {"message": "busy"}})
                if body.get("model") not in fake.models:
                    return self._send(404, {"error": {"message": f"model {body.get('model')} not found"}})
                eff = {k: body.get(k, GENERATION_CONFIG.get(k, d)) for k, d in
                       (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0),
                        ("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0))}
                fake.effective.append(eff)
                time.sleep(fake.slow.get(body.get("seed"), 0))
                n = body.get("n", 1)
                if eff["temperature"] > 2:
                    return self._send(400, {"error": {"message": f"temperature must be in [0, 2], got {eff['temperature']}."}})
                if eff["temperature"] < 1e-5 and n > 1:
                    return self._send(400, {"error": {"message": f"n must be 1 when using greedy sampling, got {n}."}})
                chat = self.path.endswith("/chat/completions")
                if body.get("stream"):
                    return self._stream(body, chat)
                if chat:
                    prompt = json.dumps(body["messages"])
                elif isinstance(body["prompt"], list):  # token ids
                    prompt = " ".join(map(str, body["prompt"]))
                    fake.tokens.append(list(body["prompt"]))
                else:
                    prompt = body["prompt"]
                    fake.tokens.append(_tokens(prompt, body.get("add_special_tokens", True)))
                choices = []
                for i in range(1 if fake.single_choice else n):
                    seed = body["seed"] + i
                    h = int(hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest()[:8], 16)
                    text = f"step {h % 97}\n\nThe answer is {h % 10}."
                    stop, reason = body.get("stop") or [], "stop"
                    for s in stop:
                        if s in text:
                            text = text[:text.index(s)]
                    words = text.split(" ")
                    if len(words) > body["max_tokens"]:
                        text, reason = " ".join(words[:body["max_tokens"]]), "length"
                    c = {"index": i, "finish_reason": fake.finish or reason}
                    k = body.get("top_logprobs") if chat else body.get("logprobs")
                    per_word = k and body["max_tokens"] > 1  # a sample's own; a judge asks for one token
                    top = [-3.0] * (k or 1) if seed % 3 == 0 else [-0.01] + [-8.0] * ((k or 1) - 1)
                    if per_word and chat:
                        c["message"] = {"role": "assistant", "content": text}
                        c["logprobs"] = {"content": [{"token": w, "logprob": top[0], "bytes": None, "top_logprobs": [
                            {"token": f"{w}#{j}", "logprob": v, "bytes": None} for j, v in enumerate(top)]}
                            for w in text.split(" ")]}
                    elif per_word:
                        c["text"] = text
                        words_ = text.split(" ")
                        c["logprobs"] = {"tokens": words_, "token_logprobs": [top[0]] * len(words_),
                                         "top_logprobs": [{f"{w}#{j}": v for j, v in enumerate(top)} for w in words_],
                                         "text_offset": [0] * len(words_)}
                    elif chat:
                        c["message"] = {"role": "assistant", "content": text}
                        if fake.reasoning:
                            c["message"]["reasoning"] = fake.reasoning
                        if body.get("logprobs"):
                            c["logprobs"] = {"content": [{"token": "Yes", "logprob": -0.1, "bytes": None,
                                                          "top_logprobs": [{"token": "Yes", "logprob": -0.1, "bytes": None},
                                                                           {"token": "No", "logprob": -2.4, "bytes": None}]}]}
                    else:
                        c["text"] = text
                        if body.get("logprobs"):
                            c["logprobs"] = {"tokens": ["Yes"], "token_logprobs": [-0.1], "text_offset": [0],
                                             "top_logprobs": [{"Yes": -0.1, "No": -2.4}]}
                    choices.append(c)
                usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": 5 * len(choices),
                         "total_tokens": 0, "prompt_tokens_details": {"cached_tokens": 2} if fake.details else None}
                self._send(200, {"id": "x", "object": "chat.completion" if chat else "text_completion",
                                 "created": 0, "model": body["model"], "choices": choices, "usage": usage})

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/v1"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def _tokens(text, add_special):
    """One token per whitespace-separated word, numbered by a hash; BOS is 1 ('<s>')."""
    words = text.replace("<s>", " <s> ").split()
    ids = [1 if w == "<s>" else 2 + int(hashlib.sha256(w.encode()).hexdigest()[:6], 16) for w in words]
    return ([1] if add_special else []) + ids


@pytest.fixture
def fake():
    servers = []

    def make(**kw):
        servers.append(FakeServer(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _engine(url, **kw):
    return OpenAIEngine(url, max_retries=kw.pop("max_retries", 3), timeout_s=10, **kw)


def test_samples_one_call_per_seed_with_usage_and_stop(fake):
    srv = fake()
    eng = _engine(srv.url)
    assert eng.model == "fake-model"  # the only one served
    req = Request(key="q", seeds=(11, 12, 13), params=SamplingParams(max_tokens=50, stop=("\n\n",), top_k=5),
                  messages=({"role": "user", "content": "hi"},))
    got = sorted(eng.generate([req]), key=lambda c: c.index)
    assert [c.seed for c in got] == [11, 12, 13]
    bodies = [b for _, b in srv.requests]
    assert sorted(b["seed"] for b in bodies) == [11, 12, 13] and all(b["n"] == 1 for b in bodies)
    assert all(b["top_k"] == 5 for b in bodies)  # extras reach the server
    for c in got:
        assert c.text.startswith("step ") and "\n\n" not in c.text
        assert c.stop_hit == "\n\n" and c.completion_tokens == 5 and c.cached_tokens == 2
    again = sorted(eng.generate([req]), key=lambda c: c.index)
    assert [c.text for c in again] == [c.text for c in got]  # a sample is a function of its seed
    eng.close()


def test_a_cancelled_request_is_not_sent_and_its_calls_in_flight_are_dropped(fake):
    srv = fake(slow={2: 2.0})
    eng = _engine(srv.url, concurrency=2)
    flag = {"cancel": False}
    req = Request(key="q", seeds=(1, 2, 3, 4), params=SamplingParams(max_tokens=50),
                  messages=({"role": "user", "content": "hi"},), cancelled=lambda: flag["cancel"])
    got = []
    for c in eng.generate([req]):
        got.append(c)
        flag["cancel"] = True  # decided after the first answer
    by_seed = {c.seed: c for c in got}
    assert len(got) == 4 and by_seed[1].finish_reason == "stop"  # the fast one answered
    # seed 2 was in flight (its call dropped, whether or not the server had it yet); 3 and 4 never sent
    assert all(by_seed[s].finish_reason == "cancelled" and by_seed[s].text == "" for s in (2, 3, 4))
    assert 1 in [b["seed"] for _, b in srv.requests] and {b["seed"] for _, b in srv.requests} <= {1, 2}


def test_a_sample_asked_to_stop_on_low_confidence_is_streamed_and_dropped(fake):
    srv = fake()
    eng = _engine(srv.url)
    for prompt in (None, "Count:"):
        kw = {"prompt": prompt} if prompt else {"messages": ({"role": "user", "content": "hi"},)}
        req = Request(key="q", seeds=(3, 4), params=SamplingParams(max_tokens=50), stop_below=(5.0, 4), **kw)
        got = {c.seed: c for c in eng.generate([req])}
        unsure, sure = got[3], got[4]
        # flat top-20 distributions: confidence 3 < 5, so the stream is closed after 4 tokens
        assert unsure.finish_reason == "low_confidence" and unsure.completion_tokens == 4
        assert unsure.token_stats.shape == (4, 3) and np.allclose(unsure.token_stats[:, 0], 3.0)
        assert unsure.text == "step " + unsure.text.split()[1] + " so so so"
        assert sure.finish_reason == "stop" and sure.text.endswith(".") and sure.completion_tokens == 22
        assert sure.token_stats.shape == (22, 3) and sure.token_stats[0, 0] > 7
        bodies = [b for _, b in srv.requests if b.get("seed") in (3, 4)]
        assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in bodies)
        assert all((b.get("top_logprobs") if prompt is None else b.get("logprobs")) == 20 for b in bodies)
        srv.requests.clear()
    # the server noticed the client hang up on the low-confidence sample (and only on it)
    deadline = time.time() + 5
    while len(srv.dropped) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert srv.dropped == [3, 3]


def test_a_sample_with_on_token_is_streamed_as_the_server_sends_it(fake):
    srv = fake()
    eng = _engine(srv.url)
    assert eng.streams_text
    pieces = {0: [], 1: []}
    req = Request(key="q", seeds=(4, 5), params=SamplingParams(max_tokens=6), on_token=lambda i, t: pieces[i].append(t),
                  messages=({"role": "user", "content": "hi"},))
    got = sorted(eng.generate([req]), key=lambda c: c.index)
    for c in got:  # one call per sample, streamed, no log-probabilities asked for
        assert "".join(pieces[c.index]) == c.text and len(pieces[c.index]) == 6 and c.completion_tokens == 6
    bodies = [b for _, b in srv.requests if b.get("seed") in (4, 5)]
    assert len(bodies) == 2 and all(b["stream"] and not b.get("top_logprobs") for b in bodies)


def test_deepconf_online_runs_on_a_server(fake, tmp_path):
    from testtime import api

    srv = fake()
    run = api.sample("arithmetic", n=9, limit=2, engine=_engine(srv.url), task_args={"levels": [1]},
                     workspace=tmp_path, strategy="deepconf_online",
                     strategy_args={"warmup": 3, "eta": 0.5, "window": 4, "consensus": 1.0})
    with Store(tmp_path) as store:
        d = store.decisions(run.run_id)
        samples = store.samples(run.run_id)
    assert len(d) == 2 and all(v["stopped_early"] > 0 and v["drawn"] == 9 for v in d.values())
    # the warm-up had no bar; after it, every flat-confidence sample was dropped and none is kept
    assert all(s.finish_reason == "stop" for s in samples)
    assert sum(v["kept"] for v in d.values()) == len(samples)


def test_retries_on_503_and_429(fake):
    for status in (503, 429):
        srv = fake(fail_first=2, status=status)
        eng = _engine(srv.url)
        req = Request(key=0, seeds=(1,), params=SamplingParams(max_tokens=20), messages=({"role": "user", "content": "x"},))
        assert len(list(eng.generate([req]))) == 1
        assert len(srv.requests) == 3
        eng.close()


def test_clear_errors_for_unreachable_servers_and_wrong_models(fake):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineError, match="unreachable"):
        OpenAIEngine(f"http://127.0.0.1:{port}/v1", max_retries=1, timeout_s=2)
    srv = fake(models=("a", "b"))
    with pytest.raises(EngineError, match=r"serves 2 models \(a, b\)"):
        _engine(srv.url)
    eng = _engine(srv.url, model="nope")
    req = Request(key=0, seeds=(1,), params=SamplingParams(max_tokens=5), messages=({"role": "user", "content": "x"},))
    with pytest.raises(EngineError, match="does not serve model 'nope'"):
        list(eng.generate([req]))
    eng.close()


def test_continuation_goes_to_the_completions_endpoint_verbatim(fake, tmp_path):
    srv = fake()
    eng = _engine(srv.url)
    msgs = ({"role": "user", "content": "Solve it."},)
    req = Request(key=0, seeds=(3,), params=SamplingParams(max_tokens=20), messages=msgs, continuation="Step 1: x\n\n")
    [c] = list(eng.generate([req]))
    path, body = srv.requests[-1]
    assert path.endswith("/completions") and not path.endswith("/chat/completions")
    assert body["prompt"] == ChatTemplate(CHATML).render(list(msgs)) + "Step 1: x\n\n"
    eng.close()
    # a vLLM server: token ids of the chat from its /tokenize, then the continuation's, sent as ids
    eng = _engine(srv.url, continuation="vllm")
    list(eng.generate([req]))
    (p1, chat), (p2, cont), (path, body) = srv.requests[-3:]
    assert (p1, p2) == ("/tokenize", "/tokenize") and chat["add_generation_prompt"] is True
    assert cont == {"model": "fake-model", "prompt": "Step 1: x\n\n", "add_special_tokens": False}
    rendered = ChatTemplate(CHATML).render(list(msgs))
    assert path.endswith("/v1/completions") and body["prompt"] == _tokens(rendered, False) + _tokens("Step 1: x\n\n", False)
    eng.close()
    # no template anywhere: a clear error, not a silently re-templated chat
    bare = fake(props=False)
    eng = _engine(bare.url)
    with pytest.raises(EngineError, match="chat template"):
        list(eng.generate([req]))
    eng.close()
    # the template read from a Hugging Face tokenizer_config.json
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"}))
    eng = _engine(bare.url, chat_template=str(cfg))
    list(eng.generate([req]))
    assert bare.requests[-1][1]["prompt"] == "<user>Solve it.<assistant>Step 1: x\n\n"
    eng.close()
    with pytest.raises(ValueError, match="Jinja source or a path"):
        _engine(bare.url, chat_template="model.bin")


def test_every_sampling_field_is_sent_so_the_server_defaults_never_apply(fake):
    """vLLM fills unsent fields from generation_config.json (top_k=20, repetition_penalty
    1.05 for Qwen2.5-Instruct); what the server used must be what the run records."""
    srv = fake()
    eng = _engine(srv.url)
    params = SamplingParams(temperature=0.6, top_p=0.9, top_k=0, min_p=0.0, max_tokens=20)
    list(eng.generate([Request(key=0, seeds=(1,), params=params, messages=({"role": "user", "content": "x"},)),
                       Request(key=1, seeds=(1,), params=params, prompt="raw")]))
    for eff in srv.effective:
        assert eff == {"temperature": 0.6, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                       "presence_penalty": 0.0, "frequency_penalty": 0.0}
    assert all(b["repeat_penalty"] == 1.0 for _, b in srv.requests)  # llama-cpp-python's name (default 1.1)
    eng.close()


def test_a_template_that_prints_bos_is_sent_without_a_second_one(fake):
    """/v1/completions adds BOS unless told not to; a rendered Llama-3-style template
    already starts with it."""
    srv = fake(bos_template=True)
    eng = _engine(srv.url)
    req = Request(key=0, seeds=(1,), params=SamplingParams(max_tokens=20),
                  messages=({"role": "user", "content": "Solve it."},), continuation="Step 1:")
    list(eng.generate([req]))
    [toks] = srv.tokens
    assert toks[0] == 1 and toks.count(1) == 1, toks
    # a raw prompt (a base model) still gets the server's BOS
    list(eng.generate([Request(key=1, seeds=(1,), params=SamplingParams(max_tokens=5), prompt="1, 2, 3,")]))
    assert srv.tokens[-1][0] == 1
    eng.close()


def test_greedy_never_asks_for_several_choices_in_one_call(fake):
    srv = fake()
    eng = _engine(srv.url, n_per_request=True)
    req = Request(key=0, seeds=(5, 6, 7), params=SamplingParams(temperature=0.0, max_tokens=20),
                  messages=({"role": "user", "content": "x"},))
    got = list(eng.generate([req]))
    assert sorted(c.index for c in got) == [0, 1, 2]
    assert [b["n"] for _, b in srv.requests] == [1, 1, 1]
    eng.close()


def test_n_per_request_records_the_seeds_vllm_used(fake):
    """vLLM gives choice j of a request with seed s the seed s + j; each stored seed must
    reproduce its sample alone."""
    srv = fake()
    eng = _engine(srv.url, n_per_request=True)
    msgs = ({"role": "user", "content": "x"},)
    req = Request(key=0, seeds=(100, 900, 901), params=SamplingParams(max_tokens=20), messages=msgs)
    got = sorted(eng.generate([req]), key=lambda c: c.index)
    assert [c.seed for c in got] == [100, 101, 102]
    alone = _engine(srv.url)
    again = list(alone.generate([Request(key=0, seeds=(101,), params=SamplingParams(max_tokens=20), messages=msgs)]))
    assert again[0].text == got[1].text
    eng.close()
    alone.close()


def test_temperature_above_two_is_refused_before_anything_is_sent(fake):
    from testtime.spec import SpecError

    srv = fake()
    eng = _engine(srv.url)
    req = Request(key=0, seeds=(1,), params=SamplingParams(temperature=2.5), messages=({"role": "user", "content": "x"},))
    with pytest.raises(SpecError, match=r"temperature must be in \[0, 2\].*got 2.5"):
        list(eng.generate([req]))
    assert srv.requests == []
    eng.close()


def test_cached_tokens_are_unknown_when_the_server_does_not_report_them(fake, tmp_path):
    srv = fake(details=False)
    eng = _engine(srv.url)
    [c] = eng.generate([Request(key=0, seeds=(1,), params=SamplingParams(max_tokens=20),
                                messages=({"role": "user", "content": "x"},))])
    assert c.cached_tokens is None
    r = api.sample("arithmetic", n=2, limit=2, engine=eng, workspace=tmp_path, task_args={"levels": [1]})
    with Store(tmp_path) as store:
        assert all(s.cached_tokens is None for s in store.samples(r.run_id))
        assert sum(u["cache_unknown"] for u in store.usage(r.run_id).values()) == 4
    eng.close()


def test_samples_the_server_aborted_are_not_stored_as_answers(fake, tmp_path):
    for reason in ("abort", "error", "repetition"):
        srv = fake(finish=reason)
        eng = _engine(srv.url)
        r = api.sample("arithmetic", n=2, limit=2, engine=eng, workspace=tmp_path / reason, task_args={"levels": [1]})
        assert r.drawn == 0 and r.engine_ended == 4
        with Store(tmp_path / reason) as store:
            assert store.samples(r.run_id) == []
        eng.close()
        srv.finish = None  # the server recovers: a rerun draws exactly those samples
        eng = _engine(srv.url)
        again = api.sample("arithmetic", n=2, limit=2, engine=eng, workspace=tmp_path / reason, task_args={"levels": [1]})
        assert again.run_id == r.run_id and again.drawn == 4 and again.engine_ended == 0
        eng.close()


def test_a_reasoning_parser_s_text_is_kept_apart_from_the_answer(fake, tmp_path):
    srv = fake(reasoning="First, 2 + 3 = 5.")
    eng = _engine(srv.url)
    r = api.sample("arithmetic", n=1, limit=1, engine=eng, workspace=tmp_path, task_args={"levels": [1]})
    with Store(tmp_path) as store:
        [s] = store.samples(r.run_id)
    assert s.reasoning == "First, 2 + 3 = 5." and s.text.startswith("step ")
    eng.close()
    from types import SimpleNamespace

    from testtime.engines.openai import _reasoning

    old = SimpleNamespace(content="5", model_extra={"reasoning_content": "2 + 3 = 5"})  # before vLLM 0.17
    assert _reasoning(old) == "2 + 3 = 5"


def test_n_per_request_falls_back_when_the_server_answers_one_choice(fake):
    for single in (False, True):
        srv = fake(single_choice=single)
        eng = _engine(srv.url, n_per_request=True)
        req = Request(key=0, seeds=(1, 2, 3, 4), params=SamplingParams(max_tokens=20),
                      messages=({"role": "user", "content": "x"},))
        got = list(eng.generate([req]))
        assert sorted(c.index for c in got) == [0, 1, 2, 3]
        assert len(srv.requests) == (4 if single else 1)
        eng.close()


def test_logprobs_feed_the_judge_prm(fake):
    from testtime.rewards.base import Scoring
    from testtime.rewards.judge import JudgePRM

    srv = fake()
    eng = _engine(srv.url)
    scores = JudgePRM(eng).score([Scoring("q", ("a", "b"))])
    # P(yes) / (P(yes) + P(no)) = e^-0.1 / (e^-0.1 + e^-2.4)
    assert scores[0] == pytest.approx([1 / (1 + math.exp(-2.3))] * 2, rel=1e-6)
    eng.close()


def test_runs_store_and_resume_through_the_engine(fake, tmp_path):
    srv = fake()
    eng = _engine(srv.url)
    r = api.sample("arithmetic", n=4, limit=3, engine=eng, workspace=tmp_path, task_args={"levels": [1]})
    assert r.drawn == 12
    again = api.sample("arithmetic", n=6, limit=3, engine=eng, workspace=tmp_path, task_args={"levels": [1]})
    assert again.run_id == r.run_id and again.drawn == 6  # only the missing ones
    eng.close()


# ---------------------------------------------------------------- the real server

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model_path, port):
    proc = subprocess.Popen([sys.executable, "-m", "testtime.engines.llama_server", "--model", str(model_path), "--port", str(port),
                             "--host", "127.0.0.1", "--n_ctx", "2048", "--n_threads", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    import urllib.request
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("llama_cpp.server exited at start")
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama_cpp.server did not start in 120 s")


@pytest.mark.model
@pytest.mark.slow
def test_real_server_dies_mid_run_and_the_run_resumes(tmp_path):
    pytest.importorskip("llama_cpp.server", reason="needs llama-cpp-python[server]")
    from testtime.engines._llama import default_model_path

    port = _free_port()
    proc = _start_server(default_model_path(), port)
    url = f"http://127.0.0.1:{port}/v1"
    params = SamplingParams(temperature=0.7, max_tokens=48)
    args = dict(n=4, limit=4, task_args={"levels": [1]}, params=params, workspace=tmp_path)
    try:
        eng = OpenAIEngine(url, max_retries=1, timeout_s=30, concurrency=2)
        seen = []

        def kill_after_three(samples, tokens):  # the server dies with samples in flight
            seen.append(samples)
            if len(seen) == 3:
                os.killpg(proc.pid, signal.SIGKILL)

        with pytest.raises(EngineError, match="unreachable|HTTP"):
            api.sample("arithmetic", engine=eng, progress=kill_after_three, **args)
        with Store(tmp_path) as store:
            run_id = store.latest_run()
            before = len(store.samples(run_id))
        assert 3 <= before < 16, before  # what was stored before the server died stays
        eng.close()
        proc.wait()
        proc = _start_server(default_model_path(), port)
        eng = OpenAIEngine(url, max_retries=1, timeout_s=60, concurrency=2)
        r = api.sample("arithmetic", engine=eng, **args)
        eng.close()
        assert r.run_id == run_id and r.drawn == 16 - before  # only what was missing
        # continuing a partial assistant message, with the template read from the GGUF file
        eng = OpenAIEngine(url, max_retries=1, timeout_s=60, chat_template=str(default_model_path()))
        req = Request(key=0, seeds=(1,), params=SamplingParams(max_tokens=8, temperature=0.0),
                      messages=({"role": "user", "content": "What is 2 + 3?"},), continuation="2 + 3 =")
        [c] = list(eng.generate([req]))
        assert c.completion_tokens > 0 and "5" in c.text
        eng.close()
        with Store(tmp_path) as store:
            rows = store.samples(run_id)
            assert len(rows) == 16 and len({(s.problem_id, s.sample_index) for s in rows}) == 16
            assert all(s.completion_tokens > 0 and s.prompt_tokens > 0 for s in rows)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
