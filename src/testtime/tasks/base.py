"""Tasks: a list of problems, the prompt template they use by default, and their verifier."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, MissingDependencyError
from ..registry import Registry


@dataclass(frozen=True)
class Problem:
    """One problem: what the model is asked, the reference answer, a difficulty level."""

    id: str
    question: str
    answer: str | None
    difficulty: int | None = None
    """An integer level (1 = easiest) where the task has one, else None."""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    """A loaded task. `identity` is what goes into the run id: the task's name and the
    arguments that decide which problems exist (a file's content hash, a generator's
    seed), never how many of them a run takes."""

    name: str
    identity: dict[str, Any]
    load: Callable[[int | None], list[Problem]]
    """Returns the first `limit` problems (all when None), in a stable order, so a
    larger limit extends a smaller one."""
    template: str
    """Name of the default prompt template."""
    verifier: str
    """Name of the default verifier."""
    answer_rules: tuple[str, ...] | None = None
    """How a final answer is read from a candidate (`verifiers.math_answer.RULES`),
    stored with each problem so that a later re-grade reads answers the same way;
    None for tasks whose verifier reads no final answer (code)."""

    def problems(self, limit: int | None = None) -> list[Problem]:
        if limit is not None and limit < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        problems = self.load(limit)
        if self.answer_rules is not None:
            for p in problems:
                p.meta.setdefault("answer_rules", list(self.answer_rules))
        return problems


TASKS: Registry[Callable[..., Task]] = Registry("task")


def load_task(name: str, **kwargs: Any) -> Task:
    """Build a registered task by name with its keyword arguments."""
    return TASKS.build(name, **kwargs)


def file_digest(path: str | os.PathLike) -> str:
    """Content hash of a data file, so an edited file makes a new run id."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file not found: {p}")
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def hf_rows(dataset: str, config: str | None, split: str, limit: int | None, instead: str):
    """The first `limit` rows of a Hugging Face dataset split, as (index, dict) pairs.
    Needs the `datasets` package and a network; `instead` says what local file to pass
    when there is neither."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise MissingDependencyError(f"loading {dataset} from the Hugging Face hub needs `pip install datasets` "
                                     f"(testtime[hf]) and a network; or pass {instead}") from None
    ds = load_dataset(dataset, config, split=split) if config else load_dataset(dataset, split=split)
    rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
    return [(i, dict(r)) for i, r in enumerate(rows)]
