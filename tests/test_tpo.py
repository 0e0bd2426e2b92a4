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
from testtime.spec import SamplingParams
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
