"""Particle filtering (Puri et al. 2025, "A probabilistic inference approach to
inference-time scaling of LLMs using particle-based Monte Carlo methods").

Search as inference: N particles (partial solutions) per problem advance one
step at a time; after each step every particle is weighted by the reward model's
score of its partial solution and N particles are drawn from the population in
proportion to those weights. Where beam search keeps the top N/M deterministically
(and collapses onto the reward model's favourite, errors included), resampling
keeps a particle in proportion to how good it looks, so a noisy reward model's
mistakes are averaged out rather than locked in.

- Weights: a score s in [0, 1] becomes the log-potential logit(s) (so weight
  s / (1 - s)), divided by `weight_temperature`. A reward model may define
  `log_weight(score)` instead (`confidence`: its nats).
- Tempering, against early collapse: over the first `tempering` steps the
  log-potentials are scaled by (t + 1) / (tempering + 1), so the first steps'
  resampling is flatter (early partial solutions say little about the answer)
  and the full weights apply from step `tempering` on.
- A finished particle stays in the population with its final weight (it can be
  copied or dropped by later resampling) but is not extended. A problem is done
  when every particle has finished, or at `max_steps`, where the unfinished are
  finished as they stand; its result is yielded (and stored) at once, and it is
  never resampled again while other problems go on.
- Copies of one particle ask for their children in one request: they share the
  prefix, and the embedded engine's retained KV cache.
- Every problem's particles go to the engine together, one batch per step, like
  beam search. Resampling draws come from the run's seed and the problem's id,
  so a problem resamples the same whichever problems share its batch.

The final population is the candidates (copies included: the population is the
filter's estimate, so a particle held by many places counts many times in the
vote); `decision` records the effective sample size and the distinct particles
at every step, which say whether the filter collapsed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..spec import sample_seed
from ..tasks.base import Problem
from ._steps import Path, SteppedParams, expand, score, step_sampling
from .base import STRATEGIES, Meter, ProblemResult, SearchContext, SpecError

SCHEMES = ("multinomial", "systematic")


@dataclass(frozen=True)
class ParticleParams(SteppedParams):
    weight_temperature: float = 1.0
    """Log-potentials are divided by it: above 1 resampling is flatter (more diverse),
    below 1 greedier. The paper's setting is 1."""
    tempering: int = 0
    """Steps over which the weights are tempered (scaled by (t + 1) / (tempering + 1)
    at step t); 0 applies the full weights from the first step."""
    resampling: str = "multinomial"
    """multinomial (the paper's: N independent draws) or systematic (one uniform draw,
    N evenly spaced points: each particle kept floor or ceil of N times its weight)."""

    def check(self) -> None:
        super().check()
        if not isinstance(self.weight_temperature, (int, float)) or not self.weight_temperature > 0 \
                or not math.isfinite(self.weight_temperature):
            raise SpecError(f"weight_temperature must be a number > 0, got {self.weight_temperature!r}")
        if not isinstance(self.tempering, int) or self.tempering < 0:
            raise SpecError(f"tempering must be an integer >= 0, got {self.tempering!r}")
        if self.resampling not in SCHEMES:
            raise SpecError(f"resampling must be one of {', '.join(SCHEMES)}, got {self.resampling!r}")


def logit(s: float, eps: float = 1e-6) -> float:
    s = min(max(float(s), eps), 1.0 - eps)
    return math.log(s / (1.0 - s))


def probabilities(log_weights: Sequence[float]) -> np.ndarray:
    """Normalised weights from log-weights (a softmax, stable for any scale)."""
    x = np.asarray(log_weights, dtype=np.float64)
    x = x - x.max()
    w = np.exp(x)
    return w / w.sum()


def effective_size(p: np.ndarray) -> float:
    """The effective sample size of normalised weights, 1 / sum p^2: N for equal
    weights, 1 when one particle has them all."""
    return float(1.0 / np.square(p).sum())


def resample(p: np.ndarray, n: int, rng: np.random.Generator, scheme: str = "multinomial") -> np.ndarray:
    """n indices drawn from normalised weights p, sorted."""
    if scheme == "multinomial":
        return np.sort(rng.choice(len(p), size=n, p=p))
    if scheme == "systematic":
        points = (rng.random() + np.arange(n)) / n
        cdf = np.cumsum(p)
        cdf[-1] = 1.0  # rounding must never push a point past the last particle
        return np.searchsorted(cdf, points, side="right")
    raise ValueError(f"resampling must be one of {', '.join(SCHEMES)}, got {scheme!r}")


def log_potential(prm, path: Path) -> float:
    """A particle's log-potential: its latest step's score, through the reward model's
    `log_weight` if it has one, else logit. A particle with no scored step is neutral."""
    if not path.scores:
        return 0.0
    s = path.scores[-1]
    convert = getattr(prm, "log_weight", None)
    return float(convert(s)) if convert is not None else logit(s)


@STRATEGIES.register("particle_filtering")
class ParticleFiltering:
    name = "particle_filtering"
    Params = ParticleParams
    needs_prm = True

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: ParticleParams) -> Iterator[ProblemResult]:
        by_id = {p.id: p for p in problems}
        meter = Meter(ctx.prm)
        step = step_sampling(ctx, params.step_tokens)
        population: dict[str, list[Path]] = {p.id: [Path()] * params.n for p in problems}
        trace: dict[str, dict[str, list]] = {p.id: {"ess": [], "distinct": []} for p in problems}
        reported: set[str] = set()
        for it in range(params.max_steps):
            final = it == params.max_steps - 1
            # copies of one particle are one parent asking for as many children
            parents = []
            for pid, particles in population.items():
                counts: dict[int, list] = {}
                for path in particles:
                    if not path.finished:
                        counts.setdefault(id(path), [path, 0])[1] += 1
                parents += [(pid, path, c) for path, c in counts.values()]
            if not parents:
                break
            children = expand(ctx, meter, by_id, parents, step, params.delimiter, it, final)
            score(meter, by_id, [(pid, path) for pid, path, _ in children])
            grown: dict[str, list[Path]] = {pid: [] for pid in population}
            for pid, path, _ in children:
                grown[pid].append(path)
            for pid in population:
                if not grown[pid]:  # every particle had finished already: nothing to weigh again
                    continue
                particles = [path for path in population[pid] if path.finished] + grown[pid]
                if final:
                    for path in particles:
                        path.finished = True
                    population[pid] = particles
                    continue
                population[pid] = self._resample(pid, particles, ctx, params, it, trace[pid])
            for pid in [q for q in population if q not in reported and all(x.finished for x in population[q])]:
                reported.add(pid)  # final: stored now, while the others go on
                yield self._result(pid, population[pid], meter, params, trace[pid])
        for pid in [q for q in population if q not in reported]:  # none (the last step finishes all): a safety net
            yield self._result(pid, population[pid], meter, params, trace[pid])

    @staticmethod
    def _result(pid: str, particles: list[Path], meter: Meter, params: ParticleParams,
                trace: dict[str, list]) -> ProblemResult:
        return ProblemResult(pid, [x.candidate(params.delimiter) for x in particles], meter.of(pid), trace)

    @staticmethod
    def _resample(pid: str, particles: list[Path], ctx: SearchContext, params: ParticleParams, it: int,
                  trace: dict[str, list]) -> list[Path]:
        beta = min(1.0, (it + 1) / (params.tempering + 1))
        logw = [beta * log_potential(ctx.prm, path) / params.weight_temperature for path in particles]
        p = probabilities(logw)
        rng = np.random.default_rng(sample_seed(ctx.seed, f"{pid}/resample/{it}", 0))
        picked = resample(p, params.n, rng, params.resampling)
        trace["ess"].append(round(effective_size(p), 3))
        trace["distinct"].append(len(set(picked.tolist())))
        return [particles[i] for i in picked]
