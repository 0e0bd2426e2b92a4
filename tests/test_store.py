import json
import sqlite3

import pyarrow.parquet as pq
import pytest

from testtime.spec import RunSpec, SamplingParams
from testtime.store import SampleRow, Store, VerdictRow
from testtime.tasks import Problem

PROBLEMS = [Problem("a", "1+1?", "2", 1), Problem("b", "2+2?", "4", 2)]


def make_spec(temperature=0.7):
    return RunSpec(model={"engine": "toy"}, task={"name": "t"}, template={"name": "plain"},
                   sampling=SamplingParams(temperature=temperature))


def row(run_id, pid, i, text="x"):
    return SampleRow(run_id, pid, i, seed=100 + i, text=text, prompt_tokens=5, cached_tokens=0,
                     completion_tokens=3, finish_reason="stop", latency_s=0.1)


def test_store_uses_wal_and_creates_the_workspace(workspace):
    with Store(workspace) as s:
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (workspace / "testtime.db").exists()


def test_workspace_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTTIME_WORKSPACE", str(tmp_path / "env-ws"))
    with Store() as s:
        assert s.workspace == tmp_path / "env-ws"


def test_missing_samples_and_idempotent_inserts(workspace):
    with Store(workspace) as s:
        rid = s.register_run(make_spec(), 4, PROBLEMS)
        assert s.missing(rid, ["a", "b"], 4) == {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
        s.add_samples([row(rid, "a", 0, "first"), row(rid, "a", 2)])
        s.add_samples([row(rid, "a", 0, "second attempt")])  # never overwrites
        assert s.missing(rid, ["a", "b"], 4)["a"] == [1, 3]
        assert s.missing(rid, ["a", "b"], 6)["a"] == [1, 3, 4, 5]
        assert [r.text for r in s.samples(rid) if r.sample_index == 0] == ["first"]


def test_extending_n_keeps_one_run(workspace):
    with Store(workspace) as s:
        rid = s.register_run(make_spec(), 4, PROBLEMS)
        assert s.register_run(make_spec(), 8, PROBLEMS) == rid
        assert s.runs()[0]["n_target"] == 8
        assert s.register_run(make_spec(temperature=0.1), 4, PROBLEMS) != rid


def test_counts_separate_infra_errors_from_failures(workspace):
    with Store(workspace) as s:
        rid = s.register_run(make_spec(), 3, PROBLEMS)
        s.add_samples([row(rid, "a", i) for i in range(3)] + [row(rid, "b", i) for i in range(3)])
        s.add_verdicts([VerdictRow(rid, "a", 0, "v", "pass"), VerdictRow(rid, "a", 1, "v", "fail"),
                        VerdictRow(rid, "a", 2, "v", "infra_error"), VerdictRow(rid, "b", 0, "v", "pass"),
                        VerdictRow(rid, "b", 1, "v", "pass"), VerdictRow(rid, "b", 2, "v", "timeout")])
        c = s.counts(rid, "v")
        assert c.problem_ids == ["a", "b"]
        assert list(c.n) == [2, 3] and list(c.c) == [1, 2]
        assert c.infra_errors == 1
        assert list(s.counts(rid, "v", n=2).n) == [2, 2]
        assert len(s.unverified(rid, "other")) == 6 and not s.unverified(rid, "v")


def test_resolve_run_by_prefix_or_label(workspace):
    with Store(workspace) as s:
        rid = s.register_run(make_spec(), 1, PROBLEMS, label="baseline")
        assert s.resolve_run(rid[:5]) == rid
        assert s.resolve_run("baseline") == rid
        with pytest.raises(KeyError, match="no run matches"):
            s.resolve_run("zzz")


def test_export_jsonl_and_parquet_round_trip(workspace, tmp_path):
    with Store(workspace) as s:
        rid = s.register_run(make_spec(), 2, PROBLEMS)
        s.add_samples([row(rid, "a", 0, "The answer is 2."), row(rid, "b", 0, "5")])
        s.add_verdicts([VerdictRow(rid, "a", 0, "math_answer", "pass", "numeric", "2")])
        lines = [json.loads(x) for x in s.export(rid, tmp_path / "out.jsonl").read_text().splitlines()]
        table = pq.read_table(s.export(rid, tmp_path / "out.parquet")).to_pylist()
    assert len(lines) == len(table) == 2
    first = lines[0]
    assert (first["problem_id"], first["text"], first["reference"], first["difficulty"]) == ("a", "The answer is 2.", "2", 1)
    assert first["verdicts"]["math_answer"] == {"verdict": "pass", "reason": "numeric", "extracted": "2"}
    assert table[0]["text"] == "The answer is 2." and json.loads(table[0]["verdicts"]) == first["verdicts"]
    assert not (tmp_path / "out.jsonl.tmp").exists()
    with pytest.raises(ValueError, match="jsonl"):
        Store(workspace).export(rid, tmp_path / "out.csv")


def test_a_failed_transaction_leaves_nothing(workspace):
    with Store(workspace) as s:
        rid = s.register_run(make_spec(), 2, PROBLEMS)
        bad = [row(rid, "a", 0), SampleRow(rid, "a", 1, 1, None, 1, 0, 1, "stop")]  # text NOT NULL
        with pytest.raises(sqlite3.IntegrityError):
            s.add_samples(bad)
        assert s.samples(rid) == []


V1_SAMPLES = """CREATE TABLE samples (
    run_id TEXT NOT NULL, problem_id TEXT NOT NULL, sample_index INTEGER NOT NULL, seed INTEGER NOT NULL,
    text TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, finish_reason TEXT NOT NULL, latency_s REAL, created REAL NOT NULL,
    PRIMARY KEY (run_id, problem_id, sample_index)) WITHOUT ROWID"""


def test_a_workspace_from_the_previous_version_is_migrated_in_place(workspace):
    workspace.mkdir()
    db = sqlite3.connect(workspace / "testtime.db")
    db.execute(V1_SAMPLES)
    db.execute("INSERT INTO samples VALUES ('r', 'a', 0, 7, 'old text', 5, 2, 3, 'stop', 0.1, 1.0)")
    db.commit()
    db.close()
    with Store(workspace) as s:
        [old] = s.samples("r")
        assert (old.text, old.seed, old.cached_tokens, old.reasoning) == ("old text", 7, 2, None)
        # what the new schema allows: an unknown cached count, and a reasoning parser's text
        s.add_samples([SampleRow("r", "a", 1, 8, "5", 5, None, 3, "stop", 0.1, reasoning="2 + 3 = 5")])
        new = s.samples("r")[1]
        assert new.cached_tokens is None and new.reasoning == "2 + 3 = 5"
        assert s.usage("r")["a"]["cache_unknown"] == 1
    with Store(workspace) as s:  # reopening does not migrate again
        assert len(s.samples("r")) == 2
