"""Instructions without reference answers, for thought preference data (`testtime.tpo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from .base import TASKS, Problem, Task, file_digest
from .jsonl import field_text, load_rows

DATA = Path(__file__).resolve().parent.parent / "data" / "instructions.jsonl"


@TASKS.register("instructions")
def instructions_task(path: str | None = None, template: str = "thought", verifier: str = "response_format") -> Task:
    """Instructions without reference answers, for thought preference data: the set that
    ships with testtime (40 everyday instructions written here), or a JSONL file whose
    rows have `instruction` (and optionally `id`)."""
    src = Path(path) if path is not None else DATA

    def row(lineno: int, obj: dict[str, Any], where: str) -> Problem:
        text = field_text(obj, "instruction", where)
        if not text.strip():
            raise InputError(f"{where}: field 'instruction' is empty")
        return Problem(str(obj.get("id") or f"row{lineno}"), text, None)

    identity = {"name": "instructions", "sha256": file_digest(str(src))}
    return Task("instructions", identity, lambda limit: load_rows(src, limit, row), template, verifier, None)
