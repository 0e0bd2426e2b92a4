"""Thought preference data (issue 14, part 5): the judge sees the instruction and the
response, never the thought; ratings are the expected digit; pairs take the best and
the worst outputs by length-controlled score, in TRL's DPO format."""

from __future__ import annotations

import json
import math

import pytest

from testtime import api
from testtime.engines.base import Completion, TokenLogprob
from testtime.errors import InputError
from testtime.runner import draw_samples
from testtime.spec import SamplingParams, SpecError
from testtime.store import Store
from testtime.tasks import load_task
from testtime.tpo import ResponseJudge, expected_rating, judge_run, tpo_rows
from testtime.verifiers.response import split_thought

THOUGHTS = ["SECRET-PLAN-{i}: keep it short.", "SECRET-PLAN-{i}: be thorough and kind."]


class Writer:
    """Writes 'thought, marker, response': sample i's response has i+1 sentences; every
    fourth output forgets the marker."""

    name = "writer"

    def identity(self):
        return {"engine": "writer"}

    def generate(self, requests):
        for req in requests:
            for i, seed in enumerate(req.seeds):
                k = seed % 5
                thought = THOUGHTS[k % 2].format(i=k)
                body = " ".join(["Good point."] * (k + 1))
                text = thought if k == 4 else f"{thought}\nHere is my response:\n{body}"
                yield Completion(req.key, i, seed, text, [1] * 5, 20, 0, "stop")

    def close(self):
        pass


class Judge:
    """Rates by the response's sentence count (more is better, up to 3); records prompts."""

    name = "judge"

    def __init__(self):
        self.prompts: list[str] = []

    def identity(self):
        return {"engine": "judge"}

    def generate(self, requests):
        for req in requests:
            text = "\n".join(m["content"] for m in req.messages)
            self.prompts.append(text)
            n = min(text.count("Good point."), 3)
            top = {str(2 + 2 * n): math.log(0.75), str(1 + 2 * n): math.log(0.25), "The": math.log(0.01)}
            yield Completion(req.key, 0, 0, str(2 + 2 * n), [1], 30, 10, "length",
                             logprobs=[TokenLogprob(str(2 + 2 * n), top[str(2 + 2 * n)], top)])

    def close(self):
        pass


class Thinker:
    """Writes a thought, then (asked to go on after the marker line) a response. By seed:
    0 writes the marker itself (the engine cuts it as a stop string), 1 ends its text
    after a short thought, 2 thinks past any limit. Reads a lazy stream as engines do."""

    name = "thinker"

    def __init__(self):
        self.requests = []

    def identity(self):
        return {"engine": "thinker"}

    def generate(self, requests):
        waited = False
        for req in requests:
            if req is None:
                assert not waited, "the stream waited twice with nothing running"
                waited = True
                continue
            waited = False
            self.requests.append(req)
            for i, seed in enumerate(req.seeds):
                if req.continuation.endswith("Here is my response:\n"):
                    words, reason, hit = ["Good", "point."] * (seed % 3 + 1), "stop", None
                else:
                    k = seed % 3
                    words = [f"SECRET-PLAN-{k}:", "think", "it", "over."] + ["more"] * (50 if k == 2 else 0)
                    reason, hit = "stop", None
                    if k == 0:
                        words += ["Here", "is", "my", "response:", "Hi"]
                    text = " ".join(words)
                    for s in req.params.stop:
                        if s in text:
                            words, hit = text[:text.index(s)].split(), s
                    if len(words) > req.params.max_tokens:
                        words, reason = words[:req.params.max_tokens], "length"
                yield Completion(req.key, i, seed, " ".join(words), list(range(len(words))), 12,
                                 0 if not req.continuation.endswith(":\n") else 10, reason, stop_hit=hit)

    def close(self):
        pass


def test_thought_response_writes_the_format_the_model_forgets(tmp_path):
    ws = tmp_path / "ws"
    eng = Thinker()
    r = api.sample("instructions", 6, 4, engine=eng, strategy="thought_response",
                   strategy_args={"thought_tokens": 10}, params=SamplingParams(max_tokens=8), workspace=ws)
    thoughts = [q for q in eng.requests if q.key[0] == "thought"]
    responses = [q for q in eng.requests if q.key[0] == "response"]
    assert len(thoughts) == 4 and len(responses) == 24
    assert all(q.params.max_tokens == 10 and "Here is my response:" in q.params.stop and q.retain for q in thoughts)
    assert all(q.params.max_tokens == 8 and "Here is my response:" in q.params.stop for q in responses)
    with Store(ws) as store:
        samples = list(store.samples(r.run_id))
        decisions = store.decisions(r.run_id)
        usage = store.usage(r.run_id)
    assert len(samples) == 24
    ends = {"marker": 0, "end_of_text": 0, "length": 0}
    for s in samples:
        thought, response = split_thought(s.text)
        assert thought.startswith("SECRET-PLAN-") and response.startswith("Good point.")
        assert s.text.count("Here is my response:") == 1  # the model's own marker was cut, one is written
        k = s.seed % 3
        ends[["marker", "end_of_text", "length"][k]] += 1
        assert len(thought.split()) == (4 if k < 2 else 10)
        assert s.completion_tokens == len(thought.split()) + len(response.split())
        # the response continued the prompt's opening, the thought and the marker line
        req = next(q for q in responses if q.key[1:] == (s.problem_id, s.sample_index))
        assert req.continuation.endswith(thought + "\nHere is my response:\n") and req.seeds[0] != s.seed
    for d in decisions.values():
        assert sum(d["thought_ended"].values()) == 6 and d["thought_tokens"] == 10
    assert {k: sum(d["thought_ended"].get(k, 0) for d in decisions.values()) for k in ends} == ends
    assert all(v > 0 for v in ends.values())
    total = sum(u["decode"] for u in usage.values())
    assert total == sum(s.completion_tokens for s in samples)
    # every output can be judged, so the export has a pair per instruction
    res = api.judge_responses(r.run_id, engine=Judge(), workspace=ws)
    assert res["rated"] == 24 and res["without_response"] == 0
    rows = [json.loads(x) for x in open(api.export(r.run_id, tmp_path / "t.jsonl", "tpo", ws))]
    assert len(rows) == 4
    with pytest.raises(SpecError, match="thought_tokens"):
        api.sample("instructions", 2, 1, engine=Thinker(), strategy="thought_response",
                   strategy_args={"thought_tokens": 0}, workspace=ws)


def test_expected_rating_reads_digits_only():
    assert expected_rating({"7": math.log(0.5), "3": math.log(0.5), "yes": 0.0}) == pytest.approx(5.0)
    assert expected_rating({" 9": math.log(0.2)}) == pytest.approx(9.0)
    assert expected_rating({"10": 0.0, "x": 0.0}) is None


def test_split_thought():
    assert split_thought("plan\nHere is my response:\nHi!") == ("plan", "Hi!")
    assert split_thought("plan only") == ("plan only", None)
    assert split_thought("plan\nHere is my response:\n  ") == ("plan", None)


def test_judge_never_sees_the_thought_and_pairs_follow_length_controlled_scores(tmp_path):
    task = load_task("instructions")
    assert len(task.problems()) == 40
    with Store(tmp_path) as store:
        res = draw_samples(store, task, Writer(), 8, SamplingParams(temperature=1.0), limit=6)
        rid = res.run_id
        judge = ResponseJudge(Judge())
        rated, malformed = judge_run(store, rid, judge)
        assert rated + malformed == 48 and malformed > 0
        prompts = judge.engine.prompts
        assert len(prompts) == rated
        assert not any("SECRET-PLAN" in p for p in prompts)  # the thought never reaches the judge
        assert all("Here is my response" not in p for p in prompts)
        assert judge_run(store, rid, judge) == (0, malformed)  # rated ones are not rated again
        samples = {(s.problem_id, s.sample_index): s.text for s in store.samples(rid)}
        pairs = list(tpo_rows(store, rid, rho=0.0))
        assert pairs
        for p in pairs:
            m = p["metadata"]
            chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
            assert chosen == samples[m["problem_id"], m["chosen_index"]]  # the whole output, thought included
            assert rejected == samples[m["problem_id"], m["rejected_index"]]
            assert "SECRET-PLAN" in chosen and m["chosen_score"] > m["rejected_score"]
            assert m["chosen_rating"] >= m["rejected_rating"]
            assert p["prompt"][-1]["role"] == "user" and "Here is my response:" in p["prompt"][-1]["content"]
            # no pair takes an output without a response
            assert split_thought(chosen)[1] is not None and split_thought(rejected)[1] is not None
        # a heavy length penalty reverses the preference for longer responses
        long_pen = list(tpo_rows(store, rid, rho=50.0))
        assert all(q["metadata"]["chosen_words"] <= q["metadata"]["rejected_words"] for q in long_pen)
        with pytest.raises(InputError, match="rho"):
            list(tpo_rows(store, rid, rho=-1))


def test_tpo_export_through_the_api_and_a_run_without_ratings(tmp_path):
    ws = tmp_path / "ws"
    with Store(ws) as store:
        rid = draw_samples(store, load_task("instructions"), Writer(), 4, SamplingParams(), limit=3).run_id
    with pytest.raises(InputError, match="judge-responses"):
        api.export(rid, tmp_path / "t.jsonl", "tpo", ws)
    r = api.judge_responses(rid, engine=Judge(), workspace=ws)
    assert r["rated"] > 0 and r["scorer"].startswith("response_judge:")
    rows = [json.loads(x) for x in open(api.export(rid, tmp_path / "t.jsonl", "tpo", ws))]
    assert rows and set(rows[0]) == {"prompt", "chosen", "rejected", "metadata"}


def test_instructions_file_errors_name_the_row(tmp_path):
    bad = tmp_path / "i.jsonl"
    bad.write_text('{"instruction": "Say hi."}\n{"prompt": "x"}\n')
    with pytest.raises(InputError, match=r"i.jsonl:2: missing field 'instruction'"):
        load_task("instructions", path=str(bad)).problems()


class Recorder:
    """Passes everything to an engine and keeps its completions."""

    def __init__(self, engine):
        self.engine, self.name, self.completions = engine, engine.name, []

    def identity(self):
        return self.engine.identity()

    def generate(self, requests):
        for c in self.engine.generate(requests):
            self.completions.append(c)
            yield c

    def close(self):
        pass


@pytest.mark.model
def test_thought_response_on_the_embedded_model_reuses_the_thoughts_cache(engine, tmp_path):
    rec = Recorder(engine)
    r = api.sample("instructions", 2, 2, engine=rec, strategy="thought_response",
                   strategy_args={"thought_tokens": 12}, params=SamplingParams(max_tokens=12), workspace=tmp_path)
    thoughts = {(c.key[1], c.index): c for c in rec.completions if c.key[0] == "thought"}
    responses = [c for c in rec.completions if c.key[0] == "response"]
    assert len(thoughts) == 4 and len(responses) == 4
    for c in responses:
        t = thoughts[c.key[1], c.key[2]]
        # the response's prompt is the thought's prompt, the thought and the marker line; all
        # but the last few tokens were kept from the thought (re-tokenising may differ there)
        assert c.prompt_tokens > t.prompt_tokens + t.completion_tokens
        assert c.cached_tokens >= t.prompt_tokens + t.completion_tokens - 3
    with Store(tmp_path) as store:
        samples = store.samples(r.run_id)
        assert len(samples) == 4 and all(s.text.count("Here is my response:") == 1 for s in samples)
