"""Verifiers judge one candidate against one problem.

A verdict separates a wrong candidate from a broken harness: `infra_error`
means the check itself could not run, so it is never counted as the model
failing (see `Store.counts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from ..registry import Registry
from ..tasks.base import Problem

VERDICTS = ("pass", "fail", "timeout", "memory", "error", "infra_error")


@dataclass(frozen=True)
class Verdict:
    verdict: str
    reason: str = ""
    extracted: str | None = None
    """What the verifier read from the candidate (the final answer), for inspection."""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


class Verifier(Protocol):
    name: str

    def verify(self, problem: Problem, candidate: str) -> Verdict: ...


VERIFIERS: Registry[Callable[..., Verifier]] = Registry("verifier")


def load_verifier(name: str, **kwargs) -> Verifier:
    return VERIFIERS.build(name, **kwargs)
