"""Any JSONL file of problems, with a mapping from its field names to ours."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import InputError
from ..verifiers.math_answer import STATED, parse_rules
from .base import TASKS, Problem, Task, file_digest


class DatasetError(InputError):
    """A data file is malformed; the message names the file and line."""


def read_jsonl(path: str | Path, limit: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line, 1-based line numbers."""
    path = Path(path)
    taken = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
            taken += 1
            if limit is not None and taken >= limit:
                return


def field_text(obj: dict[str, Any], key: str, where: str, required: bool = True) -> str | None:
    """A field's value as text; numbers are accepted and converted."""
    if key not in obj or obj[key] is None:
        if required:
            raise DatasetError(f"{where}: missing field {key!r} (fields present: {', '.join(sorted(obj))})")
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DatasetError(f"{where}: field {key!r} must be text or a number, got {type(value).__name__}")
    return str(value)


def load_rows(path: str | Path, limit: int | None,
              to_problem: Callable[[int, dict[str, Any], str], Problem]) -> list[Problem]:
    problems, seen = [], set()
    for lineno, obj in read_jsonl(path, limit):
        where = f"{path}:{lineno}"
        p = to_problem(lineno, obj, where)
        if p.id in seen:
            raise DatasetError(f"{where}: duplicate problem id {p.id!r}")
        seen.add(p.id)
        problems.append(p)
    if not problems:
        raise DatasetError(f"{path}: no problems in the file")
    return problems


@TASKS.register("jsonl")
def jsonl_task(path: str, question_field: str = "question", answer_field: str = "answer",
               id_field: str | None = None, difficulty_field: str | None = None,
               template: str | None = None, verifier: str | None = None,
               tests_field: str | None = None, entry_point_field: str | None = None,
               reference_field: str | None = None, setup_field: str | None = None,
               allow_code_execution: bool = False, answer_rules: str = ",".join(STATED)) -> Task:
    """Problems from any JSONL file. Field names map the file's keys to ours; the id is
    the `id_field` value when given, else the line number.

    With `tests_field` the problems are code problems for the `code` verifier: the
    tests run after the candidate (and `setup_field` before it). Running generated
    code is off unless `allow_code_execution` is true; the choice is stored with
    each problem, so a later re-grade honours it.

    Math answers count where the text states them (`answer_rules`, default
    boxed, answer_is, hashes; see `verifiers.math_answer`); add `last_number` for
    data whose convention is the last number of the text."""
    path = str(path)
    if isinstance(allow_code_execution, str):  # from the command line's key=value
        allow_code_execution = allow_code_execution.strip().lower() in {"1", "true", "yes", "on"}
    is_code = tests_field is not None

    def to_problem(lineno: int, obj: dict[str, Any], where: str) -> Problem:
        pid = field_text(obj, id_field, where) if id_field else f"line{lineno}"
        level = None
        if difficulty_field:
            raw = field_text(obj, difficulty_field, where, required=False)
            if raw is not None:
                try:
                    level = int(str(raw).removeprefix("Level ").strip())
                except ValueError:
                    raise DatasetError(f"{where}: field {difficulty_field!r} must be an integer level, got {raw!r}") from None
        question = field_text(obj, question_field, where)
        if is_code:
            from .code import code_problem

            p = code_problem(pid, question, tests=field_text(obj, tests_field, where),
                             entry_point=field_text(obj, entry_point_field, where) if entry_point_field else None,
                             reference=field_text(obj, reference_field, where, required=False) if reference_field else None,
                             setup=(field_text(obj, setup_field, where, required=False) or "") if setup_field else "",
                             difficulty=level)
            p.meta["allow_code_execution"] = bool(allow_code_execution)
            return p
        return Problem(id=pid, question=question, answer=field_text(obj, answer_field, where), difficulty=level)

    fields = [question_field, answer_field, id_field, difficulty_field]
    if is_code:
        fields += [tests_field, entry_point_field, reference_field, setup_field]
    identity = {"name": "jsonl", "file": Path(path).name, "sha256": file_digest(path), "fields": fields}
    return Task("jsonl", identity, lambda limit: load_rows(path, limit, to_problem),
                template or ("code_write" if is_code else "math_cot"), verifier or ("code" if is_code else "math_answer"),
                None if is_code else parse_rules(answer_rules))
