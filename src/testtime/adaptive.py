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
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

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
        m = len(answers)
        if m < self.min_samples:
            return False
        if self.futility and leader_share_above(answers, self.futility) < self.futility_prob:
            return True
        if self.rule == "window":
            if m % self.window:
                return False
            last = answers[m - self.window:]
            return last[0] is not None and all(a == last[0] for a in last)
        return leader_probability(answers) >= self.threshold


def leader_probability(answers: Sequence[str | None]) -> float:
    """P(the leading answer's share > the runner-up's) under a uniform prior: the
    Beta(v1 + 1, v2 + 1) posterior's mass above 1/2. 0 with no answer at all."""
    from scipy.special import betainc  # here: importing scipy costs every command's start-up

    counts = Counter(a for a in answers if a is not None).most_common(2)
    if not counts:
        return 0.0
    v1 = counts[0][1]
    v2 = counts[1][1] if len(counts) > 1 else 0
    return float(1.0 - betainc(v1 + 1, v2 + 1, 0.5))


def leader_share_above(answers: Sequence[str | None], share: float) -> float:
    """P(the leading answer's share of all samples >= share) under a uniform prior:
    the Beta(v1 + 1, m - v1 + 1) posterior's mass above `share`, where samples with
    no answer count in m."""
    from scipy.special import betainc

    counts = Counter(a for a in answers if a is not None).most_common(1)
    v1, m = (counts[0][1] if counts else 0), len(answers)
    return float(1.0 - betainc(v1 + 1, m - v1 + 1, share))


def stop_point(answers: Sequence[str | None], rule: StopRule, n: int) -> int:
    """How many samples (in drawing order) adaptive stopping draws, at most n."""
    for m in range(1, min(n, len(answers)) + 1):
        if rule.decided(answers[:m]):
            return m
    return min(n, len(answers))


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


def replay(store, run_id: str, rule: StopRule, n: int | None = None, verifier: str = "math_answer",
           problems: Sequence[str] | None = None) -> list[Replayed]:
    """Adaptive stopping replayed on a stored sampling run (see the module doc)."""
    from .analysis import answer_rules, graded_samples
    from .select import AnswerKeys

    graded = graded_samples(store, run_id, verifier)
    tokens = {(s.problem_id, s.sample_index): s.completion_tokens for s in store.samples(run_id)}
    keys, rules = AnswerKeys(), answer_rules(store, run_id)
    out = []
    for pid in problems if problems is not None else sorted(graded):
        items = sorted(graded.get(pid, []))  # sample index order: the order of random seeds
        if not items:
            continue
        ans = [keys.of_text(t, rules[pid]) for _, t, _ in items]
        right = {a for a, (_, _, ok) in zip(ans, items) if ok and a is not None}
        out.append(replay_problem(pid, ans, [tokens[pid, i] for i, _, _ in items], right, rule,
                                  n if n is not None else len(items)))
    return out
