"""Tasks: problems, their prompt template and their verifier, registered by name."""

from . import arithmetic, code, gsm8k, instructions, jsonl, math  # noqa: F401  (registers the tasks)
from .base import TASKS, Problem, Task, load_task
from .jsonl import DatasetError

__all__ = ["TASKS", "Problem", "Task", "load_task", "DatasetError"]
