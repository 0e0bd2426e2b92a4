"""Final-answer verification for math: extract the answer, then test equivalence.

Extraction reads the candidate in this order and takes the first rule that matches
(within a rule, the last occurrence in the text wins, since models restate and
correct themselves):

1. `boxed`: `\\boxed{...}` or `\\fbox{...}`, braces balanced;
2. `answer_is`: "The answer is X" / "the final answer is X" / "Answer: X";
3. `hashes`: `#### X` (GSM8K's format);
4. `last_number`: the last number in the text.

Which rules apply is the task's choice, stored with each problem
(`meta["answer_rules"]`): a MATH task accepts only what its template asks for,
the boxed answer or the final-answer line, because the last number of a text
that never states an answer is a lucky guess, not an answer (at large k,
coverage would count small integers that happen to appear). The last-number
fallback is opt-in; GSM8K keeps it because the field's GSM8K numbers are
measured with it. Problems stored before tasks chose (no `answer_rules`) are
graded with all four rules, as they were, so a run never mixes two gradings.

Equivalence: when both sides read as plain numbers (commas, `$`, `%` and a
trailing period ignored) they are compared exactly as fractions; otherwise
math-verify decides (LaTeX and symbolic equivalence). Each distinct extracted
string is judged once per problem and the verdict cached, because samples of
one problem repeat the same few answers many times over.

Answers are untrusted model output: an answer longer than `max_answer_chars` or
nested deeper than `max_depth` gets a `fail` without being parsed, and SymPy
runs under math-verify's own timeouts, which need the main thread; from any other
thread the call goes to a worker process with a hard deadline (`bounded`).
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

from ..errors import InputError
from ..tasks.base import Problem
from .bounded import bounded
from .base import VERIFIERS, Verdict

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\d.]*[a-zA-Z_])|-?\.\d+"
"""A number, with an exponent if it has one ("1e100000" is one number, never 100000),
and not the start of a word ("3x", "2nd", "10km" are not numbers here)."""
_NUMBER_RE = re.compile(_NUMBER)


def numbers_in(text: str) -> list[str]:
    """Every number in a text, as the last-number rule reads them."""
    return _NUMBER_RE.findall(text)

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


def _last_match(pattern: re.Pattern, text: str, window: int = 1024) -> re.Match | None:
    """The last match in the text. The tail is searched first: a match lying wholly
    in it (not touching its start) is the last one in the whole text too."""
    if len(text) > window:
        start = len(text) - window
        tail = None
        for tail in pattern.finditer(text, start):
            pass
        if tail is not None and tail.start() > start:
            return tail
    last = None
    for last in pattern.finditer(text):
        pass
    return last


RULES = ("boxed", "answer_is", "hashes", "last_number")
"""Every extraction rule, in the order they are tried."""
STATED = ("boxed", "answer_is", "hashes")
"""The rules that read an answer the text states: the default for tasks."""
FINAL_LINE = ("boxed", "answer_is")
"""What a MATH-style template asks for: the boxed answer or the final-answer line."""


def parse_rules(rules: str | list[str] | tuple[str, ...], where: str = "answer_rules") -> tuple[str, ...]:
    """Extraction rules from a task argument ("boxed,answer_is" or a list), in the
    order they are tried; an unknown name is an error that names it."""
    names = [r.strip() for r in (rules.split(",") if isinstance(rules, str) else rules) if str(r).strip()]
    bad = [r for r in names if r not in RULES]
    if bad:
        raise InputError(f"{where}: unknown extraction rule {bad[0]!r}; choose from {', '.join(RULES)}")
    if not names:
        raise InputError(f"{where}: no extraction rule given; choose from {', '.join(RULES)}")
    return tuple(r for r in RULES if r in names)


def problem_rules(meta: dict | None) -> tuple[str, ...]:
    """The extraction rules a stored problem is graded with (see module doc)."""
    rules = (meta or {}).get("answer_rules")
    return RULES if rules is None else tuple(r for r in RULES if r in rules)


def extract_answer(text: str, rules: tuple[str, ...] = RULES) -> tuple[str | None, str]:
    """The final answer in a candidate and the rule that found it (see module doc),
    trying only `rules`; (None, "none") when none of them finds one."""
    if "boxed" in rules:
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed.strip(), "boxed"
    if "answer_is" in rules:
        phrase = _last_match(_ANSWER_IS_RE, text)
        if phrase:
            ans = _trim(text[phrase.end():].split("\n", 1)[0])
            if ans:
                boxed = last_boxed(ans)
                return (boxed.strip() if boxed is not None else ans), "answer_is"
    if "hashes" in rules:
        hit = _last_match(_HASHES_RE, text)
        if hit:
            return _trim(hit.group(1)), "hashes"
    if "last_number" in rules:
        number = _last_match(_NUMBER_RE, text)
        if number:
            return number.group(0), "last_number"
    return None, "none"


_MAX_EXPONENT = 400
"""Larger exponents are never a reference's value; building the exact number would
take the machine (10^(10^10))."""


def _out_of_range(number: str) -> bool:
    exp = re.search(r"[eE]([+-]?\d+)\s*$", number.strip().rstrip(".%"))
    return bool(exp) and abs(int(exp.group(1))) > _MAX_EXPONENT


def as_number(answer: str) -> Fraction | None:
    """A plain numeric answer as an exact fraction; None when it is not one."""
    m = _PLAIN_NUMBER_RE.match(answer)
    if not m:
        return None
    s = m.group(1).replace(",", "").replace(" ", "")
    if _out_of_range(s):
        return None
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(int(num), int(den)) if int(den) != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


_LEADING_NUMBER_RE = re.compile(rf"^\s*\\?\$?\s*({_NUMBER})(?=$|[\s,;:!?.)%\\])\s*(?:\\?%)?")
_VARIABLE_RE = re.compile(r"(?<![a-zA-Z\\])[a-zA-Z](?![a-zA-Z])")
_PROSE_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")
_OPERATOR_RE = re.compile(r"[\d+*/^=<>×÷]|\\(?:times|cdot|div|frac|sqrt)|\s[x-]\s")


def leading_number(answer: str) -> Fraction | None:
    """A number followed only by words: "22, which is the final answer" -> 22, and
    after an equation's "=" ("N = 4.5" -> 4.5). None when anything after the
    number could be mathematics (digits, operators), so that goes to math-verify,
    and None for several equations ("x = 1 or x = 2" states two answers)."""
    if answer.count("=") > 1:
        return None
    if "=" in answer:
        left, right = answer.rsplit("=", 1)
        answer = right if any(ch.isdigit() for ch in right) else left  # "24208 = N"
    m = _LEADING_NUMBER_RE.match(answer)
    if not m or _OPERATOR_RE.search(answer[m.end():]) or _VARIABLE_RE.search(answer[m.end():]):
        return None
    return as_number(m.group(1))


_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_ARITH_CHARS = re.compile(r"^[\d\s.+\-*/()]+$")
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def arithmetic_value(answer: str) -> Fraction | None:
    """The exact value of a plain arithmetic expression ("2 + 3", "3/4", "\\frac{3}{4}",
    "2 \\times 6"): digits, + - * / and parentheses only, evaluated with fractions;
    None for anything else (powers, roots, variables go to math-verify)."""
    expr = _THOUSANDS_RE.sub("", answer.replace("\\left", "").replace("\\right", "").replace("$", ""))
    expr = _FRAC_RE.sub(r"((\1)/(\2))", expr)
    for sym in ("\\times", "\\cdot", "×"):
        expr = expr.replace(sym, "*")
    expr = expr.replace("÷", "/").replace("\\div", "/")
    if len(expr) > 200 or not _ARITH_CHARS.match(expr) or "**" in expr or "//" in expr:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            return a / b
        raise ValueError("not plain arithmetic")

    try:
        return value(tree.body)
    except (ValueError, ZeroDivisionError, RecursionError):
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
        self._cache: dict[tuple[str, str, str], Verdict] = {}

    def verify(self, problem: Problem, candidate: str) -> Verdict:
        if problem.answer is None:
            return Verdict("infra_error", f"problem {problem.id} has no reference answer")
        rules = problem_rules(problem.meta)
        answer, rule = extract_answer(candidate, rules)
        if answer is None:
            return Verdict("fail", "no answer found" if rules == RULES
                           else f"no answer found by the task's rules ({', '.join(rules)})")
        key = (problem.id, answer, rule)
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
        if _HEDGE_RE.search(answer) and len(_NUMBER_RE.findall(answer)) > 1:
            # "x = 1 or x = 2", "3 or 4": several answers offered, so none is given
            return Verdict("fail", f"hedged: several answers offered ({rule})", answer)
        gold_num, cand_num = as_number(problem.answer), as_number(answer)
        if gold_num is not None and _PLAIN_NUMBER_RE.match(answer) and _out_of_range(answer):
            return Verdict("fail", f"numeric, exponent beyond 1e{_MAX_EXPONENT} ({rule})", answer)
        if gold_num is not None and cand_num is None:
            cand_num = leading_number(answer)
        if gold_num is not None and cand_num is None:
            cand_num = arithmetic_value(answer)
        if gold_num is not None and cand_num is None and _PROSE_RE.search(answer):
            # words around numbers ("actually 7.5", "N, which in this case is 110"): the
            # phrase is prose, not an expression; its last number is the claim
            numbers = _NUMBER_RE.findall(answer)
            cand_num = as_number(numbers[-1]) if numbers else None
        if gold_num is not None and cand_num is not None:
            # "25%" answers 25 and 0.25 alike, as math-verify's percent rules have it
            ok = gold_num == cand_num or (_PERCENT_END_RE.search(answer) is not None and gold_num == cand_num / 100)
            return Verdict("pass" if ok else "fail", f"numeric ({rule})", answer)
        if gold_num is not None and not any(ch.isdigit() for ch in answer):
            # "N", "x", "the total": no digit, so not the number asked for; SymPy
            # would take ~0.1 s per such answer to say the same
            return Verdict("fail", f"numeric reference, answer without digits ({rule})", answer)
        if gold_num is not None and "\\" not in answer and _VARIABLE_RE.search(answer):
            # "2x + 20 = 3x + 30": an expression in a variable is not the number asked for
            return Verdict("fail", f"numeric reference, answer in a variable ({rule})", answer)
        return self._math_verify(problem, answer, rule, gold_num)

    def _math_verify(self, problem: Problem, answer: str, rule: str, gold_num: Fraction | None = None) -> Verdict:
        gold = None if gold_num is None else (gold_num.numerator, gold_num.denominator)
        try:
            verdict, reason = bounded(math_verify_judge, problem.answer, answer, gold, self.timeout_s,
                                      deadline=4 * self.timeout_s + 10)
        except ImportError as e:  # the harness is broken, not the model
            return Verdict("infra_error", f"math-verify unavailable: {e}", answer)
        except TimeoutError:
            return Verdict("timeout", "math-verify timed out", answer)
        return Verdict(verdict, reason.format(rule=rule), answer)


_GOLD: dict[str, object] = {}
"""Parsed references, per process (the worker process keeps its own)."""


def math_verify_judge(reference: str, answer: str, gold: tuple[int, int] | None, timeout_s: int) -> tuple[str, str]:
    """(verdict, reason) from math-verify, with its own signal-based timeouts; so it must
    run in a main thread (`bounded` sees to that). `reason` has a {rule} slot."""
    from math_verify import parse, verify

    try:
        if reference not in _GOLD:
            _GOLD[reference] = parse(_as_latex(reference), parsing_timeout=timeout_s)
        parsed_gold = _GOLD[reference]
        pred = parse(_as_latex(answer), parsing_timeout=timeout_s)
        if not parsed_gold:
            return "infra_error", f"reference answer {reference!r} does not parse"
        if not pred:
            return "fail", "answer does not parse ({rule})"
        if gold is not None and _far_from(Fraction(*gold), parsed_gold, pred, timeout_s):
            return "fail", "numeric reference, a constant of another value ({rule})"
        ok = verify(parsed_gold, pred, timeout_seconds=timeout_s)
    except TimeoutError:
        raise
    except Exception as e:  # noqa: BLE001 - SymPy raises anything on hostile input
        return "fail", f"answer could not be compared: {type(e).__name__}"
    return ("pass" if ok else "fail"), "math-verify ({rule})"


def _far_from(gold_num: Fraction, gold: list, pred: list, timeout_s: int) -> bool:
    """Whether every parsed form of the answer is a real constant (`4π`, `20:20`,
    no variables) whose value is far from the numeric reference, taken as it is or
    as a percentage either way. math-verify could then only say no, after a SymPy
    simplification that costs ~10 ms per answer. Anything else (a variable, a
    set, a complex value, a value near the reference) is left to math-verify."""
    import sympy
    from math_verify.errors import TimeoutException
    from math_verify.utils import timeout

    if any(isinstance(p, str) and p in gold for p in pred):
        return False
    exprs = [p for p in pred if not isinstance(p, str)]
    if not exprs or not all(isinstance(e, sympy.Expr) and not e.free_symbols for e in exprs):
        return False
    g = float(gold_num)
    targets = (g, g * 100, g / 100)

    @timeout(timeout_seconds=timeout_s)
    def values() -> list[complex]:
        return [complex(e.evalf(15)) for e in exprs]

    try:
        vals = values()
    except TimeoutException:  # 9^{9^{9^9}}: math-verify would time out on it too
        raise TimeoutError("evaluating the answer timed out") from None
    except Exception:  # noqa: BLE001 - SymPy on hostile input: let math-verify judge
        return False
    return all(v.imag == 0 and math.isfinite(v.real)
               and all(abs(v.real - t) > max(1e-4 * abs(t), 1e-5) for t in targets) for v in vals)


_PERCENT_END_RE = re.compile(r"\\?%\s*$")
_HEDGE_RE = re.compile(r"(?<![a-zA-Z])(?:or|either)(?![a-zA-Z])|\\lor|\\vee", re.IGNORECASE)


def _as_latex(s: str) -> str:
    """math-verify looks for math inside delimiters; wrap a bare answer in them."""
    s = s.strip()
    return s if s.startswith("$") or s.startswith("\\(") or s.startswith("\\[") else f"${s}$"


VERIFIERS.register("math_answer")(MathAnswerVerifier)
