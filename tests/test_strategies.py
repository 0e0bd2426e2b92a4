"""The strategy registry, each strategy on a maze whose right paths are known, and
strategy runs stored like sampling runs: candidates, step scores, usage per role,
resume after a failure and after a real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from doubles import MazeEngine, MazePRM
from testtime.prompts import PromptTemplate
from testtime.registry import UnknownNameError
from testtime.runner import grade, run_strategy
from testtime.select import aggregate
from testtime.spec import SamplingParams, SpecError
from testtime.store import Store
from testtime.strategies import STRATEGIES, SearchContext, load_strategy, strategy_params
from testtime.tasks.base import Problem

TEMPLATE = PromptTemplate(name="maze", user="{question}")
PROBLEMS = [Problem(f"p{i}", f"maze {i}", "1", 1 + i % 2) for i in range(3)]
SAMPLING = SamplingParams(temperature=0.8, max_tokens=64)
STEPS = {"delimiter": "\n\n"}  # the maze writes blank-line steps


def ctx(engine=None, prm=None, seed=3):
    return SearchContext(engine or MazeEngine(p_good=0.5), prm if prm is not None else MazePRM(), TEMPLATE,
                         SAMPLING, seed)


def answers(cands):
    return [c.text.rsplit("answer is ", 1)[-1].rstrip(".") for c in cands]


# ---------------------------------------------------------------- the registry and parameters

def test_every_strategy_is_registered_with_typed_parameters():
    assert set(STRATEGIES.names()) >= {"repeated_sampling", "beam_search", "dvts", "lookahead", "revision"}
    for name in STRATEGIES.names():
        impl = STRATEGIES.get(name)
        assert impl.name == name and impl().run
        if name == "policy":  # the one strategy with a required parameter: its policy file
            with pytest.raises(SpecError, match="path must name a policy file"):
                impl.Params()
            continue
        assert impl.Params().n >= 1
    with pytest.raises(UnknownNameError, match="Did you mean 'beam_search'"):
        load_strategy("beam_serch")


def test_parameters_are_validated_with_the_parameter_named():
    assert strategy_params("beam_search", {"n": 8, "width": 4}).width == 4
    with pytest.raises(SpecError, match="width must be an integer >= 1 that divides n, got width=3, n=8"):
        strategy_params("beam_search", {"n": 8, "width": 3})
    with pytest.raises(SpecError, match="unknown parameters wdth"):
        strategy_params("dvts", {"wdth": 2})
    with pytest.raises(SpecError, match="aggregation must be one of"):
        strategy_params("beam_search", {"aggregation": "max"})
    with pytest.raises(SpecError, match="lookahead must be an integer >= 1"):
        strategy_params("lookahead", {"lookahead": 0})
    with pytest.raises(SpecError, match="sequential must be an integer >= 1 that divides n"):
        strategy_params("revision", {"n": 4, "sequential": 3})
    with pytest.raises(SpecError, match="n must be an integer >= 1"):
        strategy_params("repeated_sampling", {"n": 0})


# ---------------------------------------------------------------- the strategies on a known maze

def test_beam_search_finds_the_path_greedy_decoding_misses():
    params = strategy_params("beam_search", {"n": 8, "width": 2, "max_steps": 6, "aggregation": "min", **STEPS})
    greedy = SearchContext(MazeEngine(p_good=0.5), MazePRM(), TEMPLATE, SamplingParams(temperature=0.0))
    one = strategy_params("repeated_sampling", {"n": 1, **STEPS})
    assert all(answers(r.candidates) == ["0"] for r in load_strategy("repeated_sampling").run(PROBLEMS, greedy, one))
    for r in load_strategy("beam_search").run(PROBLEMS, ctx(), params):
        best = max(r.candidates, key=lambda c: aggregate(c.scores, "min"))
        assert answers([best]) == ["1"], r.problem_id
        assert len(r.candidates) <= params.n and all(len(c.scores) == len(c.steps) for c in r.candidates)


def test_beam_search_advances_every_problem_in_each_call():
    eng = MazeEngine()
    params = strategy_params("beam_search", {"n": 4, "width": 2, "max_steps": 6, **STEPS})
    list(load_strategy("beam_search").run(PROBLEMS, ctx(eng), params))
    assert len(eng.calls) == 4  # one engine call per step (depth 4), not per problem
    for call in eng.calls:
        assert {r.key[0] for r in call} == {p.id for p in PROBLEMS}
    assert all(r.retain for call in eng.calls for r in call)  # paths to continue keep their KV cache
    short = MazeEngine()
    params = strategy_params("beam_search", {"n": 4, "width": 2, "max_steps": 2, **STEPS})
    list(load_strategy("beam_search").run(PROBLEMS, ctx(short), params))
    assert len(short.calls) == 2 and not any(r.retain for r in short.calls[-1])  # the last step ends paths
    assert all("\n\n" not in r.params.stop for r in short.calls[-1])  # and runs them to the end
    assert all(r.params.max_tokens == params.step_tokens for call in short.calls for r in call)


@pytest.mark.parametrize("name", ["beam_search", "dvts", "lookahead", "revision", "repeated_sampling"])
def test_a_problem_searches_the_same_whatever_shares_its_batch(name):
    """Resumed runs, chunks and Ray actors batch problems differently: a problem's
    candidates must depend on the problem and the seed only."""
    extra = {"revision": {"sequential": 2}, "lookahead": {"width": 2, "max_steps": 3, "lookahead": 1},
             "repeated_sampling": {}}.get(name, {"width": 2, "max_steps": 4})
    params = strategy_params(name, {"n": 4, **STEPS, **extra})
    problems = [Problem(f"p{i}", f"maze {i}", "1") for i in range(4)]
    together = {r.problem_id: r for r in load_strategy(name).run(problems, ctx(), params)}
    alone = list(load_strategy(name).run(problems[2:3], ctx(), params))[0]
    assert [c.text for c in alone.candidates] == [c.text for c in together["p2"].candidates]
    assert [c.scores for c in alone.candidates] == [c.scores for c in together["p2"].candidates]


def test_dvts_keeps_one_path_per_subtree():
    params = strategy_params("dvts", {"n": 16, "width": 4, "max_steps": 6, "aggregation": "min", **STEPS})
    eng = MazeEngine(p_good=0.5)
    results = list(load_strategy("dvts").run(PROBLEMS, ctx(eng), params))
    for r in results:
        assert len(r.candidates) == params.n // params.width
        assert "1" in answers(r.candidates)  # some subtree found the all-good path
    first = [r for r in eng.calls[0] if r.key[0] == "p0"]
    assert len(first) == params.n // params.width and all(r.n == params.width for r in first)
    assert len({s for r in first for s in r.seeds}) == params.n  # each subtree its own seeds


def test_lookahead_ranks_by_the_rollout():
    class FarsightedPRM(MazePRM):
        """A bad step looks better than a good one, but the answer step is scored by the
        share of good steps on the whole path: only a rollout sees that."""

        def score(self, items):
            out = []
            for it in items:
                row = []
                for j in range(it.known, len(it.steps)):
                    if "answer is" in it.steps[j]:
                        path = " ".join(it.steps[:j + 1])
                        row.append(path.count("good") / (path.count("good") + path.count("bad")))
                    else:
                        row.append(0.2 if "good" in it.steps[j] else 0.6)
                out.append(row)
            return out

    problems = [Problem(f"p{i}", f"maze {i}", "1") for i in range(8)]

    def first_steps_good(name, extra):
        params = strategy_params(name, {"n": 4, "width": 2, "max_steps": 3, **STEPS, **extra})
        eng = MazeEngine(depth=3)
        res = list(load_strategy(name).run(problems, ctx(eng, FarsightedPRM(), seed=5), params))
        cands = [c for r in res for c in r.candidates]
        greedy_calls = sum(1 for call in eng.calls if all(r.params.temperature == 0 for r in call))
        return sum("good" in c.text.split("\n\n")[0] for c in cands) / len(cands), greedy_calls

    plain, plain_rollouts = first_steps_good("beam_search", {})
    ahead, ahead_rollouts = first_steps_good("lookahead", {"lookahead": 1})
    assert plain_rollouts == 0 and ahead_rollouts > 0
    # the plain search is lured by the bad steps' scores; the rollout sees past them (over seeds 0-3 and
    # 8 or 32 problems: plain 0.00-0.08, lookahead 0.38-0.67)
    assert plain < 0.15 and ahead > plain + 0.25


def test_revision_shows_each_attempt_back_and_scores_every_attempt():
    eng = MazeEngine()
    params = strategy_params("revision", {"n": 4, "sequential": 2, **STEPS})
    results = list(load_strategy("revision").run(PROBLEMS[:1], ctx(eng), params))
    assert len(eng.calls) == 2 and len(eng.calls[0]) == 2  # 2 chains, 2 rounds
    second = eng.calls[1][0].messages
    assert second[-2]["role"] == "assistant" and second[-1]["content"] == params.instruction
    [r] = results
    assert len(r.candidates) == 4 and all(c.scores for c in r.candidates)


def test_usage_is_charged_to_each_problem():
    class MeteredPRM(MazePRM):
        def __init__(self):
            from testtime.flops import Usage
            self.usage = Usage()

        def score(self, items):
            from testtime.flops import Usage
            for it in items:
                self.usage += Usage.of(10 * len(it.steps), 0, 0)
            return super().score(items)

    params = strategy_params("beam_search", {"n": 4, "width": 2, **STEPS})
    prm = MeteredPRM()
    results = list(load_strategy("beam_search").run(PROBLEMS, ctx(prm=prm), params))
    total_prm = sum(r.usage["prm"].prompt for r in results)
    assert total_prm == pytest.approx(prm.usage.prompt)
    assert all(r.usage["policy"].decode == sum(c.tokens for c in r.candidates) or
               r.usage["policy"].decode >= sum(c.tokens for c in r.candidates) for r in results)
    assert all(r.usage["policy"].sequences > 0 for r in results)


# ---------------------------------------------------------------- strategy runs are runs

class MazeTask:
    name = "maze"
    template = "plain"
    verifier = "math_answer"

    def __init__(self, problems=PROBLEMS):
        self._problems = problems

    @property
    def identity(self):
        return {"name": "maze", "problems": [p.id for p in self._problems]}

    def problems(self, limit=None):
        return self._problems[:limit]


def test_a_beam_search_run_is_stored_graded_and_resumed(tmp_path):
    params = strategy_params("beam_search", {"n": 4, "width": 2, **STEPS})
    with Store(tmp_path) as store:
        res = run_strategy(store, MazeTask(), MazeEngine(p_good=0.5), "beam_search", params, SAMPLING, MazePRM(),
                           seed=3, chunk=2)
        rows = store.samples(res.run_id)
        assert res.drawn == len(rows) > 0 and {s.problem_id for s in rows} == {p.id for p in PROBLEMS}
        scores = store.step_scores(res.run_id, store.scorers(res.run_id)[0])
        assert set(scores) == {(s.problem_id, s.sample_index) for s in rows}
        assert store.finished_problems(res.run_id) == {p.id for p in PROBLEMS}
        spec = store.run_spec(res.run_id).to_dict()
        assert spec["strategy"]["name"] == "beam_search" and spec["strategy"]["width"] == 2
        assert spec["strategy"]["reward_model"] == {"reward_model": "maze"}
        assert grade(store, res.run_id, "math_answer") == len(rows)
        again = run_strategy(store, MazeTask(), MazeEngine(p_good=0.5), "beam_search", params, SAMPLING, MazePRM(),
                             seed=3)
        assert again.run_id == res.run_id and again.drawn == 0  # complete: nothing drawn again
        other = run_strategy(store, MazeTask(), MazeEngine(p_good=0.5), "dvts", params, SAMPLING, MazePRM(), seed=3)
        assert other.run_id != res.run_id  # the strategy is part of the run id


def test_a_failed_search_resumes_at_the_problems_it_had_not_stored(tmp_path):
    params = strategy_params("dvts", {"n": 4, "width": 2, **STEPS})
    problems = [Problem(f"p{i}", f"maze {i}", "1") for i in range(6)]

    class Failing(MazeEngine):
        def generate(self, requests):
            requests = list(requests)
            if any(r.key[0] == "p4" for r in requests):
                raise RuntimeError("the engine died")
            yield from super().generate(requests)

    with Store(tmp_path / "a") as store:
        with pytest.raises(RuntimeError, match="the engine died"):
            run_strategy(store, MazeTask(problems), Failing(p_good=0.5), "dvts", params, SAMPLING, MazePRM(), chunk=2)
        rid = store.latest_run()
        assert store.finished_problems(rid) == {"p0", "p1", "p2", "p3"}
        eng = MazeEngine(p_good=0.5)
        res = run_strategy(store, MazeTask(problems), eng, "dvts", params, SAMPLING, MazePRM(), chunk=2)
        assert res.run_id == rid and {r.key[0] for call in eng.calls for r in call} == {"p4", "p5"}
        resumed = [(s.problem_id, s.sample_index, s.text) for s in store.samples(rid)]
    with Store(tmp_path / "b") as store:
        clean = run_strategy(store, MazeTask(problems), MazeEngine(p_good=0.5), "dvts", params, SAMPLING, MazePRM(),
                             chunk=2)
        assert [(s.problem_id, s.sample_index, s.text) for s in store.samples(clean.run_id)] == resumed


KILL_SCRIPT = """
import sys
sys.path[:0] = [{tests!r}]
from doubles import MazeEngine, MazePRM
from test_strategies import MazeTask, SAMPLING, STEPS
from testtime.runner import run_strategy
from testtime.store import Store
from testtime.strategies import strategy_params
from testtime.tasks.base import Problem

problems = [Problem(f"p{{i}}", f"maze {{i}}", "1") for i in range(12)]
params = strategy_params("beam_search", {{"n": 4, "width": 2, **STEPS}})
with Store({ws!r}) as store:
    run_strategy(store, MazeTask(problems), MazeEngine(p_good=0.5, delay_s={delay}), "beam_search", params, SAMPLING,
                 MazePRM(), chunk=1, progress=lambda n, t: print("stored", flush=True))
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_search_killed_at_random_moments_loses_no_stored_problem(tmp_path):
    import random

    tests = str(Path(__file__).parent)
    ws = tmp_path / "ws"
    rng = random.Random(0)
    partial = 0
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(tests=tests, ws=str(ws), delay=0.02)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        # kill at a random moment after the first problem is stored, however long start-up takes
        assert proc.stdout.readline().strip() == "stored"
        time.sleep(rng.uniform(0.0, 0.8))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        with Store(ws) as store:
            rid = store.latest_run()
            if rid is None:
                continue
            done = store.finished_problems(rid)
            partial += 0 < len(done) < 12
            rows = store.samples(rid)
            # every stored problem is whole: its candidates, their scores and its usage together
            assert {s.problem_id for s in rows} == done
            scored = store.step_scores(rid, store.scorers(rid)[0]) if done else {}
            assert {(s.problem_id, s.sample_index) for s in rows} == set(scored)
    assert partial, "no kill landed mid-run: the test did not test anything"
    out = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(tests=tests, ws=str(ws), delay=0.0)],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("done"), out.stderr
    with Store(ws) as store:
        rid = store.latest_run()
        killed = [(s.problem_id, s.sample_index, s.text) for s in store.samples(rid)]
    clean_ws = tmp_path / "clean"
    subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(tests=tests, ws=str(clean_ws), delay=0.0)],
                   check=True, capture_output=True, timeout=120)
    with Store(clean_ws) as store:
        assert [(s.problem_id, s.sample_index, s.text) for s in store.samples(store.latest_run())] == killed


# ---------------------------------------------------------------- one search spec, and sampling runs scored

def test_the_search_spec_defines_defaults_once_and_round_trips():
    from testtime.searchspec import SearchSpec

    spec = SearchSpec.build("beam_search", {"n": 8, "width": 2}, prm="judge")
    assert spec.params.width == 2 and spec.params.max_steps == strategy_params("beam_search").max_steps
    assert spec.sampling == SamplingParams() and (spec.sampling.top_k, spec.sampling.min_p) == (40, 0.05)
    assert SearchSpec.from_dict(spec.to_dict()) == spec
    assert not spec.independent and SearchSpec().independent
    with pytest.raises(SpecError, match="needs a reward model"):
        SearchSpec.build("dvts", {"n": 4, "width": 2})


def test_a_sampling_run_scored_by_a_reward_model_reports_best_of_n_beside_pass_at_k(tmp_path):
    from testtime.analysis import analyse_run
    from testtime.runner import draw_samples, score_samples

    class AnswerPRM(MazePRM):
        """Sees whether the final answer is right (the last step decides the default 'last')."""

        def score(self, items):
            return [[0.9 if s.endswith("answer is 1.") else 0.1 if "answer is" in s else 0.5
                     for s in it.steps[it.known:]] for it in items]

    problems = [Problem(f"p{i}", f"maze {i}", "1") for i in range(4)]
    with Store(tmp_path) as store:
        res = draw_samples(store, MazeTask(problems), MazeEngine(p_good=0.5), 8, SAMPLING, seed=1)
        assert score_samples(store, res.run_id, AnswerPRM(), "\n\n") == 32
        assert score_samples(store, res.run_id, AnswerPRM(), "\n\n") == 0  # scored once, never again
        grade(store, res.run_id, "math_answer")
        a = analyse_run(store, res.run_id)
    methods = [s.method for s in a.selection]
    assert methods[0] == "maj@k" and methods[1].startswith("best-of-N@k")
    bon = a.selection[1]
    # a PRM that sees the answer: weighted best-of-N finds a correct answer whenever one exists
    assert bon.mean[-1] == pytest.approx(a.table[-1]["pass_at_k"])
    assert all(lo <= m <= hi for m, lo, hi in zip(bon.mean, bon.low, bon.high))
    assert a.selection[0].mean[0] == pytest.approx(a.table[0]["pass_at_k"])  # maj@1 is pass@1
