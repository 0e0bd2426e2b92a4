"""testtime: turn spare inference compute into accuracy, and measure what it bought."""

from .engines import ENGINES, Completion, Engine, Request, load_engine
from .spec import RunSpec, SamplingParams
from .store import Store
from .tasks import TASKS, Problem, Task, load_task
from .verifiers import VERIFIERS, Verdict, load_verifier

__version__ = "0.1.0"

__all__ = ["ENGINES", "Completion", "Engine", "Request", "load_engine", "RunSpec", "SamplingParams",
           "Store", "TASKS", "Problem", "Task", "load_task", "VERIFIERS", "Verdict", "load_verifier"]
