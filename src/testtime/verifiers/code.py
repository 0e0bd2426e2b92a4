"""Functional correctness: run the candidate against the problem's tests in the sandbox.

From candidate to program under test:

1. The code is taken from the candidate text. Text that opens with a code fence
   gives the fence's content; text with a fence further on gives the code before
   it when that parses as Python (the template opened the block, the model
   closed it), else the first fenced block; text without a fence is all code.
2. If the problem has an entry point and the code defines it at the top level,
   the candidate is a *whole function*: the program is the problem's
   `prompt_code` (HumanEval's imports, helpers and docstring-only signature; a
   def with only a docstring is valid Python) followed by the candidate, whose
   definition replaces the prompt's.
   Otherwise the candidate is a *body*: the program is `prompt_code` immediately
   followed by the candidate text, as HumanEval's own harness assembles it.
3. The problem's `setup` comes first and its `tests` last (HumanEval: the
   `check` function and `check(entry_point)`; MBPP: the asserts).

Verdicts: `pass` when the program ran to its last line (the sandbox's sentinel);
`fail` for an assertion error, or a program that exited before its last line
(`sys.exit(0)` before the tests is a fail); `error` for any other exception or a
crash by signal; `timeout`; `memory` for MemoryError; `infra_error` when the
sandbox itself failed.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Iterable

from ..errors import InputError
from ..sandbox import ExecResult, Limits, Sandbox, SandboxError
from ..tasks.base import Problem
from .base import VERIFIERS, Verdict

_FENCE_RE = re.compile(r"^[ \t]*```[\w+-]*[ \t]*$", re.MULTILINE)


class CodeExecutionNotAllowed(PermissionError):
    """A problem asked to run generated code without opting in."""


def extract_code(text: str) -> str:
    """The code in a candidate (rule 1 of the module doc)."""
    fences = list(_FENCE_RE.finditer(text))
    if not fences:
        return text
    first = fences[0]
    if not text[:first.start()].strip():  # opens with a fence: its content
        end = fences[1].start() if len(fences) > 1 else len(text)
        return text[first.end():end].strip("\n") + "\n"
    before = text[:first.start()]
    try:
        ast.parse(before)
        return before
    except SyntaxError:
        pass
    end = fences[1].start() if len(fences) > 1 else len(text)
    return text[first.end():end].strip("\n") + "\n"


def defines(code: str, name: str) -> bool:
    """Whether the code defines function `name` at its top level."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in tree.body)


def assemble(problem: Problem, candidate: str) -> tuple[str, int]:
    """The program under test, and the first line number of the tests in it."""
    meta = problem.meta
    code = extract_code(candidate)
    prompt_code = meta.get("prompt_code") or ""
    entry = meta.get("entry_point")
    if prompt_code and entry and defines(code, entry):
        main = prompt_code.rstrip("\n") + "\n\n\n" + code
    else:
        main = prompt_code + code
    head = ""
    if meta.get("setup"):
        head = meta["setup"].rstrip("\n") + "\n\n"
    body = head + main.rstrip("\n") + "\n\n\n"
    return body + meta["tests"], body.count("\n") + 1


def verdict_of(res: ExecResult, tests_from: int) -> Verdict:
    where = "" if res.line is None else (" in the tests" if res.line >= tests_from else " in the candidate")
    if res.status == "ok":
        return Verdict("pass")
    if res.status == "timeout":
        return Verdict("timeout", res.message)
    if res.status == "infra_error":
        return Verdict("infra_error", res.message)
    if res.status == "exception":
        if res.exception == "MemoryError":
            return Verdict("memory", "MemoryError (address-space limit)")
        if res.exception == "AssertionError":
            return Verdict("fail", f"AssertionError{where} (line {res.line})" + (f": {res.message}" if res.message else ""))
        if res.exception == "SystemExit":
            return Verdict("fail", f"exited (SystemExit {res.message}) before the tests finished")
        return Verdict("error", f"{res.exception}{where}: {res.message}"[:500])
    if res.status == "exited":
        return Verdict("fail", res.message)
    return Verdict("error", res.message or res.status)


@VERIFIERS.register("code")
class CodeVerifier:
    """Runs each candidate with the problem's tests in the sandbox (`testtime.sandbox`).

    Problems must opt in to running generated code (`meta["allow_code_execution"]`,
    set by the bundled code tasks), or the verifier must be created with
    `allow_code_execution=True`. The sandbox starts on first use; before a grading
    pass, `prepare` runs the golden canaries.
    """

    name = "code"

    def __init__(self, timeout_s: float = 5.0, workers: int | None = None, network: str = "auto",
                 allow_code_execution: bool = False, limits: Limits | None = None, canaries: int = 3):
        self.limits = limits or Limits(timeout_s=timeout_s)
        self.workers = workers
        self.network = network
        self.allow_code_execution = allow_code_execution
        self.canaries = canaries
        self._sandbox: Sandbox | None = None

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            kwargs: dict[str, Any] = {"limits": self.limits, "network": self.network}
            if self.workers is not None:
                kwargs["workers"] = self.workers
            self._sandbox = Sandbox(**kwargs)
        return self._sandbox

    def _check_allowed(self, problem: Problem) -> None:
        if not (self.allow_code_execution or problem.meta.get("allow_code_execution")):
            raise CodeExecutionNotAllowed(
                f"problem {problem.id!r} would run generated code, which is off unless asked for: grade with "
                "--allow-code-execution (`testtime grade RUN --allow-code-execution`, or on `testtime sample`), "
                "or build the verifier with allow_code_execution=True. The task argument allow_code_execution=true "
                "counts only for problems stored with it, so it cannot opt in a run whose problems are stored")
        if "tests" not in problem.meta:
            raise InputError(f"problem {problem.id!r} has no tests (meta['tests']); the code verifier needs them")

    def verify(self, problem: Problem, candidate: str) -> Verdict:
        return self.verify_many([(problem, candidate)])[0]

    def verify_many(self, items: Iterable[tuple[Problem, str]]) -> list[Verdict]:
        """Verify candidates in parallel over the sandbox's workers."""
        items = list(items)
        for problem, _ in items:
            self._check_allowed(problem)
        programs = [assemble(p, c) for p, c in items]
        results = self.sandbox.run_many([code for code, _ in programs])
        return [verdict_of(r, tests_from) for r, (_, tests_from) in zip(results, programs)]

    def prepare(self, problems: list[Problem]) -> dict[str, Any]:
        """Golden canaries, before any candidate is judged: a program that runs to its
        end must pass, a failing assert and an early `os._exit(0)` must not; for up
        to `canaries` problems with a reference solution, the reference must pass,
        and a stand-in returning a fresh object and the reference followed by
        `sys.exit(0)` before the tests must not. Raises SandboxError otherwise, so
        a broken harness stops the run instead of reporting 0%."""
        for p in problems:
            self._check_allowed(p)
        sb = self.sandbox
        checks: list[tuple[str, str, bool, Problem | None, int]] = [
            ("runs to the end", "x = 1\n", True, None, 10 ** 9),
            ("failing assert", "assert 1 == 2\n", False, None, 10 ** 9),
            ("early os._exit(0)", "import os\nos._exit(0)\nassert False\n", False, None, 10 ** 9),
        ]
        with_ref = [p for p in problems if p.meta.get("reference")][:self.canaries]
        for p in with_ref:
            code, tests_from = assemble(p, p.meta["reference"])
            checks.append((f"reference solution of {p.id}", code, True, p, tests_from))
            entry = p.meta.get("entry_point")
            if entry:
                wrong = f"def {entry}(*args, **kwargs):\n    return object()\n"
                code, tests_from = assemble(p, wrong)
                checks.append((f"known-wrong candidate for {p.id}", code, False, p, tests_from))
            code, tests_from = assemble(p, p.meta["reference"].rstrip("\n") + "\n\nimport sys\nsys.exit(0)\n")
            checks.append((f"reference + sys.exit(0) before the tests of {p.id}", code, False, p, tests_from))
        results = sb.run_many([c[1] for c in checks])
        problems_found = []
        for (what, _, should_pass, _, tests_from), res in zip(checks, results):
            v = verdict_of(res, tests_from)
            if v.passed != should_pass:
                detail = v.reason or v.verdict
                if res.output:
                    detail += f"; output: {res.output[:300]!r}"
                problems_found.append(f"{what}: expected {'pass' if should_pass else 'not pass'}, "
                                      f"got {v.verdict} ({detail})")
        if problems_found:
            raise SandboxError("golden canaries failed, so the harness cannot be trusted and nothing was graded:\n  "
                               + "\n  ".join(problems_found))
        return {"sandbox": sb.describe(), "canaries": [c[0] for c in checks],
                "canaries_with_reference": len(with_ref)}

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
