"""Selection without an oracle: pure functions from candidates (and scores) to one answer.

Answers are compared by a canonical key computed once per distinct answer
string, never by pairwise equivalence tests: plain numbers become exact
fractions ("1,000" and "1000.0" are the same answer), other LaTeX goes through
math-verify's parser once and is keyed by the SymPy form it yields, and what
does not parse is keyed by its normalised text. A candidate with no
extractable answer does not vote; extraction follows the problem's task, as the
verifier's does (`verifiers.math_answer`), so a vote and a verdict read one answer.

Step scores from a process reward model are reduced to one number per
candidate by `aggregate` (`last | min | prod | mean`).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Sequence

from .verifiers.bounded import bounded
from .verifiers.math_answer import RULES, arithmetic_value, as_number, extract_answer

AGGREGATIONS = ("last", "min", "prod", "mean")


def aggregate(step_scores: Sequence[float], how: str = "last") -> float:
    """One score for a solution from its per-step scores.

    last: the score of the final step (the PRM's judgement of the whole path);
    min: the weakest step; prod: the probability that every step is right;
    mean: the average step. An empty list (no step scored) is -inf, so it never wins.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
    if not step_scores:
        return -math.inf
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    if how == "prod":
        return float(math.prod(step_scores))
    return float(sum(step_scores) / len(step_scores))


_SPACES = re.compile(r"\s+|\\[,;!: ]|\\left|\\right")


class AnswerKeys:
    """Canonical answer keys with a cache: each distinct answer string is parsed once."""

    def __init__(self, use_math_verify: bool = True, max_chars: int = 512):
        self.use_math_verify = use_math_verify
        self.max_chars = max_chars
        self._cache: dict[str, str] = {}

    def key(self, answer: str | None) -> str | None:
        if answer is None:
            return None
        hit = self._cache.get(answer)
        if hit is None:
            hit = self._cache[answer] = self._canonical(answer)
        return hit

    def of_text(self, text: str, rules: tuple[str, ...] = RULES) -> str | None:
        """The key of the final answer extracted from a whole candidate by `rules`
        (a problem's own: `verifiers.math_answer.problem_rules`)."""
        return self.key(extract_answer(text, rules)[0])

    def _canonical(self, answer: str) -> str:
        num = as_number(answer)
        if num is None:
            num = arithmetic_value(answer)
        if num is not None:
            return f"num:{num.numerator}/{num.denominator}"
        text = _SPACES.sub("", answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
        if self.use_math_verify and len(answer) <= self.max_chars:
            try:
                key = bounded(math_verify_key, answer, 2, deadline=15)
                if key is not None:
                    return key
            except Exception:  # noqa: BLE001 - unparseable (or overrunning) answers fall back to text
                pass
        return f"text:{text}"


def math_verify_key(answer: str, timeout_s: int) -> str | None:
    """math-verify's reading of an answer as a key, in a main thread (see `bounded`)."""
    from math_verify import parse

    parsed = parse(f"${answer}$", parsing_timeout=timeout_s)
    if not parsed:
        return None
    value = parsed[0]
    if getattr(value, "is_Rational", False):  # \\sqrt{4}, 2^3: plain numbers after all
        return f"num:{value.p}/{value.q}"
    return f"expr:{value}"


def majority_vote(keys: Sequence[str | None]) -> str | None:
    """The most frequent answer key (ties: the one seen first). None when nobody answered."""
    counts: dict[str, int] = defaultdict(int)
    for k in keys:
        if k is not None:
            counts[k] += 1
    if not counts:
        return None
    return max(counts, key=counts.__getitem__)  # dicts keep first-seen order; max keeps the first of ties


def best_of_n_naive(keys: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """The answer of the single highest-scored candidate (ties: the first)."""
    best, best_score = None, -math.inf
    for k, s in zip(keys, scores, strict=True):
        if k is not None and s > best_score:
            best, best_score = k, s
    return best


def best_of_n_weighted(keys: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """The answer whose candidates' scores sum highest (ties: the one seen first)."""
    totals: dict[str, float] = defaultdict(float)
    for k, s in zip(keys, scores, strict=True):
        if k is not None:
            totals[k] += s
    if not totals:
        return None
    return max(totals, key=totals.__getitem__)


SELECTORS = {"vote": majority_vote, "naive": best_of_n_naive, "weighted": best_of_n_weighted}
