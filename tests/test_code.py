"""Code tasks (HumanEval, MBPP, custom JSONL) and the code verifier, end to end
through the sandbox and the store."""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any, Iterable, Iterator

import pytest

from testtime.engines.base import Completion, Request
from testtime.runner import draw_samples, grade
from testtime.sandbox import Limits, SandboxError
from testtime.spec import SamplingParams
from testtime.store import Store
from testtime.tasks import DatasetError, load_task
from testtime.verifiers.code import CodeExecutionNotAllowed, CodeVerifier, assemble, defines, extract_code

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")


@pytest.fixture(scope="module")
def verifier():
    v = CodeVerifier(workers=2, limits=Limits(timeout_s=3.0))
    yield v
    v.close()


@pytest.fixture(scope="module")
def humaneval():
    return load_task("humaneval").problems()


def test_humaneval_is_the_bundled_164(humaneval):
    assert len(humaneval) == 164
    p = humaneval[0]
    assert p.id == "HumanEval/0" and p.question == p.meta["prompt_code"]
    assert "def has_close_elements(" in p.question and p.meta["entry_point"] == "has_close_elements"
    assert p.meta["tests"].rstrip().endswith("check(has_close_elements)")
    assert p.meta["allow_code_execution"] is True


def test_every_humaneval_reference_passes_and_a_stub_fails(verifier, humaneval):
    refs = verifier.verify_many([(p, p.meta["reference"]) for p in humaneval])
    assert [p.id for p, v in zip(humaneval, refs) if not v.passed] == []
    stubs = verifier.verify_many([(p, f"def {p.meta['entry_point']}(*args):\n    return None\n") for p in humaneval])
    assert not any(v.passed for v in stubs)
    assert Counter(v.verdict for v in stubs)["fail"] > 150


def test_extract_code():
    assert extract_code("    return 1\n") == "    return 1\n"
    assert extract_code("```python\ndef f():\n    return 1\n```\nThis works.") == "def f():\n    return 1\n"
    # the template opened the block; the model closed it and went on talking
    assert extract_code("def f():\n    return 1\n```\n\nThis function returns one.") == "def f():\n    return 1\n"
    # prose first, then a block
    assert extract_code("Here it is:\n```py\nx = 2\n```\nmore\n```\ny\n```") == "x = 2\n"


def test_defines_finds_top_level_functions_only():
    assert defines("import math\n\ndef f(x):\n    return x\n", "f")
    assert not defines("def g():\n    def f():\n        pass\n", "f")
    assert defines("def f(:\n  broken", "f")  # unparseable text falls back to a line match


def test_body_and_whole_function_are_assembled(verifier, humaneval):
    p = humaneval[2]  # truncate_number
    body = "    return number % 1.0\n"
    whole = "def truncate_number(number: float) -> float:\n    return number - int(number)\n"
    prog_body, _ = assemble(p, body)
    prog_whole, tests_from = assemble(p, whole)
    assert prog_body.startswith(p.meta["prompt_code"] + body)
    assert prog_whole.count("def truncate_number(") == 2  # the prompt's, replaced by the candidate's
    assert prog_whole.splitlines()[tests_from - 1:] == p.meta["tests"].splitlines()
    assert [v.verdict for v in verifier.verify_many([(p, body), (p, whole), (p, "```python\n" + whole + "```")])] \
        == ["pass", "pass", "pass"]


@pytest.mark.parametrize("candidate, verdict, reason", [
    ("    return 0.5\n", "fail", "AssertionError in the tests"),
    ("    return undefined_name\n", "error", "NameError in the candidate"),
    ("    import sys\n    sys.exit(0)\n", "fail", "before the tests finished"),
    ("    import os\n    os._exit(0)\n", "fail", "before its last line"),
    ("    while True:\n        pass\n", "timeout", "wall clock"),
    ("    return len(bytearray(2**40))\n", "memory", "MemoryError"),
    ("    return (\n", "error", "SyntaxError"),
])
def test_verdicts(verifier, humaneval, candidate, verdict, reason):
    v = verifier.verify(humaneval[2], candidate)
    assert v.verdict == verdict and reason in v.reason, v


def test_canaries_pass_on_real_problems_and_are_recorded(verifier, humaneval):
    info = verifier.prepare(humaneval[:3])
    assert info["canaries_with_reference"] == 3
    assert "reference solution of HumanEval/0" in info["canaries"]
    assert "network" in info["sandbox"]["summary"]


def test_a_broken_harness_stops_the_run_instead_of_reporting_zero(verifier, humaneval):
    p = humaneval[0]
    broken = type(p)(p.id, p.question, None, None, dict(p.meta, tests="assert False, 'harness bug'\n"))
    with pytest.raises(SandboxError, match="(?s)golden canaries failed.*reference solution of HumanEval/0"):
        verifier.prepare([broken])
    lenient = type(p)(p.id, p.question, None, None, dict(p.meta, tests="pass\n"))
    with pytest.raises(SandboxError, match="known-wrong candidate"):
        verifier.prepare([lenient])


# ---------------------------------------------------------------- MBPP and custom tasks

MBPP_ROWS = [
    {"task_id": 901, "text": "Write a function to return the sum of the squares of a list of integers.",
     "code": "def square_sum(xs):\n    return sum(x * x for x in xs)\n",
     "test_list": ["assert square_sum([1, 2, 3]) == 14", "assert square_sum([]) == 0"],
     "test_setup_code": "", "challenge_test_list": ["assert square_sum([-4]) == 16"]},
    {"task_id": 902, "text": "Write a function that reverses the words of a sentence.",
     "code": "def reverse_words(s):\n    return ' '.join(reversed(s.split()))\n",
     "test_list": ["assert reverse_words('a b c') == 'c b a'"], "test_setup_code": "import string",
     "challenge_test_list": []},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mbpp_from_a_file(tmp_path, verifier):
    task = load_task("mbpp", path=str(_write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)))
    ps = task.problems()
    assert [p.id for p in ps] == ["901", "902"] and task.template == "code_write" and task.verifier == "code"
    assert "assert square_sum([1, 2, 3]) == 14" in ps[0].question  # the example tests are shown
    assert "[-4]" not in ps[0].question  # the challenge tests are not, but they run
    assert ps[0].meta["entry_point"] == "square_sum" and ps[1].meta["setup"] == "import string"
    verdicts = verifier.verify_many([(ps[0], ps[0].meta["reference"]), (ps[1], ps[1].meta["reference"]),
                                     (ps[0], "def square_sum(xs):\n    return sum(xs)\n")])
    assert [v.verdict for v in verdicts] == ["pass", "pass", "fail"]


def test_mbpp_bad_rows_name_the_line(tmp_path):
    rows = [dict(MBPP_ROWS[0]), dict(MBPP_ROWS[1], test_list="assert True")]
    with pytest.raises(DatasetError, match=r"mbpp.jsonl:2: field 'test_list'"):
        load_task("mbpp", path=str(_write_jsonl(tmp_path / "mbpp.jsonl", rows))).problems()


class ScriptedEngine:
    """Answers each problem with the same fixed list of candidates."""

    name = "scripted"

    def __init__(self, candidates: list[str]):
        self.candidates = candidates

    def identity(self) -> dict[str, Any]:
        return {"engine": "scripted", "candidates": self.candidates}

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        for req in requests:
            for i, seed in enumerate(req.seeds):
                text = self.candidates[req.key[1][i] % len(self.candidates)]
                yield Completion(req.key, i, seed, text, [0] * 5, 10, 0, "stop")

    def close(self) -> None:
        pass


CUSTOM = [{"id": "double", "question": "Write double(x).", "tests": "assert double(2) == 4\nassert double(-1) == -2\n",
           "entry": "double", "ref": "def double(x):\n    return 2 * x\n"}]
CANDIDATES = ["def double(x):\n    return x + x\n", "def double(x):\n    return x * x\n",
              "def double(x):\n    while True:\n        pass\n",
              "def double(x):\n    return 2 * x\nimport os\nos.kill(os.getppid(), 9)\n"]


def test_custom_code_task_needs_the_opt_in(tmp_path):
    path = _write_jsonl(tmp_path / "custom.jsonl", CUSTOM)
    args = dict(path=str(path), id_field="id", tests_field="tests", entry_point_field="entry", reference_field="ref")
    task = load_task("jsonl", **args)
    assert task.verifier == "code"
    with Store(tmp_path / "ws") as store:
        r = draw_samples(store, task, ScriptedEngine(CANDIDATES), 4, SamplingParams(max_tokens=64))
        v = CodeVerifier(workers=1, limits=Limits(timeout_s=1.5))
        try:
            with pytest.raises(CodeExecutionNotAllowed, match="--allow-code-execution") as refused:
                grade(store, r.run_id, v)
            assert store.db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 0  # nothing ran
        finally:
            v.close()
        # issue 16.14: the advice must work on the run as stored. The task's argument does not (the
        # problems are stored without it); what the message names first does
        assert "testtime grade RUN --allow-code-execution" in str(refused.value)
        opted = CodeVerifier(workers=1, limits=Limits(timeout_s=1.5), allow_code_execution=True)
        try:
            assert grade(store, r.run_id, opted) == 4
        finally:
            opted.close()


def test_code_run_graded_through_the_store(tmp_path):
    path = _write_jsonl(tmp_path / "custom.jsonl", CUSTOM)
    task = load_task("jsonl", path=str(path), id_field="id", tests_field="tests", entry_point_field="entry",
                     reference_field="ref", allow_code_execution="true")
    with Store(tmp_path / "ws") as store:
        r = draw_samples(store, task, ScriptedEngine(CANDIDATES), 8, SamplingParams(max_tokens=64))
        v = CodeVerifier(workers=2, limits=Limits(timeout_s=1.5))
        try:
            assert grade(store, r.run_id, v) == 8
            assert grade(store, r.run_id, v) == 0  # idempotent
        finally:
            v.close()
        verdicts = [row[0] for row in store.db.execute(
            "SELECT verdict FROM verdicts WHERE run_id = ? ORDER BY sample_index", (r.run_id,))]
        assert verdicts[:3] == ["pass", "fail", "timeout"]
        # Killing the parent: in a PID namespace the parent is out of reach, so the
        # program runs on and passes; without one it kills its own group.
        assert verdicts[3] == ("pass" if info_pid_ns(store, r.run_id) else "error")
        assert verdicts == verdicts[:4] * 2
        info = store.grading_info(r.run_id, "code")
        assert info["canaries_with_reference"] == 1 and "rlimits" in info["sandbox"]["summary"]
        assert int(store.counts(r.run_id, "code").c.sum()) == (4 if info_pid_ns(store, r.run_id) else 2)


def info_pid_ns(store, run_id):
    return store.grading_info(run_id, "code")["sandbox"]["isolation"]["pid_namespace"]
