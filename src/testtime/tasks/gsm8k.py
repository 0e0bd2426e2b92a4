"""GSM8K: grade-school math word problems (Cobbe et al., 2021).

Rows are `{"question", "answer"}`; the reference solution ends with `#### <answer>`.
Difficulty is the number of calculation steps in the reference solution (lines
of reasoning before `####`), clamped to 1..5: a free, ground-truth-based proxy
that lets a per-level breakdown show where extra samples help.
"""

from __future__ import annotations

from typing import Any

from ..verifiers.math_answer import RULES, parse_rules
from .base import TASKS, Problem, Task, file_digest, hf_rows
from .jsonl import DatasetError, field_text, load_rows


def parse_gsm8k_answer(solution: str, where: str) -> tuple[str, int]:
    """The final answer after '####' (commas removed) and the number of reasoning steps."""
    if "####" not in solution:
        raise DatasetError(f"{where}: answer has no '#### <final answer>' line")
    body, final = solution.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if not final:
        raise DatasetError(f"{where}: empty final answer after '####'")
    steps = sum(1 for line in body.strip().splitlines() if line.strip())
    return final, max(1, min(5, steps))


def _row_to_problem(pid: str, obj: dict[str, Any], where: str) -> Problem:
    answer, level = parse_gsm8k_answer(field_text(obj, "answer", where), where)
    return Problem(id=pid, question=field_text(obj, "question", where), answer=answer,
                   difficulty=level, meta={"solution": obj["answer"]})


@TASKS.register("gsm8k")
def gsm8k_task(path: str | None = None, split: str = "test", template: str = "math_cot",
               verifier: str = "math_answer", answer_rules: str = ",".join(RULES)) -> Task:
    """GSM8K from a local JSONL file, or from the Hugging Face dataset `openai/gsm8k`
    (config `main`, the given split) when no path is given and a network is there.

    Answers are read by every rule, the last number of the text included: that is
    the convention GSM8K figures in the field are measured with (Large Language
    Monkeys, lm-eval's flexible extract), so ours compare with theirs. The report
    shows how many passes each rule found, and a chance baseline; pass
    `answer_rules=boxed,answer_is,hashes` to count stated answers only."""
    if path is not None:
        path = str(path)
        identity = {"name": "gsm8k", "sha256": file_digest(path)}
        load = lambda limit: load_rows(path, limit, lambda ln, o, w: _row_to_problem(f"row{ln}", o, w))
    else:
        identity = {"name": "gsm8k", "hf": "openai/gsm8k", "split": split}
        load = lambda limit: _load_hf(split, limit)
    return Task("gsm8k", identity, load, template, verifier, parse_rules(answer_rules))


def _load_hf(split: str, limit: int | None) -> list[Problem]:
    return [_row_to_problem(f"{split}{i}", r, f"openai/gsm8k[{split}][{i}]")
            for i, r in hf_rows("openai/gsm8k", "main", split, limit, "path=<gsm8k jsonl>")]
