"""MATH and MATH-500 (Hendrycks et al., 2021; Lightman et al., 2023).

Rows carry `problem`, `solution`, and usually `answer`, `level`, `subject`,
`unique_id`. The original MATH release has no `answer` field and writes the
level as "Level 3"; there the answer is the last `\\boxed{}` of the solution.
The level (1-5) is kept as the difficulty.
"""

from __future__ import annotations

from typing import Any

from ..verifiers.math_answer import FINAL_LINE, last_boxed, parse_rules
from .base import TASKS, Problem, Task, file_digest, hf_rows
from .jsonl import DatasetError, field_text, load_rows


def _level(raw: Any, where: str) -> int | None:
    if raw is None:
        return None
    text = str(raw).removeprefix("Level").strip()
    if text in {"?", ""}:  # a handful of MATH rows have "Level ?"
        return None
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{where}: level must be 1-5 or 'Level N', got {raw!r}") from None


def math_row(pid: str, obj: dict[str, Any], where: str) -> Problem:
    solution = field_text(obj, "solution", where, required=False)
    answer = field_text(obj, "answer", where, required=False)
    if answer is None:
        answer = last_boxed(solution or "")
        if answer is None:
            raise DatasetError(f"{where}: no 'answer' field and no \\boxed{{}} answer in 'solution'")
    subject = obj.get("subject", obj.get("type"))
    return Problem(id=str(obj.get("unique_id") or pid), question=field_text(obj, "problem", where),
                   answer=answer.strip(), difficulty=_level(obj.get("level"), where),
                   meta={"subject": subject, "solution": solution})


@TASKS.register("math")
def math_task(path: str | None = None, dataset: str = "HuggingFaceH4/MATH-500", split: str = "test",
              template: str = "llama3_math", verifier: str = "math_answer",
              answer_rules: str = ",".join(FINAL_LINE)) -> Task:
    """MATH-format problems from a JSONL file, or from a Hugging Face dataset
    (`HuggingFaceH4/MATH-500`, or `EleutherAI/hendrycks_math` with its subject
    configs) when no path is given and a network is there.

    Answers are read as the template asks for them, from `\\boxed{}` or the
    final-answer line (`answer_rules`; see `verifiers.math_answer`): a MATH answer
    is rarely the last number of a text that never states one."""
    if path is not None:
        path = str(path)
        identity = {"name": "math", "sha256": file_digest(path)}
        load = lambda limit: load_rows(path, limit, lambda ln, o, w: math_row(f"row{ln}", o, w))
    else:
        identity = {"name": "math", "hf": dataset, "split": split}
        load = lambda limit: _load_hf(dataset, split, limit)
    return Task("math", identity, load, template, verifier, parse_rules(answer_rules))


def _load_hf(dataset: str, split: str, limit: int | None) -> list[Problem]:
    return [math_row(f"{split}{i}", r, f"{dataset}[{split}][{i}]")
            for i, r in hf_rows(dataset, None, split, limit, "path=<MATH-format jsonl>")]
