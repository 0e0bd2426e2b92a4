import json
import re

import numpy as np
import pytest

from conftest import GSM8K_TRAIN, requires_gsm8k
from testtime.errors import InputError
from testtime.tasks import DatasetError, load_task
from testtime.tasks.arithmetic import LEVELS, make_problem
from testtime.tasks.gsm8k import parse_gsm8k_answer


def evaluate(expr: str) -> int:
    return int(eval(expr.replace("x", "*").replace("/", "//")))  # our own generated expression


def test_arithmetic_answers_match_their_expression_at_every_level():
    for level in LEVELS:
        for i in range(200):
            p = make_problem(7, level, i)
            assert int(p.answer) == evaluate(p.meta["expression"]), p
            assert int(p.answer) >= 0
            assert p.difficulty == level
            n_ops = len(re.findall(r" [-+x/] ", p.meta["expression"]))
            assert n_ops == LEVELS[level][0]


def test_arithmetic_is_seeded_and_extends_with_limit():
    t = load_task("arithmetic", levels=[1, 2, 3], seed=3)
    small, large = t.problems(6), t.problems(30)
    assert small == large[:6]
    assert [p.difficulty for p in small] == [1, 2, 3, 1, 2, 3]
    assert load_task("arithmetic", levels=[1, 2, 3], seed=3).problems(6) == small
    assert load_task("arithmetic", levels=[1, 2, 3], seed=4).problems(6) != small
    assert len({p.id for p in large}) == 30


def test_arithmetic_rejects_unknown_levels():
    with pytest.raises(ValueError, match="levels"):
        load_task("arithmetic", levels=[0, 6])
    # what `--arg` passes on when a value is not a number: an error naming it, not a traceback
    with pytest.raises(InputError, match=r"levels must be level numbers .* levels=1,2; got \['\[1\]'\]"):
        load_task("arithmetic", levels="[1]")
    for levels in ([1.5], [True]):
        with pytest.raises(InputError, match="levels must be level numbers"):
            load_task("arithmetic", levels=levels)
    for seed in ("abc", 1.5, True):
        with pytest.raises(InputError, match="seed must be an integer"):
            load_task("arithmetic", seed=seed)
    assert load_task("arithmetic", seed=np.int64(3)).identity == load_task("arithmetic", seed=3).identity


def test_unknown_task_lists_known_ones():
    with pytest.raises(KeyError, match="Did you mean 'gsm8k'.*Known: arithmetic, gsm8k, humaneval, instructions, jsonl, math, mbpp"):
        load_task("gsm8")


def write(tmp_path, lines):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_task_maps_fields_and_skips_blank_lines(tmp_path):
    p = write(tmp_path, [json.dumps({"q": "What is 2+2?", "a": 4, "id": "x1", "lvl": "Level 3"}), "",
                         json.dumps({"q": "3*3?", "a": "9", "id": "x2", "lvl": 1})])
    t = load_task("jsonl", path=p, question_field="q", answer_field="a", id_field="id", difficulty_field="lvl")
    probs = t.problems()
    assert [(x.id, x.question, x.answer, x.difficulty) for x in probs] == [
        ("x1", "What is 2+2?", "4", 3), ("x2", "3*3?", "9", 1)]


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "answer": ', "data.jsonl:2: not valid JSON"),
    ('["a list"]', "data.jsonl:2: expected a JSON object"),
    ('{"question": "q"}', "data.jsonl:2: missing field 'answer'"),
    ('{"question": {"x": 1}, "answer": "1"}', "data.jsonl:2: field 'question' must be text"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    p = write(tmp_path, ['{"question": "ok", "answer": "1"}', line])
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_task("jsonl", path=p).problems()


def test_jsonl_duplicate_ids_and_missing_file(tmp_path):
    p = write(tmp_path, ['{"question": "a", "answer": "1", "id": "x"}', '{"question": "b", "answer": "2", "id": "x"}'])
    with pytest.raises(DatasetError, match="duplicate problem id 'x'"):
        load_task("jsonl", path=p, id_field="id").problems()
    with pytest.raises(InputError, match="nope.jsonl"):
        load_task("jsonl", path=tmp_path / "nope.jsonl")


def test_gsm8k_answer_parsing():
    final, steps = parse_gsm8k_answer("He has 3+4=<<3+4=7>>7.\nThen 7*1,000 = 7,000\n#### 7,000", "x")
    assert final == "7000" and steps == 2
    with pytest.raises(DatasetError, match="no '#### <final answer>'"):
        parse_gsm8k_answer("no marker", "f:3")


@requires_gsm8k
def test_gsm8k_from_the_shared_training_split():
    t = load_task("gsm8k", path=GSM8K_TRAIN)
    probs = t.problems(50)
    assert len(probs) == 50
    assert probs[0].id == "row1"
    assert all(re.fullmatch(r"-?[\d.]+", p.answer) for p in probs)
    assert {p.difficulty for p in probs} <= {1, 2, 3, 4, 5}
    assert t.identity["sha256"] and t.template == "math_cot"


def test_math_task_reads_math500_and_original_math_rows(tmp_path):
    rows = [
        {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "answer": "2", "level": 1,
         "subject": "Prealgebra", "unique_id": "test/prealgebra/1.json"},
        # original MATH: no answer field, "Level N", subject under "type"
        {"problem": "Simplify $\\frac{2}{4}$.", "solution": "So $\\boxed{\\frac{1}{2}}$.",
         "level": "Level 4", "type": "Algebra"},
        {"problem": "Odd one.", "solution": "\\boxed{x}", "level": "Level ?"},
    ]
    p = write(tmp_path, [json.dumps(r) for r in rows])
    t = load_task("math", path=p)
    probs = t.problems()
    assert [(x.id, x.answer, x.difficulty) for x in probs] == [
        ("test/prealgebra/1.json", "2", 1), ("row2", "\\frac{1}{2}", 4), ("row3", "x", None)]
    assert probs[1].meta["subject"] == "Algebra"
    assert t.template == "llama3_math"


def test_math_task_errors_name_the_row(tmp_path):
    p = write(tmp_path, ['{"problem": "p", "solution": "no box here"}'])
    with pytest.raises(DatasetError, match=r"data.jsonl:1: no 'answer' field and no \\boxed"):
        load_task("math", path=p).problems()
    p = write(tmp_path, ['{"problem": "p", "answer": "1", "level": "hard"}'])
    with pytest.raises(DatasetError, match="data.jsonl:1: level must be"):
        load_task("math", path=p).problems()


def test_llama3_math_template_answers_are_read_by_the_verifier():
    from testtime.prompts import get_template
    from testtime.tasks import Problem
    from testtime.verifiers import MathAnswerVerifier

    msgs = get_template("llama3_math").messages("What is 2+2?")
    assert msgs[0]["role"] == "system" and "## Step 1:" in msgs[0]["content"]
    assert msgs[-1] == {"role": "user", "content": "What is 2+2?"}
    reply = "## Step 1: Add\n2 + 2 = 4\n\nTherefore, the final answer is: $\\boxed{4}$. I hope it is correct."
    assert MathAnswerVerifier().verify(Problem("p", "q", "4"), reply).verdict == "pass"
