"""Particle filtering: resampling follows the weights (chi-square over many seeds),
the filter finds the maze's good path that greedy decoding misses, tempering keeps
the early population diverse, every reward model (confidence included) drives it,
and its runs are stored like any strategy's."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chisquare

from doubles import MazeEngine, MazePRM, _u
from testtime.engines.base import Completion
from testtime.errors import InputError
from testtime.prompts import PromptTemplate
from testtime.rewards.confidence import ConfidenceScorer
from testtime.runner import grade, run_strategy
from testtime.spec import SamplingParams, SpecError
from testtime.store import Store
from testtime.strategies import SearchContext, load_strategy, strategy_params
from testtime.strategies.particles import effective_size, logit, probabilities, resample
from testtime.tasks.base import Problem

TEMPLATE = PromptTemplate(name="maze", user="{question}")
PROBLEMS = [Problem(f"p{i}", f"maze {i}", "1", 1 + i % 2) for i in range(3)]
SAMPLING = SamplingParams(temperature=0.8, max_tokens=64)


def params(**kw):
    return strategy_params("particle_filtering", {"n": 8, "max_steps": 6, "delimiter": "\n\n", **kw})


def answers(cands):
    return [c.text.rsplit("answer is ", 1)[-1].rstrip(".") for c in cands]


def run(engine, prm=None, seed=3, problems=PROBLEMS, **kw):
    ctx = SearchContext(engine, prm if prm is not None else MazePRM(), TEMPLATE, SAMPLING, seed)
    return list(load_strategy("particle_filtering").run(problems, ctx, params(**kw)))


# ---------------------------------------------------------------- resampling itself

def test_multinomial_resampling_follows_the_weights_chi_square():
    p = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
    counts = np.zeros(len(p))
    for seed in range(600):
        picked = resample(p, 8, np.random.default_rng(seed), "multinomial")
        counts += np.bincount(picked, minlength=len(p))
    assert chisquare(counts, counts.sum() * p).pvalue > 1e-3
    # and the check has power: the same counts reject equal weights, and a slightly wrong p
    assert chisquare(counts, counts.sum() * np.full(len(p), 0.2)).pvalue < 1e-6
    assert chisquare(counts, counts.sum() * np.array([0.45, 0.3, 0.15, 0.07, 0.03])).pvalue < 1e-3


def test_systematic_resampling_keeps_each_particle_floor_or_ceil_of_its_share():
    p = probabilities([0.3, -1.0, 2.0, 0.0, -3.0])
    n = 7
    mean = np.zeros(len(p))
    for seed in range(400):
        counts = np.bincount(resample(p, n, np.random.default_rng(seed), "systematic"), minlength=len(p))
        assert counts.sum() == n
        assert np.all(counts >= np.floor(n * p)) and np.all(counts <= np.ceil(n * p))
        mean += counts / 400
    assert mean == pytest.approx(n * p, abs=0.15)


def test_weights_and_effective_size():
    assert logit(0.9) == pytest.approx(math.log(9))
    assert logit(1.0) == pytest.approx(math.log((1 - 1e-6) / 1e-6))  # clipped, never infinite
    p = probabilities([logit(0.9), logit(0.5)])
    assert p == pytest.approx([0.9, 0.1])  # weights s / (1 - s): 9 to 1
    assert probabilities([1000.0, 999.0]).sum() == pytest.approx(1.0)  # no overflow
    assert effective_size(np.full(4, 0.25)) == pytest.approx(4)
    assert effective_size(np.array([1.0, 0, 0, 0])) == pytest.approx(1)


def test_the_strategy_resamples_in_proportion_to_the_reward_models_weights():
    """After the first step each population is some good and some bad particles; the
    number of good ones kept is Binomial(n, q) with q the good ones' share of the
    weight. Summed over many seeds, the kept count must sit within 4 standard
    deviations of its expectation (and a filter that ignored the weights would not)."""
    n, tau = 8, 2 * logit(0.9)  # good to bad weight e to 1
    w_good, w_bad = math.exp(logit(0.9) / tau), math.exp(logit(0.1) / tau)
    observed = expected = var = uniform = 0.0
    for seed in range(60):
        eng = MazeEngine(depth=4, p_good=0.5)
        res = run(eng, seed=seed, problems=PROBLEMS[:1], n=n, max_steps=2, weight_temperature=tau)
        first = eng.calls[0][0]
        good = sum(_u(s, 0) < 0.5 for s in first.seeds)
        q = good * w_good / (good * w_good + (n - good) * w_bad)
        kept = sum(c.steps[0].endswith("good") for c in res[0].candidates)
        observed, expected, var = observed + kept, expected + n * q, var + n * q * (1 - q)
        uniform += good
    z = (observed - expected) / math.sqrt(var)
    assert abs(z) < 4, (observed, expected, var)
    assert abs(uniform - expected) / math.sqrt(var) > 4  # the weights moved it, measurably


# ---------------------------------------------------------------- the filter on a known maze

def test_particle_filtering_finds_the_path_greedy_decoding_misses():
    greedy = SearchContext(MazeEngine(p_good=0.5), MazePRM(), TEMPLATE, SamplingParams(temperature=0.0))
    one = strategy_params("repeated_sampling", {"n": 1})
    assert all(answers(r.candidates) == ["0"] for r in load_strategy("repeated_sampling").run(PROBLEMS, greedy, one))
    eng = MazeEngine(p_good=0.5)
    results = run(eng)
    assert [r.problem_id for r in results] == [p.id for p in PROBLEMS]
    for r in results:
        assert len(r.candidates) == 8  # the final population, copies included
        got = answers(r.candidates)
        assert got.count("1") > got.count("0")  # the population converged on the good path
        best = max(r.candidates, key=lambda c: c.scores[-1])
        assert answers([best]) == ["1"] and all(len(c.scores) == len(c.steps) for c in r.candidates)
        assert len(r.decision["ess"]) == len(r.decision["distinct"]) >= 1
        assert r.usage["policy"].decode > 0
    # every problem's particles went to the engine together, one call per step
    assert len(eng.calls) <= 6
    assert {req.key[0] for req in eng.calls[0]} == {p.id for p in PROBLEMS}
    # copies of one particle share one request: the first step is one request per problem
    assert [len(req.seeds) for req in eng.calls[0]] == [8, 8, 8]


def test_a_problem_resamples_the_same_whichever_problems_share_its_batch():
    alone = run(MazeEngine(p_good=0.5), problems=PROBLEMS[1:2])[0]
    together = [r for r in run(MazeEngine(p_good=0.5)) if r.problem_id == "p1"][0]
    assert [c.text for c in alone.candidates] == [c.text for c in together.candidates]
    assert alone.decision == together.decision


class UnevenMaze(MazeEngine):
    """Maze 2 is two steps deep, the others five."""

    def generate(self, requests):
        for req in requests:
            self.depth = 2 if "maze 2" in str(req.messages) else 5
            yield from super().generate([req])


def test_a_problem_whose_particles_all_finished_is_final_at_once_and_left_alone():
    order = run(UnevenMaze(p_good=0.5))
    assert [r.problem_id for r in order] == ["p2", "p0", "p1"]  # yielded (and stored) the moment it is final
    results = {r.problem_id: r for r in order}
    # maze 2: resampled after its two steps, then never again (its population is final)
    assert len(results["p2"].decision["ess"]) == 2 and all(c.text.count("step") == 2 for c in results["p2"].candidates)
    assert all(len(results[p].decision["ess"]) == 5 for p in ("p0", "p1"))


def test_tempering_keeps_the_first_steps_population_diverse():
    eng_args = dict(depth=6, p_good=0.5)
    sharp = run(MazeEngine(**eng_args), seed=11)
    tempered = run(MazeEngine(**eng_args), seed=11, tempering=4)
    for s, t in zip(sharp, tempered):
        assert t.decision["ess"][0] > s.decision["ess"][0]
    assert sum(t.decision["distinct"][0] for t in tempered) > sum(s.decision["distinct"][0] for s in sharp)


def test_parameters_are_checked_by_name():
    with pytest.raises(SpecError, match="weight_temperature must be a number > 0"):
        params(weight_temperature=0)
    with pytest.raises(SpecError, match="tempering must be an integer >= 0"):
        params(tempering=-1)
    with pytest.raises(SpecError, match="resampling must be one of multinomial, systematic"):
        params(resampling="stratified")
    with pytest.raises(SpecError, match="max_steps must be an integer >= 1"):
        params(max_steps=0)


# ---------------------------------------------------------------- confidence as the step signal

class ConfidentMaze(MazeEngine):
    """The maze, with per-token statistics: a good step's tokens are confident (15
    nats), a bad step's are not (5), as an engine that records them would report."""

    def generate(self, requests):
        for c in super().generate(requests):
            conf = np.array([[15.0 if "good" in c.text.split("\n\n")[0] else 5.0, 1.0, -0.1]] * 6, np.float32)
            yield Completion(c.key, c.index, c.seed, c.text, c.token_ids, c.prompt_tokens, c.cached_tokens,
                             c.finish_reason, stop_hit=c.stop_hit, token_stats=conf)


def test_token_confidence_drives_step_wise_search():
    prm = ConfidenceScorer(metric="mean")
    for r in run(ConfidentMaze(p_good=0.5), prm=prm, weight_temperature=2.0):
        got = answers(r.candidates)
        assert got.count("1") > got.count("0")
        # a step's score is the confidence of the partial solution up to it
        c = r.candidates[0]
        assert len(c.scores) == len(c.steps) and 5.0 <= min(c.scores) <= max(c.scores) <= 15.0
    beam = strategy_params("beam_search", {"n": 8, "width": 2, "max_steps": 6, "delimiter": "\n\n"})
    ctx = SearchContext(ConfidentMaze(p_good=0.5), prm, TEMPLATE, SAMPLING, 3)
    for r in load_strategy("beam_search").run(PROBLEMS, ctx, beam):
        assert answers([max(r.candidates, key=lambda c: c.scores[-1])]) == ["1"]


def test_confidence_without_token_statistics_says_what_is_missing():
    with pytest.raises(InputError, match="token statistics the engine records"):
        run(MazeEngine(p_good=0.5), prm=ConfidenceScorer())


# ---------------------------------------------------------------- stored as a run

def test_particle_filtering_runs_are_stored_and_graded(tmp_path):
    from testtime.tasks.base import Task

    task = Task("maze", {"name": "maze"}, lambda limit: PROBLEMS, "plain", "math_answer")
    with Store(tmp_path / "runs.db") as store:
        res = run_strategy(store, task, MazeEngine(p_good=0.5), "particle_filtering", params(), SAMPLING,
                           MazePRM(), template="plain", seed=3)
        assert res.drawn == 3 * 8
        grade(store, res.run_id, "math_answer")
        decisions = store.decisions(res.run_id)
        assert set(decisions) == {p.id for p in PROBLEMS} and all("ess" in d for d in decisions.values())
        again = run_strategy(store, task, MazeEngine(p_good=0.5), "particle_filtering", params(), SAMPLING,
                             MazePRM(), template="plain", seed=3)
        assert again.run_id == res.run_id and again.drawn == 0  # resumes: nothing left to do
