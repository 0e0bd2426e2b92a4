"""Adaptive stopping per problem: sample a problem only until its vote is decided.

Two stopping rules from the literature, each a pure function of the votes so far:

- `beta` (Adaptive-Consistency, Aggarwal et al. 2023): with v1 and v2 votes for the
  two leading answers, the posterior probability that the leader's share exceeds
  the runner-up's, P(p > 1/2) for p ~ Beta(v1 + 1, v2 + 1); stop once it reaches
  `threshold` (0.95 in the paper).
- `window` (early-stopping self-consistency, Li et al. 2024): samples come in
  windows of `window`; stop after a window whose answers all agree.

Both never stop before `min_samples`, and stop at the budget `n` regardless.
Samples without an answer count as drawn but vote for nothing.

Either rule can also stop a problem for futility (`futility` > 0; off by default),
the other boundary of a sequential test: once the leading answer's share of all
samples drawn is, with posterior probability 1 - `futility_prob`, below `futility`
(P(p >= futility) < futility_prob for p ~ Beta(v1 + 1, m - v1 + 1), m samples with
or without an answer). Such a vote stays flat: a weak model's answers spread over
many values, the leader it settles on is often wrong, and the samples that would
decide it are the ones a budget cannot afford. The problem keeps its current
leader. What the boundary costs in accuracy is measured, not assumed
(docs/signals.md); with `futility` 0 the rules are the papers' own.

`replay` asks "what would adaptive stopping have cost" of a stored sampling run:
the store's samples of a problem are in the order of their seeds, which are
random, so reading them in index order is an honest simulation of drawing them
live. It returns, per problem, the samples and tokens spent, the answer chosen
(the majority of the samples read) and whether it is right, beside the same for
majority over all n.

`cross_validate` asks whether a setting chosen on some runs carries to another:
each run held out in turn, the setting chosen on the others by a stated criterion
(`choose`) is replayed on it (`testtime adaptive-cv`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

RULES = ("beta", "window")


@dataclass(frozen=True)
class StopRule:
    rule: str = "beta"
    threshold: float = 0.95
    """beta: the posterior probability of the leader that stops sampling."""
    window: int = 4
    """window: samples per window."""
    min_samples: int = 2
    futility: float = 0.0
    """Stop once the leader's share is surely below this (0: never stop for futility)."""
    futility_prob: float = 0.1
    """futility: how sure, as the posterior probability left above `futility`."""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"stopping rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if not 0.5 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0.5, 1), got {self.threshold}")
        if self.window < 1 or self.min_samples < 1:
            raise ValueError(f"window and min_samples must be >= 1, got {self.window} and {self.min_samples}")
        if not 0 <= self.futility < 1:
            raise ValueError(f"futility must be in [0, 1), got {self.futility}")
        if not 0 < self.futility_prob < 0.5:
            raise ValueError(f"futility_prob must be in (0, 0.5), got {self.futility_prob}")

    def decided(self, answers: Sequence[str | None]) -> bool:
        """Whether the votes so far (in drawing order) settle the problem."""
        counts = Counter(a for a in answers if a is not None).most_common(2)
        return self.decided_at(answers, len(answers), counts)

    def decided_at(self, answers: Sequence[str | None], m: int, top: list[tuple[str, int]]) -> bool:
        """`decided` on the first m answers, given their two most frequent (answer, count):
        for callers that count the votes as they arrive."""
        if m < self.min_samples:
            return False
        v1 = top[0][1] if top else 0
        if self.futility and _upper_tail(v1 + 1, m - v1 + 1, self.futility) < self.futility_prob:
            return True
        if self.rule == "window":
            if m % self.window:
                return False
            last = answers[m - self.window:m]
            return last[0] is not None and all(a == last[0] for a in last)
        return bool(top) and _upper_tail(v1 + 1, (top[1][1] if len(top) > 1 else 0) + 1, 0.5) >= self.threshold


@lru_cache(maxsize=65536)
def _upper_tail(a: int, b: int, x: float) -> float:
    """P(p > x) for p ~ Beta(a, b). Vote counts are small integers, so it is cached:
    replaying a grid of rules over many problems asks for the same few values."""
    from scipy.special import betainc  # here: importing scipy costs every command's start-up

    return float(1.0 - betainc(a, b, x))


def leader_probability(answers: Sequence[str | None]) -> float:
    """P(the leading answer's share > the runner-up's) under a uniform prior: the
    Beta(v1 + 1, v2 + 1) posterior's mass above 1/2. 0 with no answer at all."""
    counts = Counter(a for a in answers if a is not None).most_common(2)
    if not counts:
        return 0.0
    v1 = counts[0][1]
    v2 = counts[1][1] if len(counts) > 1 else 0
    return _upper_tail(v1 + 1, v2 + 1, 0.5)


def leader_share_above(answers: Sequence[str | None], share: float) -> float:
    """P(the leading answer's share of all samples >= share) under a uniform prior:
    the Beta(v1 + 1, m - v1 + 1) posterior's mass above `share`, where samples with
    no answer count in m."""
    counts = Counter(a for a in answers if a is not None).most_common(1)
    v1, m = (counts[0][1] if counts else 0), len(answers)
    return _upper_tail(v1 + 1, m - v1 + 1, share)


def stop_point(answers: Sequence[str | None], rule: StopRule, n: int) -> int:
    """How many samples (in drawing order) adaptive stopping draws, at most n: the
    first m at which `rule.decided(answers[:m])`, counted as the votes arrive."""
    n = min(n, len(answers))
    counts: Counter = Counter()
    for m in range(1, n + 1):
        if answers[m - 1] is not None:
            counts[answers[m - 1]] += 1
        if rule.decided_at(answers, m, counts.most_common(2)):
            return m
    return n


def majority(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (ties: the one seen first); None when nobody answered."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


@dataclass(frozen=True)
class Replayed:
    problem_id: str
    samples: int
    tokens: int
    correct: bool
    samples_all: int
    tokens_all: int
    correct_all: bool
    """The same for majority over all n samples."""


def replay_problem(pid: str, answers: Sequence[str | None], tokens: Sequence[int], right: set[str],
                   rule: StopRule, n: int) -> Replayed:
    """One problem: its samples' answer keys and token counts in drawing order, and
    the keys that are correct."""
    n = min(n, len(answers))
    m = stop_point(answers, rule, n)
    early, full = majority(answers[:m]), majority(answers[:n])
    return Replayed(pid, m, int(sum(tokens[:m])), early in right, n, int(sum(tokens[:n])), full in right)


@dataclass(frozen=True)
class Votes:
    """One problem's stored samples in drawing order: their answer keys (None where a
    sample gave no answer) and generated tokens, and the keys that are correct."""
    problem_id: str
    answers: tuple[str | None, ...]
    tokens: tuple[int, ...]
    right: frozenset[str]

    def replay(self, rule: StopRule, n: int | None = None) -> Replayed:
        return replay_problem(self.problem_id, self.answers, self.tokens, self.right, rule,
                              len(self.answers) if n is None else n)


def stored_votes(store, run_id: str, verifier: str = "math_answer",
                 problems: Sequence[str] | None = None) -> list[Votes]:
    """Each graded problem's votes in a stored sampling run, in sample index order
    (the order of their random seeds)."""
    from .analysis import answer_rules, graded_samples
    from .select import AnswerKeys

    graded = graded_samples(store, run_id, verifier)
    tokens = {(s.problem_id, s.sample_index): s.completion_tokens for s in store.samples(run_id)}
    keys, rules = AnswerKeys(), answer_rules(store, run_id)
    out = []
    for pid in problems if problems is not None else sorted(graded):
        items = sorted(graded.get(pid, []))
        if not items:
            continue
        ans = tuple(keys.of_text(t, rules[pid]) for _, t, _ in items)
        right = frozenset(a for a, (_, _, ok) in zip(ans, items) if ok and a is not None)
        out.append(Votes(pid, ans, tuple(tokens[pid, i] for i, _, _ in items), right))
    return out


def replay(store, run_id: str, rule: StopRule, n: int | None = None, verifier: str = "math_answer",
           problems: Sequence[str] | None = None) -> list[Replayed]:
    """Adaptive stopping replayed on a stored sampling run (see the module doc)."""
    return [v.replay(rule, n) for v in stored_votes(store, run_id, verifier, problems)]


# Choosing a rule on some runs and checking it on another.
#
# A stopping rule's setting is a bet on how a model's votes behave, and whether it
# costs accuracy differs between sets of problems by more than the accuracy it is
# meant to keep (docs/signals.md: one setting lost 0 and 9 problems net on two
# draws of the same task). So a setting is chosen on some runs and judged on one it
# was not chosen on, each run in turn: leave-one-run-out cross-validation.

GRID = tuple([StopRule("beta", threshold=t) for t in (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)]
             + [StopRule("beta", threshold=t, futility=f) for t in (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
                for f in (0.2, 0.25, 0.3, 0.35, 0.4)]
             + [StopRule("window", window=w) for w in (2, 3, 4, 5, 6, 8)])
"""The settings `cross_validate` chooses among by default."""


@dataclass(frozen=True)
class Outcome:
    """Adaptive stopping against majority over all n, pooled over problems."""
    problems: int
    tokens: int
    tokens_all: int
    correct: float
    correct_all: float
    won: int
    """problems adaptive stopping got right and majority@n wrong"""
    lost: int

    @property
    def ratio(self) -> float:
        """Tokens majority@n spends over tokens adaptive stopping spends."""
        return self.tokens_all / max(1, self.tokens)

    @property
    def delta(self) -> float:
        """Accuracy of adaptive stopping minus majority@n's."""
        return (self.correct - self.correct_all) / max(1, self.problems)


def outcome(rows: Sequence[Replayed]) -> Outcome:
    return Outcome(len(rows), sum(r.tokens for r in rows), sum(r.tokens_all for r in rows),
                   sum(r.correct for r in rows), sum(r.correct_all for r in rows),
                   sum(r.correct and not r.correct_all for r in rows),
                   sum(r.correct_all and not r.correct for r in rows))


def choose(results: dict[Any, Outcome], tolerance: float = 0.005, min_ratio: float | None = None) -> Any:
    """The setting to use, by one of two stated criteria: the cheapest (fewest tokens)
    whose accuracy is at most `tolerance` below majority's; or, with `min_ratio`, the
    most accurate among those that spend at least `min_ratio` times fewer tokens
    (ties: the cheaper). None when no setting qualifies."""
    if min_ratio is None:
        ok = [r for r, o in results.items() if o.delta >= -tolerance - 1e-12]
        return min(ok, key=lambda r: (results[r].tokens, -results[r].delta), default=None)
    ok = [r for r, o in results.items() if o.ratio >= min_ratio]
    return max(ok, key=lambda r: (results[r].delta, -results[r].tokens), default=None)


@dataclass(frozen=True)
class Fold:
    held_out: str
    rule: Any
    """chosen on the other runs, a `StopRule` or the key it was given as (None: no
    setting met the criterion there)"""
    fit: Outcome | None
    """the chosen rule on the other runs, pooled"""
    held: list[Replayed]
    """the chosen rule on the held-out run's problems (empty when nothing was chosen)"""


def cross_validate(runs: dict[str, Sequence[Votes]], rules: Sequence[StopRule] = GRID, n: int | None = None,
                   tolerance: float = 0.005, min_ratio: float | None = None) -> list[Fold]:
    """Leave one run out, for each run: the rule `choose` picks on the pooled problems
    of the others, replayed on the held-out run's. Needs at least two runs."""
    return cross_validate_rows({name: {rule: [v.replay(rule, n) for v in votes] for rule in rules}
                                for name, votes in runs.items()}, tolerance, min_ratio)


def cross_validate_rows(rows: dict[str, dict[Any, list[Replayed]]], tolerance: float = 0.005,
                        min_ratio: float | None = None) -> list[Fold]:
    """`cross_validate` on replays already made: per run, per rule (any key, the same
    in every run), the rule's replay on each of the run's problems. For rules that are
    not `StopRule`s, such as ones that read more than the votes."""
    if len(rows) < 2:
        raise ValueError(f"cross-validation needs at least two runs, got {len(rows)}")
    rules = list(next(iter(rows.values())))
    folds = []
    for held in rows:
        fit = {rule: outcome([r for name in rows if name != held for r in rows[name][rule]]) for rule in rules}
        rule = choose(fit, tolerance, min_ratio)
        folds.append(Fold(held, rule, fit[rule] if rule is not None else None,
                          rows[held][rule] if rule is not None else []))
    return folds
