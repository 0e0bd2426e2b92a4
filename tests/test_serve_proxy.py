"""`testtime serve` as a proxy: continuous batching across requests, streaming tokens,
cancellation on disconnect, backpressure, limits, keys, metrics and access logs; on a
timed slot engine (tests/doubles.py) whose state the tests can watch."""

import asyncio
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from doubles import SlotEngine
from testtime.engines.base import Request
from testtime.serve import Limits, RunningServer, ServeConfig, SharedEngine, Ticket, make_app
from testtime.spec import SamplingParams

MSG = [{"role": "user", "content": "How many legs do 3 spiders have?"}]


def until(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture
def slot_server(request):
    kwargs = getattr(request, "param", {})
    engine = SlotEngine(slots=kwargs.pop("slots", 4), step_s=kwargs.pop("step_s", 0.01))
    srv = RunningServer(make_app(engine, config=ServeConfig(**kwargs)))
    client = openai.OpenAI(base_url=srv.url, api_key=kwargs.get("api_key") or "none", max_retries=0, timeout=60)
    yield srv, client, engine
    srv.close()


def post(srv, path, body: bytes | dict, headers=None, timeout=30):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(srv.url.removesuffix("/v1") + path, data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get(srv, path, headers=None):
    req = urllib.request.Request(srv.url.removesuffix("/v1") + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def raw_request(srv, body: dict) -> socket.socket:
    """A chat request sent on a raw socket, left open (the test closes it to disconnect)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


# -- the scheduler on its own ------------------------------------------------------------

def test_shared_engine_batches_callers_and_serves_the_fewest_samples_first():
    engine = SlotEngine(slots=2, step_s=0.01)
    shared = SharedEngine(engine, capacity=2, max_wait_s=60)
    try:
        params = SamplingParams(max_tokens=30)
        long = [Request(key=f"long{i}", seeds=(1, 2), params=params, prompt="long") for i in range(3)]
        out = {}

        def call(name, reqs):
            out[name] = list(shared.generate(reqs))

        t = threading.Thread(target=call, args=("long", long))
        t.start()
        until(lambda: engine.active == 2, what="the long requests to start")
        short = Request(key="short", seeds=(9,), params=SamplingParams(max_tokens=3), prompt="short")
        call("short", [short])  # returns while long requests are still waiting
        assert not out.get("long") and len(out["short"]) == 1 and out["short"][0].key == "short"
        t.join()
        # the short request (1 sample) went before the long ones still waiting (2 samples each)
        order = [k[1] for k, _ in engine.started]  # the engine sees keys wrapped as (call, key)
        assert order.index("short") < order.index("long1") and len(out["long"]) == 6
        assert {c.key for c in out["long"]} == {"long0", "long1", "long2"} and shared.inflight == 0
    finally:
        shared.close()


def test_shared_engine_cancels_a_tickets_work_and_survives_an_engine_failure():
    from testtime.errors import InputError

    engine = SlotEngine(slots=2, step_s=0.01, max_prompt=5)
    shared = SharedEngine(engine, capacity=2)
    try:
        ticket, got = Ticket(), []

        def cancelled_call():
            with shared.serving(ticket):
                got.extend(shared.generate([Request(key="a", seeds=tuple(range(6)), params=SamplingParams(max_tokens=500),
                                                    prompt="x")]))

        t = threading.Thread(target=cancelled_call)
        t.start()
        until(lambda: engine.active == 2, what="samples to start")
        ticket.cancel()
        t.join(10)
        assert not t.is_alive() and len(got) == 6 and engine.active == 0
        # 2 ran and were stopped part way; 4 never started
        assert sorted(c.finish_reason for c in got) == ["cancelled"] * 6
        assert sum(bool(c.token_ids) for c in got) == 2 and all(len(c.token_ids) < 500 for c in got)
        with pytest.raises(InputError, match="prompt over 5 words"):  # refused before it reaches the engine
            list(shared.generate([Request(key="b", seeds=(1,), params=SamplingParams(), prompt="a b c d e f")]))
        with pytest.raises(RuntimeError, match="the engine broke"):
            list(shared.generate([Request(key="c", seeds=(1,), params=SamplingParams(), prompt="CRASH")]))
        ok = list(shared.generate([Request(key="d", seeds=(1,), params=SamplingParams(max_tokens=2), prompt="x")]))
        assert ok[0].finish_reason == "length" and shared.crashes == 1
    finally:
        shared.close()


# -- the server --------------------------------------------------------------------------

def test_a_short_request_is_not_held_behind_a_long_one(slot_server):
    srv, client, engine = slot_server
    with ThreadPoolExecutor(2) as ex:
        long = ex.submit(client.chat.completions.create, model="majority@8", messages=MSG, max_tokens=300, seed=1)
        until(lambda: engine.active == 4, what="the long request to fill the engine")
        short = client.chat.completions.create(model="sample", messages=MSG, max_tokens=5, seed=2)
        assert not long.done()  # answered while the majority@8 still samples
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
        assert long.result().model_extra["testtime"]["candidates"] == 8


def test_sample_streams_tokens_as_they_are_generated(slot_server):
    srv, client, engine = slot_server
    plain = client.chat.completions.create(model="sample", messages=MSG, max_tokens=40, seed=5)
    seen_active, parts = [], []
    for ch in client.chat.completions.create(model="sample", messages=MSG, max_tokens=40, seed=5, stream=True,
                                             stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
            seen_active.append(engine.active)
        last = ch
    assert "".join(parts) == plain.choices[0].message.content
    assert len(parts) >= 39 and seen_active[0] == 1  # the first token arrived while the sample was running
    assert last.choices == [] and last.usage.completion_tokens == 40


def test_strategies_stream_progress_then_the_answer(slot_server):
    srv, _, _ = slot_server
    status, headers, body = post(srv, "/v1/chat/completions", {"model": "majority@4", "messages": MSG, "seed": 3,
                                                               "max_tokens": 8, "stream": True})
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    progress = [line for line in text.splitlines() if line.startswith(": progress")]
    assert progress[-1] == ": progress samples=4 tokens=32"
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert "The answer is" in content and text.rstrip().endswith("data: [DONE]")
    assert text.index(": progress samples=4") < text.index("The answer is")


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_frees_its_slots(slot_server, stream):
    srv, client, engine = slot_server
    s = raw_request(srv, {"model": "majority@8", "messages": MSG, "max_tokens": 4000, "stream": stream})
    until(lambda: engine.active == 4 and srv.state.shared.waiting == 4, what="the request to fill the engine")
    steps = engine.steps
    s.close()
    until(lambda: engine.active == 0 and srv.state.shared.inflight == 0 and srv.state.shared.waiting == 0,
          what="the engine to let go of the samples")
    assert engine.steps - steps < 50  # stopped within a few steps, not after 4000 tokens
    assert len(engine.started) == 4  # the 4 samples still waiting never started
    until(lambda: srv.state.admitted == 0, what="the request to leave the server")
    # the server goes on serving
    assert client.chat.completions.create(model="sample", messages=MSG, max_tokens=3).usage.completion_tokens == 3


def test_a_decided_request_stops_its_samples(slot_server):
    srv, client, engine = slot_server
    r = client.chat.completions.create(model="adaptive_consistency@16", messages=MSG, max_tokens=20, seed=4,
                                       extra_body={"testtime": {"params": {"threshold": 0.6, "round": 1}}})
    d = r.model_extra["testtime"]["decision"]
    assert d["stopped_at"] < 16 and len(engine.started) < 16  # what was not needed never started
    assert r.usage.completion_tokens <= 20 * d["drawn"]


@pytest.mark.parametrize("slot_server", [{"max_queue": 2}], indirect=True)
def test_a_full_server_answers_429_with_retry_after(slot_server):
    srv, client, engine = slot_server
    socks = [raw_request(srv, {"model": "majority@4", "messages": MSG, "max_tokens": 4000}) for _ in range(2)]
    until(lambda: srv.state.admitted == 2, what="two requests admitted")
    status, headers, body = post(srv, "/v1/chat/completions", {"model": "sample", "messages": MSG})
    assert status == 429 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["code"] == "server_busy"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="sample", messages=MSG)
    for s in socks:
        s.close()
    until(lambda: srv.state.admitted == 0, what="the queue to drain")
    assert client.chat.completions.create(model="sample", messages=MSG, max_tokens=2).choices[0].message.content


@pytest.mark.parametrize("slot_server", [{"api_key": "s3cret"}], indirect=True)
def test_an_api_key_guards_every_route_but_health(slot_server):
    srv, client, _ = slot_server
    assert client.chat.completions.create(model="sample", messages=MSG, max_tokens=2).choices
    wrong = openai.OpenAI(base_url=srv.url, api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model="sample", messages=MSG)
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert get(srv, "/metrics")[0] == 401 and get(srv, "/health")[0] == 200
    assert get(srv, "/metrics", {"Authorization": "Bearer s3cret"})[0] == 200


@pytest.mark.parametrize("slot_server", [{"limits": Limits(max_n=16, max_tokens=100, max_budget=400)}],
                         indirect=True)
def test_limits_and_bad_bodies_get_4xx_without_harming_other_requests(slot_server):
    srv, client, engine = slot_server
    with ThreadPoolExecutor(1) as ex:
        busy = ex.submit(client.chat.completions.create, model="majority@4", messages=MSG, max_tokens=60, seed=1)
        big = b'{"model": "sample", "messages": [{"role": "user", "content": "' + b"x" * (20 << 20) + b'"}]}'
        status, _, body = post(srv, "/v1/chat/completions", big)
        assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
        assert post(srv, "/v1/chat/completions", b'{"model": "sample", "messages": [')[0] == 400
        deep = b"[" * 100000 + b"]" * 100000
        status, _, body = post(srv, "/v1/chat/completions", deep)
        assert status in (400, 413) and json.loads(body)["error"]
        status, _, body = post(srv, "/v1/chat/completions", {"model": "sample", "messages": MSG,
                                                             "stream_options": "yes"})
        assert status == 400 and json.loads(body)["error"]["param"] == "stream_options"
        cases = [({"max_tokens": 101}, "max_tokens", "at most 100"),
                 ({"model": "majority@8", "max_tokens": 60}, "max_tokens", "budget of 400"),
                 ({"model": "majority@17"}, "testtime.n", "[1, 16]"),
                 ({"temperature": "hot"}, "temperature", "valid number"),
                 ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "'system'"),
                 ({"messages": [{"role": "user", "content": "x " * 2000}]}, "max_tokens", "over 1000 words")]
        for change, param, says in cases:
            status, _, body = post(srv, "/v1/chat/completions", {"model": "sample", "messages": MSG, **change})
            err = json.loads(body)["error"]
            assert status == 400 and err["param"] == param and says in err["message"], (change, err)
        assert busy.result().model_extra["testtime"]["candidates"] == 4


def test_a_slow_client_does_not_block_others(slot_server):
    srv, client, _ = slot_server
    slow = socket.create_connection(("127.0.0.1", srv.port))
    stop = threading.Event()

    def trickle():
        for b in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n":
            if stop.wait(1.0):
                break
            slow.send(bytes([b]))

    t = threading.Thread(target=trickle)
    t.start()
    try:
        for seed in range(3):
            assert client.chat.completions.create(model="sample", messages=MSG, max_tokens=3, seed=seed).choices
    finally:
        stop.set()
        t.join()
        slow.close()


def test_async_client_completions_route_health_metrics_and_access_log(slot_server, caplog):
    srv, _, engine = slot_server

    async def main():
        client = openai.AsyncOpenAI(base_url=srv.url, api_key="none", max_retries=0)
        chat, comp = await asyncio.gather(
            client.chat.completions.create(model="majority@4", messages=MSG, max_tokens=6, seed=8),
            client.completions.create(model="majority@4", prompt="Q: 3 spiders have how many legs?\nA:",
                                      max_tokens=6, seed=8))
        parts = [c.choices[0].text async for c in await client.completions.create(
            model="sample", prompt="Once upon", max_tokens=12, seed=1, stream=True) if c.choices]
        await client.close()
        return chat, comp, parts

    with caplog.at_level(logging.INFO, logger="testtime.serve.access"):
        chat, comp, parts = asyncio.run(main())
    assert chat.object == "chat.completion" and comp.object == "text_completion"
    assert "The answer is" in comp.choices[0].text and comp.usage.completion_tokens == 24
    assert len(parts) >= 11 and "".join(parts).startswith("w")
    status, body = get(srv, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    metrics = get(srv, "/metrics")[1].decode()
    assert 'testtime_requests_total{status="200",strategy="majority"} 2.0' in metrics
    assert "testtime_request_seconds_bucket" in metrics and "testtime_samples_waiting 0.0" in metrics
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "testtime.serve.access"]
    mine = [r for r in logged if r["path"] == "/v1/completions" and r.get("strategy") == "majority"]
    assert mine and mine[0]["status"] == 200 and mine[0]["completion_tokens"] == 24


def test_malformed_http_gets_400_and_connections_beyond_the_cap_503():
    engine = SlotEngine(slots=2, step_s=0.01)
    srv = RunningServer(make_app(engine), max_connections=3)
    try:
        for value in (b"-1", b"abc"):
            with socket.create_connection(("127.0.0.1", srv.port)) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n{}")
                assert s.recv(1024).startswith(b"HTTP/1.1 400"), value
        held = [raw_request(srv, {"model": "majority@2", "messages": MSG, "max_tokens": 4000}) for _ in range(2)]
        until(lambda: srv.state.admitted == 2, what="two requests in hand")
        # uvicorn counts the connection asking too: the third open connection is refused
        assert get(srv, "/health")[0] == 503
        for s in held:
            s.close()
        until(lambda: srv.state.admitted == 0, what="the held requests to be cancelled")
        assert get(srv, "/health")[0] == 200
    finally:
        srv.close()


def test_sync_completions_and_async_chat_streaming(slot_server):
    srv, client, _ = slot_server
    comp = client.completions.create(model="sample", prompt="Q: 2 + 2?\nA:", max_tokens=7, seed=3)
    assert comp.object == "text_completion" and comp.usage.completion_tokens == 7
    parts = [c.choices[0].text for c in client.completions.create(model="sample", prompt="Q: 2 + 2?\nA:",
                                                                   max_tokens=7, seed=3, stream=True) if c.choices]
    assert "".join(parts) == comp.choices[0].text

    async def main():
        c = openai.AsyncOpenAI(base_url=srv.url, api_key="none", max_retries=0)
        stream = await c.chat.completions.create(model="majority@2", messages=MSG, max_tokens=5, seed=1, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [ch async for ch in stream]
        await c.close()
        return chunks

    chunks = asyncio.run(main())
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-2].model_extra["testtime"]["candidates"] == 2


def test_a_cancelled_request_waiting_for_room_is_answered_at_once():
    engine = SlotEngine(slots=2, step_s=0.01)
    shared = SharedEngine(engine)
    try:
        busy = threading.Thread(target=lambda: list(shared.generate(
            [Request(key="busy", seeds=(1, 2), params=SamplingParams(max_tokens=400), prompt="x")])))
        busy.start()
        until(lambda: engine.active == 2, what="the engine to be full")
        ticket, got = Ticket(size=4), []

        def waiting():
            with shared.serving(ticket):
                got.extend(shared.generate([Request(key="w", seeds=(1, 2, 3, 4), params=SamplingParams(), prompt="y")]))

        t = threading.Thread(target=waiting)
        t.start()
        until(lambda: shared.waiting == 4, what="the request to wait")
        ticket.cancel()
        t.join(2)  # long before the busy samples (400 steps) free a slot
        assert not t.is_alive() and [c.finish_reason for c in got] == ["cancelled"] * 4
        assert engine.active == 2 and shared.waiting == 0
        busy.join()
    finally:
        shared.close()
