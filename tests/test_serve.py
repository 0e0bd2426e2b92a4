"""`testtime serve` with the official openai client: strategies per request, usage,
streaming, concurrent requests and OpenAI-style errors."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from testtime.engines.toy import ToyEngine
from testtime.flops import Usage
from testtime.select import AnswerKeys
from testtime.serve import RunningServer, make_app


class CountingToy(ToyEngine):
    """The toy engine, counting the requests that reach it (all through one long call)."""

    def __init__(self):
        super().__init__(answer_range=4)
        self.requests = 0
        self.calls = 0

    def generate(self, requests):
        self.calls += 1

        def counted():
            for r in requests:
                self.requests += r is not None
                yield r

        yield from super().generate(counted())


class Judge:
    """Prefers the answer 3, and counts usage like a real judge."""

    def __init__(self):
        self.usage = Usage()
        self.scored = 0
        self.delay_s = 0.0
        self.unscored = []
        self.lock = threading.Lock()

    def score(self, items):
        time.sleep(self.delay_s)
        out = []
        for it in items:
            self.unscored.append(len(it.steps) - it.known)
            self.usage += Usage.of(100, 0, 1)
            with self.lock:
                self.scored += 1
            out.append([0.9 if "answer is 3" in s else 0.2 for s in it.steps])
        return out


@pytest.fixture
def server():
    engine, judge = CountingToy(), Judge()
    srv = RunningServer(make_app(engine, judge=judge))
    client = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0)
    yield client, engine, judge
    srv.close()


MSG = [{"role": "user", "content": "Tom has 2 apples and finds 1 more. How many apples?"}]


def test_majority_vote_per_request_with_usage(server):
    client, engine, _ = server
    r = client.chat.completions.create(model="majority@8", messages=MSG, seed=7, max_tokens=64)
    text = r.choices[0].message.content
    # the reply is the candidate carrying the most common answer among the 8 samples the toy engine draws
    keys = AnswerKeys()
    from testtime.engines.base import Request
    from testtime.spec import SamplingParams, sample_seed

    # the request is a problem whose id comes from its seed: its samples depend on nothing else
    req = Request(key=0, seeds=tuple(sample_seed(0, "request-7", k) for k in range(8)),
                  params=SamplingParams(max_tokens=64), messages=tuple(MSG))
    texts = [c.text for c in sorted(ToyEngine(answer_range=4).generate([req]), key=lambda c: c.index)]
    answers = [keys.of_text(t) for t in texts]
    winner = max(dict.fromkeys(answers), key=answers.count)
    assert keys.of_text(text) == winner and text == texts[answers.index(winner)]
    assert r.model_extra["testtime"]["votes"] == answers.count(winner)
    assert r.usage.completion_tokens == sum(len(t.split()) for t in texts)  # every internal token counted
    assert r.usage.prompt_tokens == 8 * len(repr(tuple(MSG)).split())
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("rule", [{"threshold": 0.8}, {"threshold": 0.99, "futility": 0.6},
                                  {"threshold": 0.8, "max_ahead": 4}])
def test_adaptive_consistency_stops_a_request_once_decided_and_bills_what_it_drew(server, rule):
    from testtime.adaptive import StopRule, stop_point
    from testtime.engines.base import Request
    from testtime.spec import SamplingParams, sample_seed

    client, _, _ = server
    keys, early = AnswerKeys(), 0
    for seed in range(1, 7):
        r = client.chat.completions.create(model="adaptive_consistency@16", messages=MSG, seed=seed, max_tokens=64,
                                           extra_body={"testtime": {"params": {**rule, "round": 4}}})
        req = Request(key=0, seeds=tuple(sample_seed(0, f"request-{seed}", k) for k in range(16)),
                      params=SamplingParams(max_tokens=64), messages=tuple(MSG))
        texts = [c.text for c in sorted(ToyEngine(answer_range=4).generate([req]), key=lambda c: c.index)]
        stop = StopRule("beta", **{k: v for k, v in rule.items() if k != "max_ahead"})
        m = stop_point([keys.of_text(t) for t in texts], stop, 16)
        d = r.model_extra["testtime"]["decision"]
        assert d["stopped_at"] == m == r.model_extra["testtime"]["candidates"] and d["budget"] == 16
        # every sample drawn is billed (the toy is instant: it may draw past the stop before the
        # decision lands; test_a_decided_request_stops_its_samples shows a timed engine does not)
        assert r.usage.completion_tokens == sum(len(t.split()) for t in texts[:d["drawn"]])
        if rule.get("max_ahead"):  # one request of 4 out at a time: at most 3 drawn past the stop
            assert d["drawn"] - m <= rule["max_ahead"] - 1
        early += m < 16
    assert early  # some requests were decided before the budget


def test_best_of_n_uses_the_judge_and_counts_its_tokens(server):
    client, _, judge = server
    r = client.chat.completions.create(model="best_of_n@8", messages=MSG, seed=3, max_tokens=64)
    assert "answer is 3" in r.choices[0].message.content  # the judge's favourite among the candidates
    assert judge.scored == 8  # every candidate judged once, and only its whole solution (its last step)
    assert judge.unscored == [1] * 8
    assert r.usage.prompt_tokens == 8 * 100 + 8 * len(repr(tuple(MSG)).split())  # samples' and judge's prompts
    explicit = client.chat.completions.create(model="anything-else", messages=MSG, seed=3, max_tokens=64,
                                              extra_body={"testtime": {"strategy": "best_of_n", "n": 8}})
    assert explicit.choices[0].message.content == r.choices[0].message.content


def test_concurrent_requests_are_each_billed_for_their_own_judging(server):
    client, _, judge = server
    judge.delay_s = 0.3  # the two requests' scoring overlaps in time

    def ask(seed):
        return client.chat.completions.create(model="best_of_n@8", messages=MSG, seed=seed, max_tokens=64)

    with ThreadPoolExecutor(2) as ex:
        a, b = ex.map(ask, (1, 2))
    for r in (a, b):  # 8 samples' prompts and 8 judge calls each, never the other request's
        assert r.usage.prompt_tokens == 8 * 100 + 8 * len(repr(tuple(MSG)).split())


def test_streaming_returns_the_final_answer(server):
    client, _, _ = server
    plain = client.chat.completions.create(model="majority@4", messages=MSG, seed=11)
    chunks = list(client.chat.completions.create(model="majority@4", messages=MSG, seed=11, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    # with include_usage, the last chunk has no choices and the whole request's usage
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_concurrent_requests_are_answered_and_batched(server):
    client, engine, _ = server

    def ask(i):
        return client.chat.completions.create(model="majority@4", messages=[{"role": "user", "content": f"q{i}"}],
                                              seed=i).choices[0].message.content

    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(ask, range(16)))
    assert len(answers) == 16 and all("answer is" in a for a in answers)
    # each answer is what the same request gets alone: batching never changes a reply
    assert answers[5] == ask(5)
    # every request's samples went to the engine through one long generate call
    assert engine.calls == 1 and engine.requests == 17


def test_bad_requests_get_openai_style_errors(server):
    client, _, _ = server
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-99", messages=MSG)
    assert e.value.body["code"] == "model_not_found" and "names no strategy" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="majority@8", messages=[])
    assert e.value.body["param"] == "messages" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match=r"n must be an integer in \[1, 64\]"):
        client.chat.completions.create(model="majority@1000", messages=MSG)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="majority@2", messages=MSG, temperature=-1)
    assert [m.id for m in client.models.list()][:2] == ["sample", "majority@4"]


@pytest.mark.model
@pytest.mark.slow
def test_serve_command_on_the_embedded_model(tmp_path):
    """The real command, on the embedded model, asked through the openai client."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import os

    proc = subprocess.Popen([sys.executable, "-m", "testtime.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "TESTTIME_API_KEY": "k-123"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-123", max_retries=0, timeout=300)
        deadline = time.time() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and proc.poll() is None, "serve did not start"
                time.sleep(0.5)
        r = client.chat.completions.create(model="majority@4", max_tokens=48, seed=1, messages=[
            {"role": "user", "content": "Mia has 4 pens and buys 3 more. How many pens does she have?"}])
        assert r.choices[0].message.content and r.model_extra["testtime"]["candidates"] == 4
        assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens >= 4 * 10
        b = client.chat.completions.create(model="best_of_n@2", max_tokens=32, seed=1, messages=[
            {"role": "user", "content": "What is 2 + 3?"}])
        assert b.usage.prompt_tokens > r.usage.prompt_tokens / 4  # samples and the judge's prompts
        # one sample streamed token by token is the sample asked for without streaming
        ask = dict(model="sample", max_tokens=40, seed=2, messages=[{"role": "user", "content": "Name three fruits."}])
        plain = client.chat.completions.create(**ask).choices[0].message.content
        parts = [c.choices[0].delta.content for c in client.chat.completions.create(**ask, stream=True)
                 if c.choices and c.choices[0].delta.content]
        assert len(parts) > 5 and "".join(parts) == plain
        with pytest.raises(openai.BadRequestError) as e:  # checked against the engine's context, before it runs
            client.chat.completions.create(model="majority@2", max_tokens=900, messages=[
                {"role": "user", "content": "apple " * 400}])
        assert e.value.body["param"] == "max_tokens" and "exceeds the 1024 tokens" in e.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(30)


def _policy(kind="predicted"):
    from testtime.difficulty import DifficultyBins
    from testtime.policy import Choice, Policy

    bins = DifficultyBins(kind, [0.8, 0.6, 0.4, 0.3])
    easy, hard = Choice("majority", 4, 0.5, 3), Choice("beam_search(width=2)", 4, 0.2, 3)
    from testtime.optimal import Candidates
    from testtime.spec import SamplingParams

    cands = Candidates(("best_of_n", "majority", "beam_search"), {"max_steps": 2, "step_tokens": 16},
                       {"width": [2]}, 4, 4, SamplingParams(max_tokens=32), probe=2)
    return Policy({4: {1: easy, 2: easy, 3: easy, 4: hard, 5: hard}}, {4: easy}, bins,
                  {"candidates": cands.to_dict()})


def test_a_policy_picks_the_strategy_per_request_from_the_probe():
    engine, judge = CountingToy(), Judge()
    pol = _policy()
    srv = RunningServer(make_app(engine, judge=judge, policy=pol))
    client = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0)
    try:
        seen = set()
        for seed in range(12):
            r = client.chat.completions.create(model="policy@4", seed=seed, messages=[
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "The answer is 2."}, {"role": "user", "content": "2+1?"}])
            info = r.model_extra["testtime"]["policy"]
            c = pol.choose(4, info["bin"])
            assert info["choice"] == f"{c.config} N={c.n}"
            assert r.usage.completion_tokens > 0 and r.choices[0].message.content
            seen.add(c.config)
        assert seen == {"majority", "beam_search(width=2)"}  # the probe sends requests both ways
        assert "policy@4" in [m.id for m in client.models.list()]
        with pytest.raises(openai.BadRequestError, match="alternating"):
            client.chat.completions.create(model="policy@4", messages=[{"role": "assistant", "content": "x"}])
    finally:
        srv.close()
    with pytest.raises(ValueError, match="predicted"):
        make_app(engine, judge=judge, policy=_policy("oracle"))
    old = _policy()
    old.meta = {"search": {"iterations": 2}}  # a policy file from before strategies were runs
    with pytest.raises(ValueError, match="fit it again"):
        make_app(engine, judge=judge, policy=old)


def test_thought_response_answers_with_the_response_and_the_thought_as_reasoning(server):
    client, _, _ = server
    r = client.chat.completions.create(model="thought_response@3", messages=MSG, seed=2, max_tokens=32,
                                       extra_body={"testtime": {"params": {"thought_tokens": 4}}})
    msg = r.choices[0].message
    thought = msg.model_extra["reasoning"]
    # the toy engine's thought is cut at 4 words; the response is what followed the marker line
    assert thought.startswith("Let me think") and len(thought.split()) == 4
    assert msg.content.startswith("Let me think") and "Here is my response" not in msg.content + thought
    assert sum(r.model_extra["testtime"]["decision"]["thought_ended"].values()) == 3
    stream = client.chat.completions.create(model="thought_response@3", messages=MSG, seed=2, max_tokens=32,
                                            stream=True, extra_body={"testtime": {"params": {"thought_tokens": 4}}})
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning", "") for d in deltas) == thought
    assert "".join(d.content or "" for d in deltas) == msg.content
    done = client.completions.create(model="thought_response@3", prompt="Say hi.", max_tokens=8,
                                     extra_body={"testtime": {"params": {"thought_tokens": 4}}})
    assert "Here is my response" not in done.choices[0].text


def test_policy_requests_need_a_policy(server):
    client, _, _ = server
    with pytest.raises(openai.NotFoundError, match="no policy"):
        client.chat.completions.create(model="policy@4", messages=MSG)


def test_every_registered_strategy_is_servable_with_its_parameters(server):
    from testtime.strategies import STRATEGIES

    client, _, judge = server
    step = {"max_steps": 2, "step_tokens": 16, "delimiter": "."}
    asked = {"beam_search@4": {**step, "width": 2}, "dvts@4": {**step, "width": 2},
             "lookahead@4": {**step, "width": 2, "lookahead": 1}, "revision@4": {"sequential": 2},
             "repeated_sampling@3": {}, "majority@3": {}, "best_of_n@3": {},
             "adaptive_consistency@4": {"threshold": 0.8}, "particle_filtering@4": step,
             "thought_response@2": {"thought_tokens": 8}}
    builtin = {s for s in STRATEGIES.names() if STRATEGIES.get(s).__module__.startswith("testtime.")}
    # a new built-in strategy gets a line here; the policy is served with the server's own file (below)
    assert {m.split("@")[0] for m in asked} == builtin - {"policy", "deepconf_online"}
    for model, params in asked.items():
        before = judge.scored
        r = client.chat.completions.create(model=model, messages=MSG, seed=1, max_tokens=32,
                                           extra_body={"testtime": {"params": params}})
        info = r.model_extra["testtime"]
        assert r.choices[0].message.content and info["strategy"] == model.split("@")[0], model
        assert info["candidates"] >= 1 and r.usage.completion_tokens > 0, model
        judged = judge.scored > before
        # votes never ask the judge
        assert judged == (model.split("@")[0] not in ("majority", "adaptive_consistency", "thought_response")), model
    # deepconf_online needs an engine that can stop a sample on confidence: this server's (toy) cannot
    with pytest.raises(openai.BadRequestError, match="deepconf_online needs an engine with stops_on_confidence"):
        client.chat.completions.create(model="deepconf_online@4", messages=MSG)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="beam_search@4", messages=MSG,
                                       extra_body={"testtime": {"params": {"width": 3}}})
    assert e.value.body["param"] == "testtime.params" and "width must be an integer" in e.value.body["message"]
    ids = [m.id for m in client.models.list()]
    assert "revision@8" in ids and "beam_search@8" in ids and not any(i.startswith("policy") for i in ids)
    with pytest.raises(openai.NotFoundError, match="no policy"):  # a request never names a policy file
        client.chat.completions.create(model="x", messages=MSG, extra_body={"testtime": {
            "strategy": "policy", "params": {"path": "/etc/passwd"}}})
