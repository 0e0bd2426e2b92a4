"""Confidence signals (issue 13): each measure against a hand computation, the
top-k path against the full-distribution path, the DeepConf filter and the
adaptive stopping rules against brute force and known stopping points."""

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from conftest import requires_model
from testtime import SamplingParams, api
from testtime.adaptive import (GRID, Outcome, Replayed, StopRule, Votes, choose, cross_validate, leader_probability,
                               leader_share_above, outcome, replay, stop_point, stored_votes)
from testtime.confidence import from_top_logprobs, pack, row_stats, trace_score, unpack
from testtime.errors import InputError
from testtime.metrics import selection_at_k
from testtime.rewards import ConfidenceScorer, Scoring
from testtime.engines.toy import ToyEngine
from testtime.store import Store

P = np.array([0.5, 0.25, 0.125, 0.125])


def test_token_measures_by_hand():
    logits = np.log(P)[None, :] + 3.0  # a shift changes nothing
    conf, sc, lp = row_stats(logits, [1], k=2)[0]
    assert conf == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2, rel=1e-6)
    # KL(uniform || p) = sum 1/4 log((1/4) / p_j)
    assert sc == pytest.approx(sum(0.25 * math.log(0.25 / p) for p in P), rel=1e-5)
    assert lp == pytest.approx(math.log(0.25), rel=1e-6)
    assert row_stats(np.zeros((1, 8)), [0])[0, 1] == pytest.approx(0.0, abs=1e-6)  # uniform: no certainty


def test_a_servers_top_k_gives_the_same_confidence_and_a_lower_bound_on_self_certainty():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 2000)).astype(np.float32) * 4
    exact = row_stats(logits, [7])[0]
    lp = logits[0] - (logits[0].max() + np.log(np.exp(logits[0] - logits[0].max()).sum()))
    top = np.sort(lp)[::-1][:20]
    conf, sc, chosen = from_top_logprobs(float(lp[7]), list(top), vocab=2000)
    assert conf == pytest.approx(exact[0], rel=1e-4) and chosen == pytest.approx(exact[2], rel=1e-5)
    # the mass outside the top 20 spread evenly: by Jensen a lower bound on self-certainty, whose
    # value is set by the tail a server does not return
    assert 0 < sc <= exact[1]
    peaked = np.concatenate([[10.0], np.full(1999, -2.0)]).astype(np.float32)[None, :]  # a flat tail: exact
    lp2 = peaked[0] - (peaked[0].max() + np.log(np.exp(peaked[0] - peaked[0].max()).sum()))
    approx = from_top_logprobs(float(lp2[0]), list(np.sort(lp2)[::-1][:20]), vocab=2000)[1]
    assert approx == pytest.approx(row_stats(peaked, [0])[0, 1], rel=1e-4)
    assert math.isnan(from_top_logprobs(-1.0, list(top), vocab=None)[1])  # needs the vocabulary size


def test_trace_measures_by_hand():
    stats = np.zeros((5, 3), np.float32)
    stats[:, 0] = [1, 2, 3, 4, 5]
    stats[:, 1] = [0.5, 0.5, 1.0, 1.0, 1.0]
    stats[:, 2] = np.log([0.5, 0.5, 0.5, 0.5, 0.5])
    assert trace_score(stats, "mean") == 3
    assert trace_score(stats, "lowest_group", window=2) == 1.5  # windows 1.5, 2.5, 3.5, 4.5
    assert trace_score(stats, "bottom10", window=2) == 1.5  # the lowest ceil(10% of 4) = 1 window
    assert trace_score(stats, "tail", tail=2) == 4.5
    assert trace_score(stats, "self_certainty") == pytest.approx(0.8)
    assert trace_score(stats, "mean_logprob") == pytest.approx(math.log(0.5))
    assert trace_score(stats, "lowest_group", window=10) == 3  # shorter than a window: one group
    assert np.array_equal(unpack(pack(stats)), stats)
    with pytest.raises(ValueError, match="metric must be one of"):
        trace_score(stats, "median")


def test_confidence_scorer_is_free_and_says_where_it_cannot_go():
    s = ConfidenceScorer(metric="mean_logprob")
    stats = np.array([[1, 1, math.log(0.25)], [1, 1, math.log(0.25)]], np.float32)
    assert s.score_stats(stats) == pytest.approx(0.25)  # geometric-mean token probability
    assert ConfidenceScorer().score_stats(np.zeros((0, 3), np.float32)) is None
    with pytest.raises(InputError, match="text alone has no logits"):
        s.score([Scoring("q", ("a",))])
    assert s.log_weight(0.25) == pytest.approx(math.log(0.25))  # a particle filter's log-potential
    assert ConfidenceScorer(metric="tail").log_weight(7.5) == 7.5
    with pytest.raises(InputError, match="metric must be one of"):
        ConfidenceScorer(metric="loudness")


def test_deepconf_filter_against_brute_force():
    keys = ["a", "b", "a", "c", "b", "a", None]
    ok = [True, False, True, False, False, True, False]
    sc = [0.9, 0.8, 0.1, 0.7, 0.95, 0.2, 0.99]
    for k in (1, 3, 5):
        for eta in (0.1, 0.5, 1.0):
            values = []
            for c in itertools.combinations(range(7), k):
                kept = sorted(c, key=lambda i: (-sc[i], i))[:math.ceil(eta * k)]
                tot = {}
                for i in kept:
                    if keys[i] is not None:
                        tot[keys[i]] = tot.get(keys[i], 0) + sc[i]
                if not tot:
                    values.append(0.0)
                    continue
                win = [a for a, v in tot.items() if v == max(tot.values())]
                values.append(sum(any(ok[j] for j in range(7) if keys[j] == a) for a in win) / len(win))
            assert selection_at_k(keys, ok, k, "filtered", sc, eta=eta).mean == pytest.approx(np.mean(values))


def test_beta_rule_on_known_vote_streams():
    # P(p > 1/2) for p ~ Beta(v + 1, 1) is 1 - 2^-(v+1)
    assert leader_probability(["a"] * 3) == pytest.approx(1 - 0.5 ** 4)
    assert leader_probability(["a", "b"]) == pytest.approx(0.5)
    assert leader_probability([None, None]) == 0.0
    rule = StopRule("beta", threshold=0.95)
    assert stop_point(["a"] * 20, rule, 20) == 4  # 1 - 2^-5 = 0.969 is the first >= 0.95
    assert stop_point(["a", "b"] * 10, rule, 20) == 20  # never decided: the budget
    assert stop_point(["x", None, "a", "a", "a", "a", "a", "a", "a"], rule, 9) == 8
    # a stricter threshold never stops earlier
    for stream in (["a"] * 30, ["a", "b", "a", "a", "c", "a", "a", "a"] * 3):
        assert stop_point(stream, StopRule("beta", 0.99), 24) >= stop_point(stream, rule, 24)


def test_futility_boundary_on_known_vote_streams():
    # P(p >= q) for p ~ Beta(v + 1, m - v + 1) is P(Binomial(m + 1, q) <= v)
    def above(v, m, q):
        return sum(math.comb(m + 1, j) * q ** j * (1 - q) ** (m + 1 - j) for j in range(v + 1))

    assert leader_share_above([None] * 5, 0.3) == pytest.approx(0.7 ** 6)
    assert leader_share_above(["a", "b", None, "a"], 0.3) == pytest.approx(above(2, 4, 0.3))
    efficacy = StopRule("beta", threshold=0.95)
    rule = StopRule("beta", threshold=0.95, futility=0.3)
    # nobody answers: 0.7^(m+1) < 0.1 first at m = 6; without the boundary, the budget
    assert stop_point([None] * 20, rule, 20) == 6 and stop_point([None] * 20, efficacy, 20) == 20
    # every answer different: (0.7^(m+1) + (m+1) 0.3 0.7^m) is 0.113 at m = 10, 0.085 at m = 11
    spread = [f"a{i}" for i in range(20)]
    assert above(1, 10, 0.3) > 0.1 > above(1, 11, 0.3)
    assert stop_point(spread, rule, 20) == 11 and stop_point(spread, efficacy, 20) == 20
    # a decided vote still stops where the Beta rule stops it
    assert stop_point(["a"] * 20, rule, 20) == 4
    # the window rule takes the boundary too
    assert stop_point(spread, StopRule("window", window=4, futility=0.3), 20) == 11
    # a higher share, or a surer boundary, never stops later; a stricter probability never sooner
    for stream in (spread, ["a", "b", "c", "a", None, "d", "b", "e"] * 3, ["a", "b"] * 12):
        at = stop_point(stream, rule, 24)
        assert stop_point(stream, StopRule("beta", 0.95, futility=0.4), 24) <= at
        assert stop_point(stream, StopRule("beta", 0.95, futility=0.3, futility_prob=0.02), 24) >= at
    for bad in ({"futility": 1.0}, {"futility": -0.1}, {"futility": 0.3, "futility_prob": 0.5}):
        with pytest.raises(ValueError, match="futility"):
            StopRule("beta", **bad)


def test_window_rule_stops_after_the_first_unanimous_window():
    rule = StopRule("window", window=4)
    assert stop_point(["a", "b", "a", "a", "a", "a", "a", "a"], rule, 8) == 8
    assert stop_point(["a", "a", "a", "a", "b"], rule, 8) == 4
    assert stop_point([None] * 8, rule, 8) == 8  # no answers never decide
    with pytest.raises(ValueError):
        StopRule("dice")


def test_replay_on_a_stored_run(workspace):
    run = api.sample("arithmetic", n=12, limit=6, engine="toy", task_args={"levels": [1]}, workspace=workspace,
                     engine_args={"answer_range": 2})  # two answers: votes decide fast
    with Store(workspace) as store:
        got = replay(store, run.run_id, StopRule("beta", 0.9))
        never = replay(store, run.run_id, StopRule("beta", 0.9, min_samples=12))
        tokens = {(s.problem_id, s.sample_index): s.completion_tokens for s in store.samples(run.run_id)}
    assert len(got) == 6 and all(r.samples_all == 12 for r in got)
    assert any(r.samples < 12 for r in got)
    for r in got:
        assert r.tokens == sum(tokens[r.problem_id, i] for i in range(r.samples))
    # forced to read everything, adaptive stopping is majority over all n
    assert all(r.samples == 12 and r.correct == r.correct_all and r.tokens == r.tokens_all for r in never)


class StatsEngine:
    """The toy engine, with per-token stats as llama.cpp records them."""

    name = "stats"

    def __init__(self):
        from testtime.engines.toy import ToyEngine

        self.inner = ToyEngine()

    def identity(self):
        return {"engine": "stats"}

    def generate(self, requests):
        for c in self.inner.generate(requests):
            rng = np.random.default_rng(c.seed % 2 ** 32)
            c.token_stats = rng.uniform(0.5, 5, size=(max(1, c.completion_tokens), 3)).astype(np.float32)
            yield c

    def close(self):
        pass


def test_sampling_stores_token_stats_and_confidence_scores_select(workspace):
    run = api.sample("arithmetic", n=6, limit=4, engine=StatsEngine(), task_args={"levels": [1]},
                     workspace=workspace, prm="confidence", prm_args={"metric": "mean"})
    with Store(workspace) as store:
        stats = store.token_stats(run.run_id)
        scorers = store.scorers(run.run_id)
        scores = store.step_scores(run.run_id, scorers[0])
    assert len(stats) == 24 and scorers[0].startswith("confidence:")
    assert all(scores[key] == [pytest.approx(float(stats[key][:, 0].mean()), rel=1e-6)] for key in stats)
    methods = [c.method for c in run.analysis().selection]
    assert methods[0] == "maj@k" and any("top 10% voting" in m for m in methods)
    # a run whose engine recorded nothing cannot be scored by confidence: said, not silently empty
    with pytest.raises(InputError, match="has no token statistics"):
        api.sample("arithmetic", n=2, limit=2, engine="toy", workspace=workspace, prm="confidence")


@requires_model
@pytest.mark.model
def test_llamacpp_records_stats_that_agree_with_its_logprobs():
    from testtime.engines.base import Request
    from testtime.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(slots=2, seq_ctx=256)
    try:
        params = SamplingParams(max_tokens=8, logprobs=3)
        out = list(eng.generate([Request(key="k", seeds=(1, 2), params=params, prompt="The sky is")]))
    finally:
        eng.close()
    for c in out:
        assert c.token_stats.shape == (len(c.token_ids), 3)
        assert np.allclose(c.token_stats[:, 2], [t.logprob for t in c.logprobs], atol=1e-3)
        tops = [from_top_logprobs(t.logprob, list(t.top.values()), None, k=3)[0] for t in c.logprobs]
        assert np.all(c.token_stats[:, 0] >= np.array(tops) - 1e-3)  # the top 20 reach lower than the top 3


def test_adaptive_command_replays_a_stored_run(workspace):
    from typer.testing import CliRunner

    from testtime.cli import app

    api.sample("arithmetic", n=8, limit=4, engine="toy", task_args={"levels": [1]}, workspace=workspace,
               engine_args={"answer_range": 2})
    got = CliRunner().invoke(app, ["adaptive", "--threshold", "0.8", "-w", str(workspace)], env={"COLUMNS": "200"})
    assert got.exit_code == 0, got.output
    assert "4 problems, rule beta" in got.output and "instead of 8.0" in got.output
    bad = CliRunner().invoke(app, ["adaptive", "--threshold", "1.5", "-w", str(workspace)])
    assert bad.exit_code == 2 and "threshold must be in [0.5, 1)" in bad.output
    bad = CliRunner().invoke(app, ["adaptive", "--rule", "coin", "-w", str(workspace)])
    assert bad.exit_code == 2 and "stopping rule must be one of beta, window" in bad.output
    bad = CliRunner().invoke(app, ["adaptive", "--futility", "1.5", "-w", str(workspace)])
    assert bad.exit_code == 2 and "futility must be in [0, 1)" in bad.output
    flat = CliRunner().invoke(app, ["adaptive", "--threshold", "0.99", "--futility", "0.6", "-w", str(workspace)],
                              env={"COLUMNS": "200"})
    assert flat.exit_code == 0, flat.output
    assert "rule beta with futility 0.6" in flat.output


def test_stop_point_counted_as_votes_arrive_is_the_first_prefix_the_rule_decides():
    rng = np.random.default_rng(3)
    rules = list(GRID) + [StopRule("beta", 0.9, futility=0.3, futility_prob=0.05, min_samples=5),
                          StopRule("window", window=3, futility=0.35)]
    for _ in range(60):
        k = int(rng.integers(1, 6))
        stream = [None if x == k else f"a{x}" for x in rng.integers(0, k + 1, size=int(rng.integers(1, 40)))]
        for rule in rules:
            n = int(rng.integers(1, 41))
            first = next((m for m in range(1, min(n, len(stream)) + 1) if reference_decided(rule, stream[:m])),
                         min(n, len(stream)))
            assert stop_point(stream, rule, n) == first, (stream, rule, n)
            assert rule.decided(stream[:first]) or first == min(n, len(stream))


def reference_decided(rule, prefix):
    """The rule as the module's docstring states it, on the whole prefix, from the
    public posterior functions (hand-checked above), not from `StopRule.decided_at`."""
    m = len(prefix)
    if m < rule.min_samples:
        return False
    if rule.futility and leader_share_above(prefix, rule.futility) < rule.futility_prob:
        return True
    if rule.rule == "window":
        window = prefix[m - rule.window:] if m % rule.window == 0 else []
        return bool(window) and window[0] is not None and len(set(window)) == 1
    return leader_probability(prefix) >= rule.threshold


def _row(pid, correct, correct_all, samples=4, n=16):
    return Replayed(pid, samples, 10 * samples, correct, n, 10 * n, correct_all)


def test_choose_by_each_stated_criterion():
    cheap_lossy = Outcome(100, 100, 1000, 20, 22, 1, 3)  # 10x, -0.02
    mid = Outcome(100, 250, 1000, 22, 22, 2, 2)  # 4x, 0
    safe = Outcome(100, 800, 1000, 23, 22, 1, 0)  # 1.25x, +0.01
    results = {"cheap": cheap_lossy, "mid": mid, "safe": safe}
    assert outcome([_row("a", True, False), _row("b", False, True), _row("c", True, True)]) == \
        Outcome(3, 120, 480, 2, 2, 1, 1)
    assert choose(results) == "mid"  # the cheapest within 0.005
    assert choose(results, tolerance=0.03) == "cheap"
    assert choose(results, min_ratio=3) == "mid"  # the most accurate at >= 3x
    assert choose(results, min_ratio=5) == "cheap"
    assert choose(results, min_ratio=20) is None
    assert choose({"cheap": cheap_lossy}) is None


def test_cross_validation_chooses_on_the_other_runs_and_reports_the_held_out_one():
    # Two answers; the right one leads 3 to 1 overall but trails in the first samples
    # in run "c" only: a fast rule is free on runs a and b and costs every problem of c.
    good = ("r", "r", "r", "w") * 4
    late = ("w", "w", "r", "r", "r", "r", "r", "r", "r", "w", "r", "r", "r", "r", "w", "r")
    runs = {name: [Votes(f"{name}{i}", stream, (10,) * 16, frozenset({"r"})) for i in range(5)]
            for name, stream in (("a", good), ("b", good), ("c", late))}
    fast, slow = StopRule("beta", 0.6), StopRule("beta", 0.99)
    folds = {f.held_out: f for f in cross_validate(runs, [fast, slow])}
    # held out a or b: the other runs include c, where the fast rule loses, so the slow one is chosen
    assert folds["a"].rule == slow and folds["b"].rule == slow
    assert folds["a"].fit.lost == 0 and all(r.correct for r in folds["a"].held)
    # held out c: chosen on a and b, where the fast rule costs nothing, and it loses all of c
    assert folds["c"].rule == fast and folds["c"].fit.delta == 0
    held = outcome(folds["c"].held)
    assert held.lost == 5 and held.won == 0 and held.delta == -1.0 and held.ratio > 1
    with pytest.raises(ValueError, match="at least two runs"):
        cross_validate({"a": runs["a"]}, [fast])


def test_adaptive_cv_command_on_stored_runs(workspace):
    from typer.testing import CliRunner

    from testtime.cli import app

    ids = [api.sample("arithmetic", n=8, limit=4, engine="toy", task_args={"levels": [1], "seed": s},
                      workspace=workspace, engine_args={"answer_range": 2}).run_id for s in (1, 2, 3)]

    def cv(*args):
        return CliRunner().invoke(app, ["adaptive-cv", *args, "-w", str(workspace)], env={"COLUMNS": "200"})

    got = cv(*ids)
    assert got.exit_code == 0, got.output
    assert "among 42 settings" in got.output and "held out, pooled over 12 problems" in got.output
    assert "chosen on all runs: " in got.output and "more than one run" not in got.output
    r = api.adaptive_cv(ids, thresholds=[0.8, 0.9], futilities=[0, 0.3], workspace=workspace, min_ratio=1.0)
    assert r["rules"] == 4 and len(r["folds"]) == 3 and r["pooled"].problems == 12
    with Store(workspace) as store:
        votes = {rid: stored_votes(store, rid) for rid in ids}
    grid = [StopRule("beta", t, futility=f) for t in (0.8, 0.9) for f in (0, 0.3)]
    for fold in r["folds"]:  # chosen on the other two runs only, and replayed on the held-out one
        others = {rule: outcome([v.replay(rule) for rid in ids if rid != fold.held_out for v in votes[rid]])
                  for rule in grid}
        assert fold.rule == choose(others, min_ratio=1.0) and fold.fit == others[fold.rule]
        assert fold.held == [v.replay(fold.rule) for v in votes[fold.held_out]]
    # the same problems in two runs: said, since they are not held out
    again = api.sample("arithmetic", n=8, limit=4, engine="toy", task_args={"levels": [1], "seed": 1},
                       workspace=workspace, engine_args={"answer_range": 3}).run_id
    assert cv(ids[0], again).output.count("4 problems appear in more than one run") == 1
    third = api.sample("arithmetic", n=8, limit=4, engine="toy", task_args={"levels": [1], "seed": 1},
                       workspace=workspace, engine_args={"answer_range": 4}).run_id
    assert "4 problems appear in more than one run" in cv(ids[0], again, third).output  # each counted once
    for args, message in (((ids[0],), "at least two runs"), ((ids[0], ids[0]), "is given twice"),
                          ((*ids, "--tolerance", "-1"), "tolerance must be >= 0"),
                          ((*ids, "--threshold", "1.5"), "threshold must be in [0.5, 1)"),
                          ((*ids, "--min-ratio", "0"), "min_ratio must be > 0"), ((*ids, "-n", "0"), "n must be >= 1"),
                          ((*ids, "--window", "3", "--futility", "0.3"), "give at least one --threshold")):
        bad = cv(*args)
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)


@pytest.mark.parametrize("rule", [{"rule": "beta", "threshold": 0.9, "round": 1}, {"rule": "window", "window": 3,
                                                                                  "round": 1},
                                  {"rule": "beta", "threshold": 0.9, "round": 4},
                                  {"rule": "beta", "threshold": 0.99, "futility": 0.6, "round": 2}])
def test_live_adaptive_consistency_keeps_what_replay_predicts(workspace, rule):
    from testtime.adaptive import StopRule

    base = dict(engine="toy", task_args={"levels": [1]}, workspace=workspace, engine_args={"answer_range": 3})
    sampled = api.sample("arithmetic", n=12, limit=6, **base)
    live = api.sample("arithmetic", n=12, limit=6, strategy="adaptive_consistency", strategy_args=rule, **base)
    stop = StopRule(**{k: v for k, v in rule.items() if k != "round"})
    with Store(workspace) as store:
        replayed = {r.problem_id: r for r in replay(store, sampled.run_id, stop, 12)}
        kept = {}
        for s in store.samples(live.run_id):
            kept.setdefault(s.problem_id, []).append(s)
        ref = {(s.problem_id, s.sample_index): s.text for s in store.samples(sampled.run_id)}
        decisions = store.decisions(live.run_id)
    assert set(kept) == set(replayed)
    for pid, rows in kept.items():
        # whatever the round: the toy engine checks for cancellation before each sample, so
        # it never starts one past the stop
        assert len(rows) == replayed[pid].samples == decisions[pid]["stopped_at"] == decisions[pid]["drawn"]
        assert all(s.text == ref[pid, s.sample_index] for s in rows)  # the same seeds, the same samples
    assert any(r.samples < 12 for r in replayed.values())
    if rule.get("futility"):  # the boundary fired somewhere the Beta rule alone would have gone on
        with Store(workspace) as store:
            alone = {r.problem_id: r.samples for r in replay(store, sampled.run_id, replace(stop, futility=0.0), 12)}
        assert any(r.samples < alone[pid] for pid, r in replayed.items())


class DeafToy(ToyEngine):
    """A toy engine that ignores cancellation, as an engine that cannot stop samples does."""

    def generate(self, requests):
        for r in requests:
            yield from super().generate([replace(r, cancelled=None)])


def test_live_adaptive_with_an_engine_that_cannot_cancel_draws_whole_rounds_but_keeps_to_the_stop(workspace):
    from testtime.runner import run_strategy
    from testtime.strategies import strategy_params
    from testtime.tasks import load_task

    task = load_task("arithmetic", levels=[1])
    with Store(workspace) as store:
        res = run_strategy(store, task, DeafToy(answer_range=2), "adaptive_consistency",
                           strategy_params("adaptive_consistency", {"n": 16, "threshold": 0.8, "round": 4}),
                           SamplingParams(), limit=6)
        d = store.decisions(res.run_id)
        counts = {}
        for s in store.samples(res.run_id):
            counts[s.problem_id] = counts.get(s.problem_id, 0) + 1
        usage = store.usage(res.run_id)
    assert len(d) == 6
    assert all(counts[pid] == v["stopped_at"] <= v["drawn"] <= 16 and v["drawn"] % 4 == 0 and v["cancelled"] == 0
               for pid, v in d.items())
    assert any(v["drawn"] > v["stopped_at"] for v in d.values())
    # usage is every token generated, the samples drawn past the stop included
    assert all(usage[pid]["sequences"] == v["drawn"] for pid, v in d.items())
    with pytest.raises(Exception, match="round must be an integer >= 1"):
        api.sample("arithmetic", n=4, limit=1, strategy="adaptive_consistency", strategy_args={"round": 0},
                   engine="toy", workspace=workspace)


class LookaheadToy(ToyEngine):
    """A toy engine that reads ahead as the llama.cpp engine does: it reads requests while
    fewer than `depth` samples are out, each started when its request is read; they
    finish in the order read (or the newest first, `lifo`), and one whose request is
    cancelled by then comes back cancelled part-way (one token generated). A None in the
    stream: read no further until one finishes."""

    def __init__(self, depth: int = 24, lifo: bool = False, **kw):
        super().__init__(**kw)
        self.depth, self.lifo = depth, lifo

    def generate(self, requests):
        from collections import deque

        from testtime.engines.base import StreamStalled, is_cancelled

        source, out, end, exhausted = iter(requests), deque(), object(), False
        while True:
            while not exhausted and len(out) < self.depth:
                req = next(source, end)
                if req is end:
                    exhausted = True
                elif req is None:
                    break
                else:
                    out.extend((req, c) for c in super().generate([replace(req, cancelled=None)]))
            if not out:
                if exhausted:
                    return
                raise StreamStalled("the stream waits, but nothing is out")
            req, c = out.pop() if self.lifo else out.popleft()
            yield replace(c, text="", token_ids=[0], finish_reason="cancelled") if is_cancelled(req) else c


@pytest.mark.parametrize("ahead,lifo", [(0, False), (2, False), (4, False), (0, True), (4, True)])
def test_live_adaptive_limits_the_samples_out_per_problem_and_keeps_what_replay_predicts(workspace, ahead, lifo):
    base = dict(task_args={"levels": [1]}, workspace=workspace)
    sampled = api.sample("arithmetic", n=24, limit=8, engine="toy", engine_args={"answer_range": 3}, **base)
    live = api.sample("arithmetic", n=24, limit=8, engine=LookaheadToy(answer_range=3, lifo=lifo),
                      strategy="adaptive_consistency",
                      strategy_args={"threshold": 0.8, "round": 2, "max_ahead": ahead}, **base)
    with Store(workspace) as store:
        replayed = {r.problem_id: r for r in replay(store, sampled.run_id, StopRule("beta", 0.8), 24)}
        d = store.decisions(live.run_id)
        kept = {}
        for s in store.samples(live.run_id):
            kept.setdefault(s.problem_id, []).append(s.sample_index)
        usage = store.usage(live.run_id)
    assert len(d) == 8 and any(v["stopped_at"] < 24 for v in d.values())
    for pid, v in d.items():  # the samples kept are the replay's, whatever was drawn past the stop
        assert sorted(kept[pid]) == list(range(replayed[pid].samples)) and v["stopped_at"] == replayed[pid].samples
        assert usage[pid]["sequences"] == v["drawn"]  # usage holds every sample drawn, the wasted ones too
    past = [v["drawn"] - v["stopped_at"] for v in d.values()]
    if ahead:
        # at the stop, at most max_ahead samples were out, one of them the sample that decided it
        assert max(past) <= ahead - 1
    else:  # no limit: the engine's whole read-ahead goes to the few problems still open
        assert max(past) > 4


class DroppingToy(LookaheadToy):
    """Cancels every sample of one problem from outside, as a server does once the client
    that asked for it is gone; counts the requests read per problem."""

    def __init__(self, drop: str, **kw):
        super().__init__(**kw)
        self.drop, self.read = drop, []

    def generate(self, requests):
        def reading():
            for r in requests:
                self.read.append(None if r is None else r.key[0])
                yield r

        for c in super().generate(reading()):
            yield replace(c, text="", token_ids=[], finish_reason="cancelled") if c.key[0] == self.drop else c


@pytest.mark.parametrize("ahead", [0, 2])
def test_a_problem_cancelled_from_outside_is_sent_nothing_more_and_the_rest_go_on(workspace, ahead):
    from testtime.runner import run_strategy
    from testtime.strategies import strategy_params
    from testtime.tasks import load_task

    task = load_task("arithmetic", levels=[1])
    engine = DroppingToy(task.problems(1)[0].id, answer_range=3)
    with Store(workspace) as store:  # no StreamStalled: the stream ends once the rest are decided
        res = run_strategy(store, task, engine, "adaptive_consistency",
                           strategy_params("adaptive_consistency", {"n": 24, "threshold": 0.8, "max_ahead": ahead}),
                           SamplingParams(), limit=4)
        decided = store.decisions(res.run_id)
    assert set(decided) == {p.id for p in task.problems(4)[1:]}
    # nothing after its first sample came back: by then the read-ahead (12 requests, 3 rounds of
    # the 4 problems) held 3 of its requests; 1 with at most 2 of its samples out
    assert engine.read.count(engine.drop) == (1 if ahead else 3)


def test_max_ahead_below_round_is_refused_and_no_limit_keeps_the_run_id(workspace):
    from testtime.strategies import strategy_params

    params = strategy_params("adaptive_consistency", {"threshold": 0.8})
    assert "max_ahead" not in params.to_dict()  # runs stored before the setting keep their ids
    limited = strategy_params("adaptive_consistency", {"threshold": 0.8, "max_ahead": 4})
    assert limited.to_dict()["max_ahead"] == 4
    assert type(params).from_dict(params.to_dict()) == params and type(params).from_dict(limited.to_dict()) == limited
    with pytest.raises(Exception, match=r"max_ahead must be 0 \(no limit\) or an integer >= round \(2\)"):
        api.sample("arithmetic", n=4, limit=1, strategy="adaptive_consistency", strategy_args={"max_ahead": 1},
                   engine="toy", workspace=workspace)


class ConfidentToy(StatsEngine):
    """A toy engine that sees 'logits': each sample's token confidence is constant, set by
    its seed (low for a third of the seeds), and it honours `stop_below` as llama.cpp does."""

    name = "confident_toy"
    stops_on_confidence = True
    token_stats = True

    def __init__(self):
        super().__init__()
        self.stopped = 0

    def identity(self):
        return {"engine": "confident_toy"}

    def generate(self, requests):
        for c in self.inner.generate(requests):
            c.token_stats = np.full((40, 3), 1.0 if c.seed % 3 == 0 else 3.0, np.float32)
            c.token_ids = list(range(40))
            yield c


class StoppingToy(ConfidentToy):
    def generate(self, requests):
        by_key = {}

        def tap():  # lazily, as an engine reads the stream
            for r in requests:
                if r is not None:
                    by_key[r.key] = r
                yield r

        for c in super().generate(tap()):
            stop = by_key[c.key].stop_below
            if stop is not None and float(c.token_stats[0, 0]) < stop[0]:
                c.token_stats = c.token_stats[:stop[1]]
                c.token_ids = c.token_ids[:stop[1]]
                c.finish_reason = "low_confidence"
                self.stopped += 1
            yield c


def test_deepconf_online_stops_unsure_samples_and_keeps_the_rest(workspace):
    eng = StoppingToy()
    run = api.sample("arithmetic", n=12, limit=4, engine=eng, task_args={"levels": [1]}, workspace=workspace,
                     strategy="deepconf_online", strategy_args={"warmup": 6, "eta": 0.5, "window": 8,
                                                                "consensus": 1.0})
    with Store(workspace) as store:
        d = store.decisions(run.run_id)
        samples = store.samples(run.run_id)
        usage = store.usage(run.run_id)
        scorers = store.scorers(run.run_id)
    assert eng.stopped > 0 and scorers == ["confidence:lowest_group"]
    for pid, v in d.items():
        assert v["drawn"] == 12 and v["kept"] + v["stopped_early"] == 12
        kept = [s for s in samples if s.problem_id == pid]
        assert len(kept) == v["kept"] and all(s.finish_reason != "low_confidence" for s in kept)
        # the stopped samples' tokens are paid for: 8 each, against 40 for a finished one
        assert usage[pid]["decode"] == 40 * v["kept"] + 8 * v["stopped_early"]
    summary = api.summary(run.run_id, workspace=workspace)  # votes weighted by the kept samples' confidence
    assert summary["selection"] == "weighted best-of-N" and summary["scorer"] == "confidence:lowest_group"
    assert summary["tokens_per_problem"] == sum(u["decode"] for u in usage.values()) / len(usage)


def test_deepconf_online_refuses_an_engine_that_cannot_stop(workspace):
    with pytest.raises(Exception, match="needs an engine that sees the logits"):
        api.sample("arithmetic", n=4, limit=1, engine="toy", workspace=workspace, strategy="deepconf_online")


@requires_model
@pytest.mark.model
def test_llamacpp_stops_a_sample_forced_to_low_confidence_and_reuses_its_slot():
    from testtime.engines.base import Request
    from testtime.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(slots=1, seq_ctx=256)
    try:
        params = SamplingParams(max_tokens=24)
        low = Request(key="low", seeds=(1,), params=params, prompt="Count: one, two,", stop_below=(1e9, 3))
        free = Request(key="free", seeds=(2,), params=params, prompt="Count: one, two,")
        out = {c.key: c for c in eng.generate([low, free])}
    finally:
        eng.close()
    assert out["low"].finish_reason == "low_confidence" and len(out["low"].token_ids) == 3
    assert out["free"].finish_reason in ("stop", "length") and len(out["free"].token_ids) > 3


@requires_model
@pytest.mark.model
def test_llamacpp_cancels_a_requests_queued_and_running_samples_and_reuses_the_slots():
    from testtime.engines.base import Request
    from testtime.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(slots=2, seq_ctx=256)
    flag = {"b_done": False}
    long, short = SamplingParams(max_tokens=40), SamplingParams(max_tokens=3)

    def stream():
        yield Request(key="b", seeds=(4,), params=short, prompt="Count: one, two,")
        yield Request(key="a", seeds=(1, 2, 3), params=long, prompt="Count: one, two,",
                      cancelled=lambda: flag["b_done"])
        yield Request(key="c", seeds=(5,), params=long, prompt="Say hello.")

    out = {}
    try:
        for c in eng.generate(stream()):
            out[(c.key, c.index)] = c
            flag["b_done"] |= c.key == "b"
    finally:
        eng.close()
    assert out["b", 0].finish_reason == "length"
    running = out["a", 0]  # started beside b; stopped at the step after b finished
    assert running.finish_reason == "cancelled" and 0 < len(running.token_ids) < 40 and running.text
    for i in (1, 2):  # queued behind it: never started
        queued = out["a", i]
        assert queued.finish_reason == "cancelled" and queued.token_ids == [] and queued.prompt_tokens == 0
    assert out["c", 0].finish_reason in ("stop", "length") and len(out["c", 0].token_ids) > 0
    assert len(out) == 5


def _waiting_stream(seen, make):
    """Request a; then "wait" until a's sample is back; then request b."""
    yield make("a")
    while "a" not in seen:
        yield None
    yield make("b")


def test_a_stream_that_waits_gets_its_next_request_in_after_a_result_and_a_stall_is_an_error():
    from testtime.engines.base import Request, StreamStalled

    make = lambda key: Request(key=key, seeds=(1,), params=SamplingParams(max_tokens=8), prompt="Count: one,")
    seen = set()
    out = []
    for c in ToyEngine().generate(_waiting_stream(seen, make)):
        seen.add(c.key)
        out.append(c.key)
    assert out == ["a", "b"]
    with pytest.raises(StreamStalled):
        list(ToyEngine().generate(iter([None, None])))


@requires_model
@pytest.mark.model
def test_llamacpp_reads_a_stream_that_waits_and_refuses_one_that_stalls():
    from testtime.engines.base import Request, StreamStalled
    from testtime.engines.llamacpp import LlamaCppEngine

    make = lambda key: Request(key=key, seeds=(1,), params=SamplingParams(max_tokens=8), prompt="Count: one,")
    eng = LlamaCppEngine(slots=2, seq_ctx=256)
    try:
        seen = set()
        for c in eng.generate(_waiting_stream(seen, make)):
            seen.add(c.key)
        assert seen == {"a", "b"}
        with pytest.raises(StreamStalled):
            list(eng.generate(iter([None])))
    finally:
        eng.close()
