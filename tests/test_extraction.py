"""Answer extraction follows the task (issue 16.8): the last-number fallback is a
per-task opt-in, votes read answers as verdicts do, and the report shows where
passes came from beside a chance baseline."""

import itertools
import json

import numpy as np
import pytest

from testtime import api
from testtime.analysis import chance_probability, extraction_summary
from testtime.errors import InputError
from testtime.metrics import chance_at_k, pass_at_k
from testtime.select import AnswerKeys
from testtime.spec import RunSpec
from testtime.store import Store
from testtime.tasks import Problem, load_task
from testtime.verifiers import MathAnswerVerifier, extract_answer
from testtime.verifiers.math_answer import FINAL_LINE, RULES, STATED, parse_rules

# What the issue saw on MATH-500: prose that never states an answer, credited by its last number.
PROSE = "Exponential growth doubles the amount each period, so after 4 periods it is large."


def test_rules_restrict_extraction():
    assert extract_answer(PROSE) == ("4", "last_number")
    assert extract_answer(PROSE, FINAL_LINE) == (None, "none")
    assert extract_answer(PROSE, STATED) == (None, "none")
    assert extract_answer("work\n#### 12", FINAL_LINE) == (None, "none")
    assert extract_answer("work\n#### 12", STATED) == ("12", "hashes")
    assert extract_answer("Therefore, the final answer is: $\\boxed{4}$. I hope it is correct.",
                          FINAL_LINE) == ("4", "boxed")


def test_a_math_problem_is_not_credited_with_a_lucky_number():
    strict = Problem("p", "q", "4", meta={"answer_rules": list(FINAL_LINE)})
    v = MathAnswerVerifier()
    got = v.verify(strict, PROSE)
    assert got.verdict == "fail" and "boxed, answer_is" in got.reason
    assert v.verify(strict, "The final answer is 4.").verdict == "pass"
    # a problem stored before tasks chose (no rules) is graded as it was
    assert MathAnswerVerifier().verify(Problem("p", "q", "4"), PROSE).verdict == "pass"


def test_the_rule_in_a_verdict_is_the_samples_own_not_a_cached_ones():
    v = MathAnswerVerifier()
    p = Problem("p", "q", "4")
    assert v.verify(p, "The answer is 4.").reason.endswith("(answer_is)")
    assert v.verify(p, "so it is 4").reason.endswith("(last_number)")


def test_each_task_says_how_answers_are_read(tmp_path):
    math = tmp_path / "m.jsonl"
    math.write_text(json.dumps({"problem": "1+1?", "solution": "\\boxed{2}", "level": "Level 1"}) + "\n")
    gsm = tmp_path / "g.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    rules = lambda name, **kw: load_task(name, **kw).problems(1)[0].meta["answer_rules"]  # noqa: E731
    assert rules("math", path=str(math)) == ["boxed", "answer_is"]
    assert rules("gsm8k", path=str(gsm)) == list(RULES)  # the field's convention, said in the task's doc
    assert rules("arithmetic") == list(STATED)
    assert rules("jsonl", path=str(gsm)) == list(STATED)
    assert rules("jsonl", path=str(gsm), answer_rules="boxed,last_number") == ["boxed", "last_number"]
    assert rules("gsm8k", path=str(gsm), answer_rules="answer_is") == ["answer_is"]
    with pytest.raises(InputError, match="unknown extraction rule 'last_numbr'"):
        load_task("math", path=str(math), answer_rules="boxed,last_numbr")
    with pytest.raises(InputError, match="no extraction rule"):
        parse_rules(" , ")


def test_votes_read_answers_as_the_verdicts_do():
    keys = AnswerKeys(use_math_verify=False)
    assert keys.of_text(PROSE) == "num:4/1"
    assert keys.of_text(PROSE, FINAL_LINE) is None


def _spec(task="t"):
    from testtime import SamplingParams

    return RunSpec(model={"engine": "toy"}, task={"name": task}, template={"name": "plain"}, sampling=SamplingParams())


def test_a_run_stored_before_tasks_chose_keeps_one_grading(tmp_path):
    spec = _spec()
    with Store(tmp_path) as store:
        rid = store.register_run(spec, 4, [Problem("a", "q", "1")])
        store.register_run(spec, 4, [Problem("a", "q", "1"), Problem("b", "q", "2", meta={"answer_rules": ["boxed"]})])
        assert [p["meta"] for p in store.problems(rid)] == [{}, {}]
        rid2 = store.register_run(_spec("u"), 4, [Problem("b", "q", "2", meta={"answer_rules": ["boxed"]})])
        assert store.problems(rid2)[0]["meta"] == {"answer_rules": ["boxed"]}


def test_chance_at_k_is_the_subset_expectation():
    rng = np.random.default_rng(0)
    for m in (1, 4, 7):
        q = rng.uniform(0, 1, m)
        for k in range(1, m + 1):
            brute = np.mean([1 - np.prod(1 - q[list(c)]) for c in itertools.combinations(range(m), k)])
            assert chance_at_k(q, [k])[0] == pytest.approx(brute, abs=1e-12)
    assert np.isnan(chance_at_k([0.5], [2])[0])
    # with certain outcomes it is the unbiased pass@k
    assert chance_at_k([1, 0, 0, 1, 0, 0, 0], [3])[0] == pytest.approx(pass_at_k([7], [2], 3)[0])
    with pytest.raises(ValueError):
        chance_at_k([1.5], [1])


def test_chance_probability_by_hand():
    # distinct numbers: 3, 4 (problem), 7 (sample): one of three is the answer
    assert chance_probability("Mia has 3 pens and buys 4.", "3 + 4 = 7, so 7 pens.", "7") == pytest.approx(1 / 3)
    assert chance_probability("no numbers", "none here", "7") == 0.0
    assert chance_probability("x is 2", "2", "\\frac{\\pi}{2}") == 0.0  # not a plain number: never guessed


def test_report_shows_passes_by_rule_and_the_chance_baseline(workspace):
    run = api.sample("arithmetic", n=4, limit=3, engine="toy", task_args={"levels": [1]}, workspace=workspace)
    a = run.analysis()
    ex = a.extraction
    with Store(workspace) as store:
        passes = store.db.execute("SELECT count(*) FROM verdicts WHERE run_id = ? AND verdict = 'pass'",
                                  (run.run_id,)).fetchone()[0]
        again = extraction_summary(store, run.run_id, "math_answer", [1, 2, 4], n=2)
    assert ex["passes"] == passes and ex["passes_by_rule"] == ({"answer_is": passes} if passes else {})
    assert ex["answer_rules"] == {"boxed,answer_is,hashes": 3}
    assert [c["k"] for c in ex["chance"]] == a.table_ks
    assert 0 < ex["chance"][0]["coverage"] <= ex["chance"][-1]["coverage"] < 1
    assert np.isnan(again["chance"][-1]["coverage"])  # k = 4 > the first 2 samples
    page = api.report(run.run_id, workspace=workspace).read_text()
    assert "Where the passes came from" in page and "chance" in page


def _stored_run(store, texts_by_problem, rules):
    from testtime.runner import grade
    from testtime.store import SampleRow

    problems = [Problem(pid, f"Question {pid} with 2 and 5.", answer, meta={"answer_rules": list(rules)})
                for pid, (answer, _) in texts_by_problem.items()]
    rid = store.register_run(_spec(), 4, problems)
    store.add_samples([SampleRow(rid, pid, i, i, text, 10, 0, 5, "stop")
                       for pid, (_, texts) in texts_by_problem.items() for i, text in enumerate(texts)])
    grade(store, rid, MathAnswerVerifier())
    return rid


def test_stated_only_coverage_drops_exactly_the_last_number_passes(tmp_path):
    data = {"a": ("7", ["The answer is 7.", "so 7", "The answer is 3.", "nothing"]),
            "b": ("5", ["it may be 5", "it may be 5", "it is 4", "The answer is 4."])}
    with Store(tmp_path) as store:
        rid = _stored_run(store, data, RULES)
        ex = extraction_summary(store, rid, "math_answer", [1, 2, 4])
        assert ex["passes_by_rule"] == {"last_number": 3, "answer_is": 1}
        # stated only: a has 1 of 4, b has 0 of 4
        assert [c["coverage"] for c in ex["stated"]] == pytest.approx([(1 / 4 + 0) / 2, (1 / 2 + 0) / 2, 0.5])
    # the same data read by the stated rules, graded afresh, gives the same figure
    with Store(tmp_path / "strict") as store:
        strict = _stored_run(store, data, STATED)
        counts = store.counts(strict, "math_answer")
        assert list(counts.c) == [1, 0] and "stated" not in extraction_summary(store, strict, "math_answer", [1])


def test_other_rules_for_a_stored_run_are_refused(tmp_path):
    with Store(tmp_path) as store:
        store.register_run(_spec(), 4, [Problem("a", "q", "1", meta={"answer_rules": list(RULES)})])
        with pytest.raises(InputError, match="reads answers by the rules boxed,answer_is,hashes,last_number"):
            store.register_run(_spec(), 4, [Problem("b", "q", "1", meta={"answer_rules": list(STATED)})])
        store.register_run(_spec(), 4, [Problem("b", "q", "1", meta={"answer_rules": list(RULES)})])
