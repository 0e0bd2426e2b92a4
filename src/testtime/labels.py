"""Monte Carlo step labels from the policy's own rollouts (the Math-Shepherd recipe).

A stored solution is split into steps. From the prefix that ends with step k,
the policy draws `m` completions; step k's *soft* label is the fraction of them
that the run's verifier passes, its *hard* label whether any does. The last
step needs no rollouts: the solution itself is the only completion of its whole
text, so its label is the sample's own verdict (m of m, or 0 of m).

Rollouts are ordinary engine requests: the prompt the policy saw, continued by
the steps so far. The embedded engine keeps each prefix's KV cache, so step
k+1's rollouts compute only step k+1's tokens, and it batches the rollouts of
many samples and problems in each decode step.

Labels go into the store's `step_labels` table, one transaction per sample with
what its rollouts cost (`label_usage`), so a labelling stopped at any moment
(kill -9 included) resumes where it stopped and never stores half a sample. A
*labeler* is the hash of everything that decides the labels (engine, sampling,
m, delimiter, verifier, seed); labelling again with the same settings resumes,
with other settings it is a second set of labels beside the first.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

from .engines.base import Engine, Request
from .errors import InputError
from .export import REJECTABLE, run_template
from .flops import Usage
from .rewards.base import split_steps
from .runner import ENGINE_ENDED, grade, set_shapes
from .spec import SamplingParams, sample_seed, stable_hash
from .store import SampleRow, Store
from .tasks.base import Problem
from .verifiers.base import Verifier

SELECTIONS = ("all", "balanced")


@dataclass(frozen=True)
class LabelConfig:
    m: int = 4
    """Rollouts per step."""
    delimiter: str = "\n"
    """What ends a step (as for search and `--prm` scoring: small models write a step per line)."""
    select: str = "all"
    """all: every graded sample; balanced: as many verified as failed samples, drawn
    across problems by `seed` (the minority kind decides how many)."""
    max_samples: int | None = None
    """At most this many samples (after selection), for a bounded cost."""
    max_tokens: int | None = None
    """Rollout length [default: the run's max_tokens]."""
    seed: int = 0

    def check(self) -> None:
        if not isinstance(self.m, int) or self.m < 1:
            raise InputError(f"m (rollouts per step) must be an integer >= 1, got {self.m!r}")
        if not isinstance(self.delimiter, str) or not self.delimiter:
            raise InputError(f"delimiter must be a non-empty string, got {self.delimiter!r}")
        if self.select not in SELECTIONS:
            raise InputError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise InputError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class LabelResult:
    run_id: str
    labeler: str
    labelled: int
    """Samples labelled by this call."""
    total: int
    """Samples the run now has labels for, under this labeler."""
    rollouts: int
    usage: Usage
    seconds: float


def soft_labels(rows: Sequence[tuple[int, int]]) -> list[float]:
    return [p / r for r, p in rows]


def hard_labels(rows: Sequence[tuple[int, int]]) -> list[bool]:
    return [p > 0 for _, p in rows]


def select_samples(samples: Sequence[SampleRow], verdicts: dict[tuple[str, int], str], cfg: LabelConfig) -> list[SampleRow]:
    """The graded samples to label, in a deterministic order (by seed)."""
    graded = [s for s in samples if verdicts.get((s.problem_id, s.sample_index)) in ("pass",) + REJECTABLE]
    rng = random.Random(f"label/{cfg.seed}")
    if cfg.select == "balanced":
        good = [s for s in graded if verdicts[s.problem_id, s.sample_index] == "pass"]
        bad = [s for s in graded if verdicts[s.problem_id, s.sample_index] != "pass"]
        k = min(len(good), len(bad))
        if cfg.max_samples is not None:
            k = min(k, cfg.max_samples // 2)
        picked = _spread(good, k, rng) + _spread(bad, k, rng)
    else:
        picked = list(graded)
        rng.shuffle(picked)
        picked = picked[:cfg.max_samples]
    return sorted(picked, key=lambda s: (s.problem_id, s.sample_index))


def _spread(rows: list[SampleRow], k: int, rng: random.Random) -> list[SampleRow]:
    """k rows, taking one per problem in turn, so no problem dominates."""
    by_problem: dict[str, list[SampleRow]] = {}
    for s in rows:
        by_problem.setdefault(s.problem_id, []).append(s)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_problem.items())]
    rng.shuffle(queues)
    out: list[SampleRow] = []
    while len(out) < k:
        for q in queues:
            if q and len(out) < k:
                out.append(q.pop())
    return out


def labeler_info(engine: Engine, params: SamplingParams, verifier: str, cfg: LabelConfig) -> dict[str, Any]:
    return {"method": "monte_carlo", "engine": engine.identity(), "sampling": params.to_dict(), "m": cfg.m,
            "delimiter": cfg.delimiter, "verifier": verifier, "seed": cfg.seed}


def labeler_name(info: dict[str, Any]) -> str:
    return "mc-" + stable_hash(info)[:12]


def label_run(store: Store, run_id: str, engine: Engine, verifier: Verifier, cfg: LabelConfig = LabelConfig(),
              chunk: int = 32, progress: Callable[[int, int], None] | None = None) -> LabelResult:
    """Label the steps of a stored run's samples (see the module's docstring); resumable.
    `progress(samples, rollouts)` is called as samples are stored."""
    cfg.check()
    t0 = time.perf_counter()
    spec = store.run_spec(run_id)
    tmpl = run_template(store, run_id, "rollouts would not continue it")
    params = replace(spec.sampling, max_tokens=cfg.max_tokens or spec.sampling.max_tokens, logprobs=0)
    grade(store, run_id, verifier)
    info = labeler_info(engine, params, verifier.name, cfg)
    labeler = labeler_name(info)
    store.set_labeler(run_id, labeler, info)
    set_shapes(store, run_id, {"label": engine})
    verdicts = {(r["problem_id"], r["sample_index"]): r["verdict"] for r in store.db.execute(
        "SELECT problem_id, sample_index, verdict FROM verdicts WHERE run_id = ? AND verifier = ?",
        (run_id, verifier.name))}
    problems = {p["problem_id"]: Problem(p["problem_id"], p["question"], p["answer"], p["difficulty"], p["meta"])
                for p in store.problems(run_id)}
    chosen = select_samples(store.samples(run_id), verdicts, cfg)
    if not chosen:
        raise InputError(f"run {run_id} has no graded samples to label"
                         + (" with both verified and failed ones (select=balanced)" if cfg.select == "balanced" else ""))
    done = store.step_labels(run_id, labeler)
    todo = [s for s in chosen if (s.problem_id, s.sample_index) not in done]
    labelled = rollouts = 0
    usage = Usage()
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        for s, labels, u in _label_chunk(part, problems, verdicts, engine, verifier, tmpl, params, cfg):
            store.add_step_labels(run_id, labeler, s.problem_id, s.sample_index, labels, u.to_dict())
            labelled += 1
            rollouts += sum(r for r, _ in labels[:-1])
            usage += u
            if progress:
                progress(1, sum(r for r, _ in labels[:-1]))
    return LabelResult(run_id, labeler, labelled, len(done) + labelled, rollouts, usage, time.perf_counter() - t0)


def _label_chunk(part: Sequence[SampleRow], problems: dict[str, Problem], verdicts: dict[tuple[str, int], str],
                 engine: Engine, verifier: Verifier, tmpl, params: SamplingParams,
                 cfg: LabelConfig) -> Iterator[tuple[SampleRow, list[tuple[int, int]], Usage]]:
    """Each sample of `part` with its labels, as soon as its last rollout is verified."""
    d = cfg.delimiter
    steps = {(s.problem_id, s.sample_index): split_steps(s.text, d) for s in part}
    pending: dict[tuple[str, int], int] = {}
    drawn: dict[tuple[str, int], list[int]] = {}
    passed: dict[tuple[str, int], list[int]] = {}
    cost: dict[tuple[str, int], Usage] = {}
    requests: list[Request] = []
    for s in part:
        key = (s.problem_id, s.sample_index)
        own = 1 if verdicts[key] == "pass" else 0
        st = steps[key]
        if len(st) <= 1:  # one step (or none): its label is the verdict, no rollouts
            yield s, [(cfg.m, cfg.m * own)], Usage()
            continue
        p = problems[s.problem_id]
        pending[key] = (len(st) - 1) * cfg.m
        passed[key] = [0] * (len(st) - 1)
        drawn[key] = [0] * (len(st) - 1)
        cost[key] = Usage()
        for k in range(len(st) - 1):
            partial = d.join(st[:k + 1]) + d
            seeds = tuple(sample_seed(cfg.seed, f"{s.problem_id}\0{s.sample_index}\0{k}", j) for j in range(cfg.m))
            requests.append(Request(key=(key, k, partial), messages=tuple(tmpl.messages(p.question)),
                                    continuation=tmpl.continuation(p.question) + partial, seeds=seeds, params=params))
    by_key = {(s.problem_id, s.sample_index): s for s in part}
    for c in engine.generate(requests):
        key, k, partial = c.key
        cost[key] += Usage.of(c.prompt_tokens, c.cached_tokens, c.completion_tokens)
        if c.finish_reason not in ENGINE_ENDED:  # an aborted rollout is no evidence either way
            drawn[key][k] += 1
            passed[key][k] += verifier.verify(problems[key[0]], partial + c.text).passed
        pending[key] -= 1
        if pending[key] == 0 and all(drawn[key]):  # else left unlabelled: a rerun draws it again
            own = 1 if verdicts[key] == "pass" else 0
            labels = list(zip(drawn[key], passed[key])) + [(cfg.m, cfg.m * own)]
            yield by_key[key], labels, cost[key]
