"""Runs end to end on the deterministic toy engine: resume, extension, kill -9."""

import json
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import requires_model
from testtime import SamplingParams, api
from testtime.store import Store

TOY = {"engine": "toy", "task_args": {"levels": [1]}}


def texts(workspace):
    with Store(workspace) as s:
        rid = s.latest_run()
        return {(r.problem_id, r.sample_index): (r.seed, r.text) for r in s.samples(rid)}


def test_sample_stores_grades_and_reports(workspace):
    run = api.sample("arithmetic", n=8, limit=6, workspace=workspace, **TOY)
    assert run.drawn == 48
    a = run.analysis()
    assert a.n == 8 and a.problems == 6
    # level-1 answers are small numbers and the toy engine answers 0..9 uniformly
    assert 0 < a.coverage[0] < 0.5
    assert a.coverage[-1] >= a.coverage[0]
    html = api.report(run.run_id, workspace=workspace)
    page = html.read_text()
    assert "pass@k" in page and "data:image/png;base64" in page
    assert (html.parent / "coverage.png").stat().st_size > 1000


def test_rerunning_draws_nothing_and_extending_draws_only_the_difference(workspace):
    first = api.sample("arithmetic", n=10, limit=4, workspace=workspace, **TOY)
    before = texts(workspace)
    again = api.sample("arithmetic", n=10, limit=4, workspace=workspace, **TOY)
    assert (again.run_id, again.drawn) == (first.run_id, 0)
    more = api.sample("arithmetic", n=20, limit=4, workspace=workspace, **TOY)
    after = texts(workspace)
    assert more.run_id == first.run_id and more.drawn == 40
    assert all(after[k] == v for k, v in before.items())  # old samples untouched
    new_seeds = {after[k][0] for k in after if k not in before}
    assert len(new_seeds) == 40 and not new_seeds & {v[0] for v in before.values()}
    with Store(workspace) as s:
        assert len(s.unverified(first.run_id, "math_answer")) == 0


def test_more_problems_extend_the_same_run(workspace):
    a = api.sample("arithmetic", n=4, limit=3, workspace=workspace, **TOY)
    b = api.sample("arithmetic", n=4, limit=6, workspace=workspace, **TOY)
    assert a.run_id == b.run_id and b.drawn == 12


PARAMS = SamplingParams(max_tokens=24)
KILLABLE = textwrap.dedent("""
    import json, sys
    from testtime import SamplingParams, api
    api.sample("arithmetic", n=int(sys.argv[2]), limit=int(sys.argv[3]), workspace=sys.argv[1],
               engine=sys.argv[4], engine_args=json.loads(sys.argv[5]), task_args={"levels": [1, 2]},
               params=SamplingParams(max_tokens=24))
""")


def start(workspace, n, limit, engine="toy", engine_args=None):
    args = json.dumps(engine_args if engine_args is not None else {"delay_s": 0.01})
    return subprocess.Popen([sys.executable, "-c", KILLABLE, str(workspace), str(n), str(limit), engine, args])


def stored(workspace):
    db = sqlite3.connect(workspace / "testtime.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'samples'").fetchone():
            return []  # the file exists but the schema is not committed yet: nothing stored
        rows = db.execute("SELECT problem_id, sample_index, text, finish_reason FROM samples").fetchall()
    finally:
        db.close()
    assert all(t is not None and f in {"stop", "length"} for _, _, t, f in rows)  # no torn rows
    return rows


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(tmp_path):
    ws, ref = tmp_path / "ws", tmp_path / "ref"
    api.sample("arithmetic", n=20, limit=10, workspace=ref, engine="toy", task_args={"levels": [1, 2]},
               params=PARAMS)
    rng = random.Random(7)
    seen_partial, count = False, 0
    for _ in range(5):
        p = start(ws, 20, 10)
        # kill at a random moment once this attempt has committed something,
        # however long start-up takes on the machine
        deadline = time.time() + 60
        while p.poll() is None and time.time() < deadline:
            if (ws / "testtime.db").exists() and len(stored(ws)) > count:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        count = len(stored(ws))
        seen_partial |= 0 < count < 200
    assert seen_partial, "no kill landed in the middle of a run; the test proved nothing"
    p = start(ws, 20, 10)
    assert p.wait(timeout=120) == 0
    rows = stored(ws)
    assert len(rows) == 200
    per_problem = {}
    for pid, idx, _, _ in rows:
        per_problem.setdefault(pid, set()).add(idx)
    assert all(v == set(range(20)) for v in per_problem.values()) and len(per_problem) == 10
    assert texts(ws) == texts(ref)  # resumed samples are the samples an unbroken run draws


@requires_model
@pytest.mark.model
def test_kill_9_during_real_model_sampling_then_resume(tmp_path):
    ws = tmp_path / "ws"
    p = start(ws, 6, 4, engine="llamacpp", engine_args={"slots": 4})
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.5)
        if (ws / "testtime.db").exists() and 0 < len(stored(ws)):
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = len(stored(ws))
    assert 0 < partial < 24
    p = start(ws, 6, 4, engine="llamacpp", engine_args={"slots": 4})
    assert p.wait(timeout=300) == 0
    rows = stored(ws)
    assert len(rows) == 24 and len({(r[0], r[1]) for r in rows}) == 24


def test_a_smaller_limit_after_a_larger_one_still_grades_everything(workspace):
    api.sample("arithmetic", n=2, limit=6, workspace=workspace, **TOY)
    with Store(workspace) as s:
        rid = s.latest_run()
        s.db.execute("DELETE FROM verdicts")
    run = api.sample("arithmetic", n=3, limit=2, workspace=workspace, **TOY)
    with Store(workspace) as s:
        assert not s.unverified(rid, "math_answer")
    assert run.run_id == rid


def test_on_plan_reports_only_the_samples_this_call_draws(workspace):
    planned = []
    api.sample("arithmetic", n=4, limit=3, workspace=workspace, on_plan=planned.append, **TOY)
    api.sample("arithmetic", n=6, limit=3, workspace=workspace, on_plan=planned.append, **TOY)
    api.sample("arithmetic", n=6, limit=3, workspace=workspace, on_plan=planned.append, **TOY)
    assert planned == [12, 6, 0]


def test_claims_are_exclusive_and_lapse_with_their_owner(tmp_path):
    from testtime.store import claim_owner

    with Store(tmp_path) as s:
        a, b = claim_owner(), claim_owner()
        assert s.claim("r", ["p1", "p2"], a) == {}
        assert s.claim("r", ["p2", "p3"], b) == {"p2": a}  # p3 is b's now
        assert s.claim("r", ["p3"], a) == {"p3": b}
        s.release("r", a, ["p1"])
        assert s.claim("r", ["p1"], b) == {}
        s.release("r", b)
        assert s.claim("r", ["p1", "p3"], a) == {}
        # a lease that ran out lapses, whoever held it
        far = "another-host:1:abc"
        s.db.execute("UPDATE claims SET owner = ?, expires = ? WHERE problem_id = 'p1'", (far, time.time() - 1))
        assert s.claim("r", ["p1"], b) == {}
        # another machine's live claim is trusted until its lease runs out
        s.db.execute("UPDATE claims SET owner = ?, expires = ? WHERE problem_id = 'p1'", (far, time.time() + 60))
        assert s.claim("r", ["p1"], b) == {"p1": far}
        # a process of this machine that is gone (kill -9) holds nothing, lease or not
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        gone = f"{a.split(':')[0]}:{dead.pid}:abc"
        s.db.execute("UPDATE claims SET owner = ?, expires = ? WHERE problem_id = 'p1'", (gone, time.time() + 60))
        assert s.claim("r", ["p1"], b) == {}


def test_a_second_sampler_of_a_run_leaves_the_first_ones_problems_to_it(tmp_path):
    ws = tmp_path / "ws"
    first = start(ws, 12, 6, engine_args={"delay_s": 0.05})  # 72 samples, a few seconds
    deadline = time.time() + 60
    while time.time() < deadline and not ((ws / "testtime.db").exists() and stored(ws)):
        time.sleep(0.02)
    assert first.poll() is None, "the first sampler ended before the second began; the test proved nothing"
    second = api.sample("arithmetic", n=12, limit=6, workspace=ws, engine="toy", task_args={"levels": [1, 2]},
                        params=PARAMS)
    assert first.poll() is None, "the first sampler ended before the second claimed; the test proved nothing"
    assert second.drawn == 0 and len(second.left) == 6
    assert {o.split(":")[1] for o in second.left.values()} == {str(first.pid)}
    assert first.wait(timeout=120) == 0
    assert len(stored(ws)) == 72
    again = api.sample("arithmetic", n=12, limit=6, workspace=ws, engine="toy", task_args={"levels": [1, 2]},
                       params=PARAMS)
    assert again.drawn == 0 and again.left == {}
    with Store(ws) as s:
        assert s.db.execute("SELECT count(*) FROM claims").fetchone()[0] == 0  # released at the end


def test_a_sampler_extending_a_run_takes_only_unclaimed_problems(tmp_path):
    ws = tmp_path / "ws"
    base = dict(workspace=ws, engine="toy", task_args={"levels": [1, 2]}, params=PARAMS)
    run = api.sample("arithmetic", n=2, limit=4, **base)
    with Store(ws) as s:
        problems = [p["problem_id"] for p in s.problems(run.run_id)]
        other = "elsewhere:1:abc"
        assert s.claim(run.run_id, problems[:2], other) == {}
    got = api.sample("arithmetic", n=4, limit=4, **base)
    assert got.drawn == 4 and set(got.left) == set(problems[:2])  # 2 problems x 2 new samples
    with Store(ws) as s:
        s.release(run.run_id, other)
    assert api.sample("arithmetic", n=4, limit=4, **base).drawn == 4
