"""Final-answer verification for math: extract the answer, then test equivalence.

Extraction reads the candidate in this order and takes the first rule that matches
(within a rule, the last occurrence in the text wins, since models restate and
correct themselves):

1. `\\boxed{...}` or `\\fbox{...}`, braces balanced;
2. "The answer is X" / "the final answer is X" / "Answer: X";
3. `#### X` (GSM8K's format);
4. the last number in the text.

Equivalence: when both sides read as plain numbers (commas, `$`, `%` and a
trailing period ignored) they are compared exactly as fractions; otherwise
math-verify decides (LaTeX and symbolic equivalence). Each distinct extracted
string is judged once per problem and the verdict cached, because samples of
one problem repeat the same few answers many times over.

Answers are untrusted model output: an answer longer than `max_answer_chars` or
nested deeper than `max_depth` gets a `fail` without being parsed, and SymPy
runs under math-verify's own timeouts.
"""

from __future__ import annotations

import re
from fractions import Fraction

from ..tasks.base import Problem
from .base import VERIFIERS, Verdict

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)[:\s]*", re.IGNORECASE)
_HASHES_RE = re.compile(r"####\s*([^\n]+)")
_PLAIN_NUMBER_RE = re.compile(rf"^\s*\\?\$?\s*({_NUMBER}|-?\d+\s*/\s*\d+)\s*(?:\\?%)?\s*\.?\s*$")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, with nested braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def _trim(answer: str) -> str:
    """Cut an answer phrase down to the answer: up to the sentence's end, no wrapping $."""
    answer = answer.strip()
    # "The answer is 42. Next we ..." -> "42"; keep decimals like 4.5
    m = re.match(r"(.*?)(?:\.\s|\.$|$)", answer)
    answer = (m.group(1) if m else answer).strip().strip("$").strip()
    if answer.startswith("\\(") and answer.endswith("\\)"):
        answer = answer[2:-2].strip()
    return answer


def extract_answer(text: str) -> tuple[str | None, str]:
    """The final answer in a candidate and the rule that found it (see module doc)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip(), "boxed"
    phrases = list(_ANSWER_IS_RE.finditer(text))
    if phrases:
        ans = _trim(text[phrases[-1].end():].split("\n", 1)[0])
        if ans:
            boxed = last_boxed(ans)
            return (boxed.strip() if boxed is not None else ans), "answer_is"
    hits = _HASHES_RE.findall(text)
    if hits:
        return _trim(hits[-1]), "hashes"
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return numbers[-1], "last_number"
    return None, "none"


def as_number(answer: str) -> Fraction | None:
    """A plain numeric answer as an exact fraction; None when it is not one."""
    m = _PLAIN_NUMBER_RE.match(answer)
    if not m:
        return None
    s = m.group(1).replace(",", "").replace(" ", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(int(num), int(den)) if int(den) != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _depth(s: str) -> int:
    depth = best = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            best = max(best, depth)
        elif ch in "})]":
            depth -= 1
    return best


class MathAnswerVerifier:
    """Compares a candidate's final answer with the problem's reference answer."""

    name = "math_answer"

    def __init__(self, max_answer_chars: int = 512, max_depth: int = 32, timeout_s: int = 5):
        self.max_answer_chars = max_answer_chars
        self.max_depth = max_depth
        self.timeout_s = timeout_s
        self._cache: dict[tuple[str, str], Verdict] = {}
        self._gold: dict[str, object] = {}

    def verify(self, problem: Problem, candidate: str) -> Verdict:
        if problem.answer is None:
            return Verdict("infra_error", f"problem {problem.id} has no reference answer")
        answer, rule = extract_answer(candidate)
        if answer is None:
            return Verdict("fail", "no answer found")
        key = (problem.id, answer)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._judge(problem, answer, rule)
            self._cache[key] = hit
        return hit

    def _judge(self, problem: Problem, answer: str, rule: str) -> Verdict:
        if len(answer) > self.max_answer_chars:
            return Verdict("fail", f"answer longer than {self.max_answer_chars} characters", answer[:80])
        if _depth(answer) > self.max_depth:
            return Verdict("fail", f"answer nested deeper than {self.max_depth}", answer[:80])
        gold_num, cand_num = as_number(problem.answer), as_number(answer)
        if gold_num is not None and cand_num is not None:
            ok = gold_num == cand_num
            return Verdict("pass" if ok else "fail", f"numeric ({rule})", answer)
        return self._math_verify(problem, answer, rule)

    def _math_verify(self, problem: Problem, answer: str, rule: str) -> Verdict:
        try:
            from math_verify import parse, verify
        except ImportError as e:  # the harness is broken, not the model
            return Verdict("infra_error", f"math-verify unavailable: {e}", answer)
        try:
            if problem.id not in self._gold:
                self._gold[problem.id] = parse(_as_latex(problem.answer), parsing_timeout=self.timeout_s)
            gold = self._gold[problem.id]
            pred = parse(_as_latex(answer), parsing_timeout=self.timeout_s)
            if not gold:
                return Verdict("infra_error", f"reference answer {problem.answer!r} does not parse", answer)
            if not pred:
                return Verdict("fail", f"answer does not parse ({rule})", answer)
            ok = verify(gold, pred, timeout_seconds=self.timeout_s)
        except TimeoutError:
            return Verdict("timeout", "math-verify timed out", answer)
        except Exception as e:  # noqa: BLE001 - SymPy raises anything on hostile input
            return Verdict("fail", f"answer could not be compared: {type(e).__name__}", answer)
        return Verdict("pass" if ok else "fail", f"math-verify ({rule})", answer)


def _as_latex(s: str) -> str:
    """math-verify looks for math inside delimiters; wrap a bare answer in them."""
    s = s.strip()
    return s if s.startswith("$") or s.startswith("\\(") or s.startswith("\\[") else f"${s}$"


VERIFIERS.register("math_answer")(MathAnswerVerifier)
