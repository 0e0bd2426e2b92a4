"""`response_format`: an output in the `thought` format (thoughts, the marker line, a
response) has a response. The verifier of the `instructions` task (`testtime.tpo`)."""

from __future__ import annotations

from ..prompts import RESPONSE_MARKER as MARKER
from ..tasks.base import Problem
from .base import VERIFIERS, Verdict


def split_thought(text: str) -> tuple[str, str | None]:
    """(thought, response): the response is what follows the last marker line, None when
    there is no marker or nothing after it."""
    i = text.rfind(MARKER)
    if i < 0:
        return text.strip(), None
    response = text[i + len(MARKER):].strip()
    return text[:i].strip(), response or None


@VERIFIERS.register("response_format")
class ResponseFormat:
    """Passes an output that has a response after its thoughts (`split_thought`)."""

    name = "response_format"

    def verify(self, problem: Problem, candidate: str) -> Verdict:
        _, response = split_thought(candidate)
        if response is None:
            return Verdict("fail", f"no response after {MARKER!r}")
        return Verdict("pass", "", response[:80])
