"""Compute-optimal test-time scaling: per difficulty bin and budget, the strategy that wins.

Snell et al. (2024) show that which test-time strategy is best depends on how
hard the problem is and how much compute there is, so a policy that chooses
per difficulty bin beats any single strategy at equal compute. Here:

1. an `AccuracyTable` holds, for every candidate configuration (a strategy and
   its hyperparameters: `best_of_n`, `majority`, `beam_search(width=4)`,
   `dvts(width=2,lookahead=1)`, `revision(sequential=2)` ...), every budget N and
   every problem, the probability that the selected answer is correct
   (`testtime compare` cells, averaged over seeds);
2. `select_policy` picks, for each budget B and difficulty bin, the
   configuration and the N <= B with the highest mean accuracy over the bin's
   training problems (ties go to the smaller N, then to the earlier candidate,
   so equal accuracy never costs more compute). A bin without training problems
   gets the best choice over all training problems;
3. `evaluate_policy` scores the policy on held-out problems: each problem gets
   its bin's choice;
4. `budget_to_reach` reads off a curve the budget at which it reaches an
   accuracy, interpolating linearly in log2 N, which gives the compute ratio at
   equal accuracy.

A `Policy` is written to and read from JSON (`save` / `load`), and applied to
new problems by the `policy` strategy (which draws the difficulty probe, bins the
problems with the stored edges and runs each bin's choice).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import InputError
from .files import write_text
from .difficulty import DifficultyBins

POLICY_VERSION = 1
_CONFIG = re.compile(r"^([a-z_]+)(?:\((.*)\))?$")


def config_name(strategy: str, params: Mapping[str, Any] | None = None) -> str:
    """`beam_search` + {"width": 4} -> "beam_search(width=4)" (keys sorted)."""
    if not params:
        return strategy
    return f"{strategy}({','.join(f'{k}={params[k]}' for k in sorted(params))})"


def parse_config(name: str) -> tuple[str, dict[str, Any]]:
    """The inverse of `config_name`; integer and float values come back as numbers."""
    m = _CONFIG.match(name.strip())
    if not m:
        raise InputError(f"bad strategy configuration {name!r}; expected e.g. 'beam_search(width=4)'")
    params: dict[str, Any] = {}
    for part in filter(None, (m.group(2) or "").split(",")):
        if "=" not in part:
            raise InputError(f"bad parameter {part!r} in {name!r}; expected key=value")
        k, v = (x.strip() for x in part.split("=", 1))
        for conv in (int, float):
            try:
                params[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            params[k] = v
    return m.group(1), params


@dataclass
class AccuracyTable:
    acc: dict[str, dict[int, dict[str, float]]]
    """config -> budget N -> problem id -> P(selected answer correct)."""
    tokens: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    """config -> N -> problem id -> tokens generated (for tie-breaks and reports)."""

    @classmethod
    def from_cells(cls, cells: Iterable[Any]) -> "AccuracyTable":
        """From `compare.Cell`s (strategy may carry its parameters in its name); seeds averaged."""
        acc: dict[str, dict[int, dict[str, list[float]]]] = {}
        tok: dict[str, dict[int, dict[str, list[float]]]] = {}
        for c in cells:
            for pid, v in c.correct.items():
                acc.setdefault(c.strategy, {}).setdefault(int(c.n), {}).setdefault(pid, []).append(float(v))
                tok.setdefault(c.strategy, {}).setdefault(int(c.n), {}).setdefault(pid, []).append(
                    float(c.tokens.get(pid, 0.0)))
        mean = lambda d: {s: {n: {p: float(np.mean(v)) for p, v in by.items()} for n, by in ns.items()}
                          for s, ns in d.items()}
        return cls(mean(acc), mean(tok))

    @property
    def configs(self) -> list[str]:
        return list(self.acc)

    @property
    def budgets(self) -> list[int]:
        return sorted({n for ns in self.acc.values() for n in ns})

    def mean(self, config: str, n: int, problems: Sequence[str]) -> float | None:
        """Mean accuracy over the problems; None if the table lacks any of them."""
        by = self.acc.get(config, {}).get(int(n))
        if by is None or not problems or any(p not in by for p in problems):
            return None
        return float(np.mean([by[p] for p in problems]))


@dataclass
class Choice:
    config: str
    n: int
    train_accuracy: float
    train_problems: int

    @property
    def strategy(self) -> str:
        return parse_config(self.config)[0]

    @property
    def params(self) -> dict[str, Any]:
        return parse_config(self.config)[1]


@dataclass
class Policy:
    choices: dict[int, dict[int, Choice]]
    """budget -> difficulty bin -> choice."""
    fallback: dict[int, Choice]
    """budget -> the best choice over all training problems (for an unseen bin)."""
    difficulty: DifficultyBins | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def budgets(self) -> list[int]:
        return sorted(self.choices)

    def choose(self, budget: int, difficulty_bin: int) -> Choice:
        if budget not in self.choices:
            fits = [b for b in self.budgets if b <= budget]
            if not fits:
                raise InputError(f"the policy has no budget <= {budget}; its budgets are {self.budgets}")
            budget = max(fits)
        return self.choices[budget].get(difficulty_bin, self.fallback[budget])

    def describe(self) -> dict[str, dict[str, str]]:
        return {f"N<={b}": {f"bin {k}": f"{c.config} N={c.n} ({c.train_accuracy:.3f} on {c.train_problems})"
                            for k, c in sorted(bins.items())}
                for b, bins in sorted(self.choices.items())}

    def to_dict(self) -> dict[str, Any]:
        return {"version": POLICY_VERSION,
                "difficulty": self.difficulty.to_dict() if self.difficulty else None,
                "choices": {str(b): {str(k): asdict(c) for k, c in bins.items()} for b, bins in self.choices.items()},
                "fallback": {str(b): asdict(c) for b, c in self.fallback.items()},
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "policy") -> "Policy":
        if not isinstance(d, Mapping) or d.get("version") != POLICY_VERSION:
            raise InputError(f"{source}: not a testtime policy of version {POLICY_VERSION}")
        try:
            choices = {int(b): {int(k): Choice(**c) for k, c in bins.items()} for b, bins in d["choices"].items()}
            fallback = {int(b): Choice(**c) for b, c in d["fallback"].items()}
            for bins in choices.values():
                for c in bins.values():
                    parse_config(c.config)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{source}: malformed policy ({type(e).__name__}: {e})") from None
        if set(choices) != set(fallback) or not choices:
            raise InputError(f"{source}: every budget needs choices and a fallback")
        diff = DifficultyBins.from_dict(d["difficulty"]) if d.get("difficulty") else None
        return cls(choices, fallback, diff, dict(d.get("meta") or {}))

    def save(self, path: str | os.PathLike) -> Path:
        """Written to a temporary file and renamed, so a crash never leaves half a policy."""
        return write_text(path, json.dumps(self.to_dict(), indent=2, default=str))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise InputError(f"cannot read policy file {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise InputError(f"policy file {path} is not JSON: {e}") from None
        return cls.from_dict(data, source=str(path))


def _best(table: AccuracyTable, budget: int, problems: Sequence[str], configs: Sequence[str]) -> Choice | None:
    best: tuple[float, int, int] | None = None
    choice = None
    for rank, config in enumerate(configs):
        for n in sorted(table.acc[config]):
            if n > budget:
                continue
            acc = table.mean(config, n, problems)
            if acc is None:
                continue
            key = (-round(acc, 12), n, rank)  # higher accuracy, then smaller N, then earlier candidate
            if best is None or key < best:
                best, choice = key, Choice(config, n, acc, len(problems))
    return choice


def select_policy(table: AccuracyTable, train_bins: Mapping[str, int], budgets: Sequence[int],
                  configs: Sequence[str] | None = None) -> Policy:
    """For each budget and bin, the (configuration, N <= budget) with the best mean
    accuracy on the bin's training problems."""
    configs = list(configs or table.configs)
    unknown = [c for c in configs if c not in table.acc]
    if unknown:
        raise ValueError(f"candidates {unknown} are not in the accuracy table ({table.configs})")
    every = list(train_bins)
    by_bin: dict[int, list[str]] = {}
    for pid, b in train_bins.items():
        by_bin.setdefault(int(b), []).append(pid)
    choices: dict[int, dict[int, Choice]] = {}
    fallback: dict[int, Choice] = {}
    for budget in budgets:
        overall = _best(table, budget, every, configs)
        if overall is None:
            raise ValueError(f"no candidate has accuracies at a budget <= {budget} for every training problem")
        fallback[budget] = overall
        choices[budget] = {}
        for b, pids in sorted(by_bin.items()):
            choices[budget][b] = _best(table, budget, pids, configs) or overall
    return Policy(choices, fallback)


def evaluate_policy(policy: Policy, table: AccuracyTable, bins: Mapping[str, int],
                    budgets: Sequence[int]) -> dict[int, float]:
    """Mean accuracy on the given problems when each gets its bin's choice."""
    out = {}
    for budget in budgets:
        vals = []
        for pid, b in bins.items():
            c = policy.choose(budget, int(b))
            by = table.acc.get(c.config, {}).get(c.n, {})
            if pid not in by:
                raise ValueError(f"the accuracy table has no {c.config} at N={c.n} for problem {pid!r}")
            vals.append(by[pid])
        out[budget] = float(np.mean(vals)) if vals else math.nan
    return out


def budget_to_reach(curve: Mapping[int, float | None], target: float) -> float | None:
    """The smallest budget at which a curve (budget -> accuracy) reaches `target`,
    interpolating linearly in log2 N between measured budgets; None if it never does."""
    pts = sorted((int(n), float(a)) for n, a in curve.items() if a is not None)
    if not pts:
        return None
    # accuracies are means summed in different orders: equal ones may differ in the last bits
    eps = 1e-9
    if pts[0][1] >= target - eps:
        return float(pts[0][0])
    for (n0, a0), (n1, a1) in zip(pts, pts[1:]):
        if a1 >= target - eps > a0:
            if a1 <= target:
                return float(n1)
            frac = (target - a0) / (a1 - a0)
            return float(2 ** (math.log2(n0) + frac * (math.log2(n1) - math.log2(n0))))
    return None
