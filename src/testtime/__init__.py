"""testtime: turn spare inference compute into accuracy, and measure what it bought."""

from .engines import ENGINES, Completion, Engine, Request, load_engine
from .spec import RunSpec, SamplingParams
from .store import Store
from .tasks import TASKS, Problem, Task, load_task
from .verifiers import VERIFIERS, Verdict, load_verifier

__version__ = "0.1.0"

__all__ = ["ENGINES", "Completion", "Engine", "Request", "load_engine", "RunSpec", "SamplingParams",
           "Store", "TASKS", "Problem", "Task", "load_task", "VERIFIERS", "Verdict", "load_verifier",
           "Run", "apply_policy", "compare", "cost", "export", "optimal", "regrade", "report", "runs", "sample",
           "summary"]

_API = {"Run", "apply_policy", "compare", "cost", "export", "optimal", "regrade", "report", "runs", "sample", "summary"}


def __getattr__(name: str):
    """`testtime.sample(...)` and the rest of `testtime.api`, imported on first use (the
    API pulls in matplotlib and scipy, which a plain `import testtime` should not pay for)."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'testtime' has no attribute {name!r}")
