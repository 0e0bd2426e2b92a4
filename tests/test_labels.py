"""Monte Carlo step labels (issue 14): on the maze, where each step's true success
rate is known, the soft labels converge to it; labelling resumes, never stores
half a sample, and balances verified and failed samples when asked."""

from __future__ import annotations

import numpy as np
import pytest

from doubles import MazeEngine
from testtime.errors import InputError
from testtime.labels import LabelConfig, hard_labels, label_run, select_samples, soft_labels
from testtime.rewards.base import split_steps
from testtime.runner import draw_samples
from testtime.spec import SamplingParams
from testtime.store import Store
from testtime.tasks.base import Problem, Task
from testtime.verifiers.math_answer import MathAnswerVerifier

DEPTH, P_GOOD = 4, 0.6
PROBLEMS = [Problem(f"p{i}", f"maze {i}", "1") for i in range(6)]
TASK = Task("maze", {"name": "maze"}, lambda limit: PROBLEMS[:limit], "plain", "math_answer")


def true_rate(steps: list[str], k: int) -> float:
    """P(a completion of steps[:k+1] reaches answer 1) in the maze: every step so far
    good, and each of the DEPTH-(k+1) steps still to come good with P_GOOD."""
    if not all("good" in s for s in steps[:k + 1]):
        return 0.0
    return P_GOOD ** (DEPTH - (k + 1))


def _run(store, n=8, engine=None):
    engine = engine or MazeEngine(depth=DEPTH, p_good=P_GOOD)
    return draw_samples(store, TASK, engine, n, SamplingParams(temperature=1.0, max_tokens=64), template="plain")


def test_soft_labels_converge_to_each_steps_true_success_rate(tmp_path):
    with Store(tmp_path) as store:
        rid = _run(store).run_id
        cfg = LabelConfig(m=400, delimiter="\n\n")
        res = label_run(store, rid, MazeEngine(depth=DEPTH, p_good=P_GOOD), MathAnswerVerifier(), cfg)
        labels = store.step_labels(rid, res.labeler)
        assert res.labelled == len(labels) == 6 * 8
        texts = {(s.problem_id, s.sample_index): s.text for s in store.samples(rid)}
        errors, checked = [], 0
        for key, rows in labels.items():
            steps = split_steps(texts[key], "\n\n")
            assert len(rows) == len(steps) == DEPTH + 1
            soft = soft_labels(rows)
            for k in range(DEPTH):
                errors.append(soft[k] - true_rate(steps, k))
                checked += true_rate(steps, k) > 0
            # the answer step: the sample's own verdict
            assert soft[DEPTH] == float(steps[-1] == "The answer is 1.")
            assert hard_labels(rows) == [v > 0 for v in soft]
        errors = np.abs(errors)
        assert checked > 20 and errors.max() < 0.1  # 400 rollouts: a binomial sd of at most 0.025
        assert res.rollouts == 6 * 8 * DEPTH * 400
        assert res.usage.decode > 0 and store.label_usage(rid, res.labeler)["decode"] == res.usage.decode


def test_labelling_resumes_and_a_killed_chunk_stores_nothing_partial(tmp_path):
    class Dies(MazeEngine):
        def __init__(self, after):
            super().__init__(depth=DEPTH, p_good=P_GOOD)
            self.after = after

        def generate(self, requests):
            for i, c in enumerate(super().generate(requests)):
                if i == self.after:
                    raise KeyboardInterrupt  # as a kill between two rollouts
                yield c

    cfg = LabelConfig(m=3, delimiter="\n\n")
    with Store(tmp_path) as store:
        rid = _run(store, n=4).run_id
        with pytest.raises(KeyboardInterrupt):
            label_run(store, rid, Dies(after=40), MathAnswerVerifier(), cfg, chunk=8)
        first = store.step_labels(rid, next(iter(store.labelers(rid))))
        # whole samples only: each stored sample has every step, each with m rollouts
        assert 0 < len(first) < 24
        assert all(len(v) == DEPTH + 1 and all(r == 3 for r, _ in v) for v in first.values())
        eng = MazeEngine(depth=DEPTH, p_good=P_GOOD)
        res = label_run(store, rid, eng, MathAnswerVerifier(), cfg, chunk=8)
        assert res.labelled == 24 - len(first) and res.total == 24
        keys = {r.key[0] for call in eng.calls for r in call}
        assert not keys & set(first)  # stored samples were not rolled out again
        again = label_run(store, rid, eng, MathAnswerVerifier(), cfg)
        assert again.labelled == 0 and again.total == 24
        # other settings are another labeler, beside the first
        other = label_run(store, rid, eng, MathAnswerVerifier(), LabelConfig(m=2, delimiter="\n\n"))
        assert other.labeler != res.labeler and len(store.labelers(rid)) == 2


def test_balanced_selection_takes_as_many_verified_as_failed_samples(tmp_path):
    with Store(tmp_path) as store:
        rid = _run(store, n=8).run_id
        res = label_run(store, rid, MazeEngine(depth=DEPTH, p_good=P_GOOD), MathAnswerVerifier(),
                        LabelConfig(m=1, delimiter="\n\n", select="balanced"))
        verdicts = {(r[0], r[1]): r[2] for r in store.db.execute(
            "SELECT problem_id, sample_index, verdict FROM verdicts WHERE run_id = ?", (rid,))}
        labelled = store.step_labels(rid, res.labeler)
        good = sum(verdicts[k] == "pass" for k in labelled)
        assert good == len(labelled) - good > 0
        assert good == min(sum(v == "pass" for v in verdicts.values()), sum(v != "pass" for v in verdicts.values()))
        capped = select_samples(store.samples(rid), verdicts, LabelConfig(select="balanced", max_samples=4))
        assert sum(verdicts[s.problem_id, s.sample_index] == "pass" for s in capped) == 2 and len(capped) == 4


def test_bad_settings_are_named(tmp_path):
    with Store(tmp_path) as store:
        rid = _run(store, n=2).run_id
        for cfg, word in ((LabelConfig(m=0), r"m \(rollouts"), (LabelConfig(delimiter=""), "delimiter"),
                          (LabelConfig(select="most"), "select"), (LabelConfig(max_samples=0), "max_samples")):
            with pytest.raises(InputError, match=word):
                label_run(store, rid, MazeEngine(), MathAnswerVerifier(), cfg)


def test_prm_and_orm_exports_parse_back_field_by_field(tmp_path):
    import json

    from testtime import api

    ws = tmp_path / "ws"
    with Store(ws) as store:
        rid = _run(store, n=3).run_id
        res = label_run(store, rid, MazeEngine(depth=DEPTH, p_good=P_GOOD), MathAnswerVerifier(),
                        LabelConfig(m=5, delimiter="\n\n"))
        labels = store.step_labels(rid, res.labeler)
        samples = {(s.problem_id, s.sample_index): s for s in store.samples(rid)}
    path = api.export(rid, tmp_path / "prm.jsonl", "prm", ws)
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == len(labels) == 18
    for r in rows:
        key = (r["metadata"]["problem_id"], r["metadata"]["sample_index"])
        assert set(r) == {"prompt", "completions", "labels", "metadata"}
        assert r["prompt"] == f"maze {key[0][1:]}"
        assert r["completions"] == split_steps(samples[key].text, "\n\n")
        assert r["labels"] == [p > 0 for _, p in labels[key]] and all(isinstance(v, bool) for v in r["labels"])
        assert r["metadata"]["soft_labels"] == [p / n for n, p in labels[key]]
        assert r["metadata"]["labeler"] == res.labeler and r["metadata"]["rollouts"] == [5] * (DEPTH + 1)
    strict = [json.loads(line) for line in open(api.export(rid, tmp_path / "p2.jsonl", "prm", ws, threshold=0.5))]
    assert [r["labels"] for r in strict] == [[v >= 0.5 for v in r["metadata"]["soft_labels"]] for r in rows]
    orm = [json.loads(line) for line in open(api.export(rid, tmp_path / "orm.jsonl", "orm", ws))]
    assert len(orm) == 18
    for r in orm:
        s = samples[r["metadata"]["problem_id"], r["metadata"]["sample_index"]]
        assert r["completions"] == [s.text] and r["labels"] == [s.text.endswith("The answer is 1.")]
    with pytest.raises(InputError, match="labeler 'zz' matches 0"):
        api.export(rid, tmp_path / "p3.jsonl", "prm", ws, labeler="zz")
    with Store(ws) as store:
        label_run(store, rid, MazeEngine(depth=DEPTH, p_good=P_GOOD), MathAnswerVerifier(), LabelConfig(m=2, delimiter="\n\n"))
    with pytest.raises(InputError, match="2 sets of step labels"):
        api.export(rid, tmp_path / "p4.jsonl", "prm", ws)
    assert api.export(rid, tmp_path / "p4.jsonl", "prm", ws, labeler=res.labeler[:6]).exists()
