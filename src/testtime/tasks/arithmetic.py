"""Procedural arithmetic word problems with five difficulty levels.

Each problem is a short story: a starting amount and then one sentence per
operation. The level sets how many operations there are, which operators may
appear and how large the numbers get. Problem i of level L depends only on
(seed, L, i), so asking for more problems extends the same set.

    level  operations  operators     numbers up to
      1        1          + -             10
      2        2          + -             20
      3        3          + - x           50
      4        4          + - x /        100
      5        5          + - x /        500
"""

from __future__ import annotations

import hashlib
import operator
import random

from ..errors import InputError
from ..verifiers.math_answer import STATED, parse_rules
from .base import TASKS, Problem, Task

LEVELS = {1: (1, "+-", 10), 2: (2, "+-", 20), 3: (3, "+-*", 50), 4: (4, "+-*/", 100), 5: (5, "+-*/", 500)}

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal",
         "Kira", "Liam", "Maya", "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "shells",
         "stamps", "cards", "beads", "toy cars", "oranges", "balloons", "crayons"]
GAIN = ["buys {x} more {items}", "finds {x} more {items}", "is given {x} more {items}",
        "picks up {x} more {items}"]
LOSS = ["gives away {x} {items}", "sells {x} {items}", "loses {x} {items}", "gives {x} {items} to a friend"]
TIMES = ["then gets more {items} until there are {x} times as many as before",
         "then doubles up so that the pile of {items} is {x} times as big"]
SPLIT = ["then splits the {items} into {x} equal piles and keeps just one pile",
         "then shares the {items} equally among {x} people, keeping one share"]


def _rng(seed: int, level: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"arithmetic:{seed}:{level}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def make_problem(seed: int, level: int, index: int) -> Problem:
    """Problem `index` of difficulty `level`; a pure function of its arguments."""
    if level not in LEVELS:
        raise InputError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    n_ops, ops, top = LEVELS[level]
    rng = _rng(seed, level, index)
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, top)
    sentences, expr = [f"{name} has {value} {items}."], str(value)
    for _ in range(n_ops):
        op = rng.choice(ops)
        divisors = [d for d in range(2, 11) if value % d == 0 and value // d >= 1]
        if op == "/" and not divisors:
            op = "+"
        if op == "-" and value < 2:
            op = "+"
        if op == "+":
            x = rng.randint(1, top)
            value, phrase = value + x, rng.choice(GAIN)
        elif op == "-":
            x = rng.randint(1, value - 1)
            value, phrase = value - x, rng.choice(LOSS)
        elif op == "*":
            x = rng.randint(2, 5 if level < 5 else 9)
            value, phrase = value * x, rng.choice(TIMES)
        else:
            x = rng.choice(divisors)
            value, phrase = value // x, rng.choice(SPLIT)
        sentences.append(f"{name} {phrase.format(x=x, items=items)}.")
        expr = f"({expr} {'x' if op == '*' else op} {x})"
    question = " ".join(sentences) + f" How many {items} does {name} have now?"
    return Problem(id=f"L{level}-{index}", question=question, answer=str(value),
                   difficulty=level, meta={"expression": expr})


@TASKS.register("arithmetic")
def arithmetic_task(levels: tuple[int, ...] | list[int] = (1, 2, 3), seed: int = 0,
                    template: str = "arithmetic_fewshot", verifier: str = "math_answer",
                    answer_rules: str = ",".join(STATED)) -> Task:
    """Seeded arithmetic word problems; problems of the given levels are interleaved
    (one of each level in turn), so any limit gives a balanced mix. Answers count
    where the text states them ("The answer is N", as the template's examples do);
    the last-number fallback is opt-in (`answer_rules`): the answers are small
    integers, which a text that states none contains by chance."""
    if isinstance(levels, (int, str)):  # one level, as `--arg levels=1` gives it
        levels = [levels]
    try:
        if any(isinstance(x, bool) for x in levels):
            raise TypeError
        levels = tuple(sorted({int(x) if isinstance(x, str) else operator.index(x) for x in levels}))
    except (TypeError, ValueError):
        raise InputError(f"levels must be level numbers from {sorted(LEVELS)}, comma-separated as in "
                         f"levels=1,2; got {levels!r}") from None
    bad = [x for x in levels if x not in LEVELS]
    if bad or not levels:
        raise InputError(f"levels must be a non-empty subset of {sorted(LEVELS)}, got {list(levels)}")
    try:
        if isinstance(seed, bool):
            raise TypeError
        seed = operator.index(seed)
    except TypeError:
        raise InputError(f"seed must be an integer, got {seed!r}") from None

    def load(limit: int | None) -> list[Problem]:
        total = 100 * len(levels) if limit is None else limit
        return [make_problem(seed, levels[i % len(levels)], i // len(levels)) for i in range(total)]

    identity = {"name": "arithmetic", "levels": list(levels), "seed": seed}
    return Task("arithmetic", identity, load, template, verifier, parse_rules(answer_rules))
