"""The Ray runner on a local cluster: 2 actors, one killed mid-run; nothing lost, nothing twice."""

import pytest

ray = pytest.importorskip("ray", reason="needs ray (pip install 'testtime[ray]')")

from testtime.distributed import run_sharded  # noqa: E402
from testtime.runner import draw_samples  # noqa: E402
from testtime.spec import SamplingParams, sample_seed  # noqa: E402
from testtime.store import Store  # noqa: E402
from testtime.tasks import load_task  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_actors_one_killed_mid_run(cluster, tmp_path):
    task = load_task("arithmetic", levels=[1, 2])
    params = SamplingParams(max_tokens=32)
    actors, seen = [], []

    def kill_one(samples, tokens):
        seen.append(samples)
        if len(seen) == 10:  # with samples of both actors in flight
            ray.kill(actors[0][0])

    with Store(tmp_path / "ray") as store:
        r = run_sharded(store, task, "toy", {"delay_s": 0.02}, n=6, params=params, actors=2, limit=12, unit=2,
                        progress=kill_one, on_actors=actors.append)
        rows = store.samples(r.run_id)
        # the dead actor was replaced, and its problems finished elsewhere
        assert len(actors) >= 2 and actors[0][0] not in actors[-1]
        assert len(rows) == 72 and len({(s.problem_id, s.sample_index) for s in rows}) == 72
        assert all(s.seed == sample_seed(0, s.problem_id, s.sample_index) for s in rows)
    # the same run, drawn in-process, holds exactly the same samples (same run id, same texts)
    from testtime.engines.toy import ToyEngine

    with Store(tmp_path / "local") as store:
        local = draw_samples(store, task, ToyEngine(), 6, params, limit=12)
        assert local.run_id == r.run_id
        want = {(s.problem_id, s.sample_index): s.text for s in store.samples(local.run_id)}
    assert want == {(s.problem_id, s.sample_index): s.text for s in rows}


def test_a_resumed_sharded_run_draws_only_what_is_missing(cluster, tmp_path):
    task = load_task("arithmetic", levels=[1])
    with Store(tmp_path) as store:
        first = run_sharded(store, task, "toy", {}, n=3, params=SamplingParams(max_tokens=16), actors=2, limit=4)
        assert first.drawn == 12
        more = run_sharded(store, task, "toy", {}, n=5, params=SamplingParams(max_tokens=16), actors=2, limit=4)
        assert more.run_id == first.run_id and more.drawn == 8


@pytest.mark.model
@pytest.mark.slow
def test_llamacpp_actors(cluster, tmp_path):
    from testtime import api

    r = api.sample("arithmetic", n=4, limit=4, engine="llamacpp", engine_args={"n_threads": 1, "slots": 8},
                   params=SamplingParams(max_tokens=24), workspace=tmp_path, ray_actors=2,
                   task_args={"levels": [1]})
    assert r.drawn == 16
    with Store(tmp_path) as store:
        assert store.model_shape(r.run_id)["n_layers"] == 30
        assert len(store.unverified(r.run_id, "math_answer")) == 0  # graded


def test_a_search_strategy_sharded_over_actors_is_the_in_process_run(cluster, tmp_path):
    """Beam search through the registry on 2 actors (one killed mid-run), each with its own
    judge: the same run id and candidates as in-process, every problem stored once."""
    from testtime.distributed import run_strategy_sharded
    from testtime.engines.toy import ToyEngine
    from testtime.rewards.judge import JudgePRM
    from testtime.runner import run_strategy
    from testtime.strategies import strategy_params

    task = load_task("arithmetic", levels=[1, 2])
    params = strategy_params("beam_search", {"n": 4, "width": 2, "max_steps": 2, "step_tokens": 8})
    sampling = SamplingParams(max_tokens=32)
    actors, seen = [], []

    def kill_one(candidates, tokens):
        seen.append(candidates)
        if len(seen) == 2:
            ray.kill(actors[0][0])

    with Store(tmp_path / "ray") as store:
        r = run_strategy_sharded(store, task, "toy", {"delay_s": 0.01}, "beam_search", params, sampling,
                                 {"name": "judge", "args": {}}, actors=2, limit=8, unit=1, progress=kill_one,
                                 on_actors=actors.append)
        rows = store.samples(r.run_id)
        assert store.finished_problems(r.run_id) == {p.id for p in task.problems(8)}
        assert len(actors) >= 2 and actors[0][0] not in actors[-1]
        got = {(s.problem_id, s.sample_index): s.text for s in rows}
        assert store.scorers(r.run_id) and store.role_usage(r.run_id)
    with Store(tmp_path / "local") as store:
        engine = ToyEngine()
        local = run_strategy(store, task, engine, "beam_search", params, sampling, JudgePRM(ToyEngine()), limit=8)
        assert local.run_id == r.run_id
        assert got == {(s.problem_id, s.sample_index): s.text for s in store.samples(local.run_id)}
