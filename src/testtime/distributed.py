"""Ray runner (`pip install 'testtime[ray]'`): shard a run's problems across actors
that each own an engine, and stream their samples back to the driver's store.

- One actor per engine replica: llama.cpp actors with a few threads each on CPUs,
  one vLLM replica per GPU (group) in production (`num_gpus`).
- Work is handed out in units of a few problems; an actor that finishes a unit
  gets the next, so fast and slow replicas stay busy.
- Every sample is a stream item (a Ray generator), stored by the driver the moment
  it arrives, in its own transaction.
- An actor that dies (a crash, a preempted node, `ray.kill`) loses at most its
  samples in flight: its unit's problems go back on the queue with only the sample
  indices the store still lacks, and a replacement actor is started. Sample i of
  a problem always has the same seed, so a reassigned sample is the same sample,
  and the store's key (run, problem, index) never holds one twice.

The run id is the same as with the in-process runner: it comes from the engine's
identity, which the first actor reports.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from typing import Any, Callable

from .engines.base import Request
from .prompts import get_template
from .runner import SampleResult, store_completion
from .spec import RunSpec, SamplingParams, sample_seed
from .store import Store
from .tasks.base import Task


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray runner needs Ray: pip install 'testtime[ray]'") from None
    return ray


def _actor_class():
    ray = _ray()

    @ray.remote
    class SampleActor:
        """Owns one engine; streams completions of the requests it is given."""

        def __init__(self, engine: str, engine_args: dict[str, Any]):
            from .engines import load_engine

            self.engine = load_engine(engine, **engine_args)

        def describe(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
            shape = getattr(self.engine, "shape", None)
            shape = shape() if shape is not None else None
            return self.engine.identity(), shape.to_dict() if shape is not None else None

        def sample(self, requests: list[Request]):
            for c in self.engine.generate(requests):
                yield c

    return SampleActor


def run_sharded(store: Store, task: Task, engine: str, engine_args: dict[str, Any], n: int, params: SamplingParams,
                actors: int = 2, actor_cpus: float = 1.0, actor_gpus: float = 0.0, limit: int | None = None,
                template: str | None = None, seed: int = 0, unit: int = 4, label: str | None = None,
                ray_address: str | None = None, restart_dead: bool = True, max_restarts: int = 8,
                progress: Callable[[int, int], None] | None = None,
                on_actors: Callable[[list[Any]], None] | None = None) -> SampleResult:
    """Bring the run up to n samples per problem using `actors` Ray actors.

    unit: problems handed to an actor at a time. on_actors: called with the live
    actor handles whenever they change (tests use it to kill one)."""
    ray = _ray()
    if n < 1 or actors < 1 or unit < 1:
        raise ValueError(f"n, actors and unit must be >= 1, got n={n}, actors={actors}, unit={unit}")
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 **({} if ray_address else {"num_cpus": max(1, int(actors * actor_cpus))}))
    Actor = _actor_class().options(num_cpus=actor_cpus, num_gpus=actor_gpus)
    pool = [Actor.remote(engine, engine_args) for _ in range(actors)]
    identity, shape = ray.get(pool[0].describe.remote())
    ray.get([a.describe.remote() for a in pool[1:]])  # every replica loaded before timing starts

    problems = task.problems(limit)
    by_id = {p.id: p for p in problems}
    tmpl = get_template(template or task.template)
    if tmpl.stop:
        params = replace(params, stop=tuple(dict.fromkeys(params.stop + tmpl.stop)))
    spec = RunSpec(model=identity, task=task.identity, template=tmpl.identity(), sampling=params, seed=seed)
    run_id = store.register_run(spec, n, problems, label=label)
    if shape is not None and store.model_shape(run_id) is None:
        store.set_model_shape(run_id, shape)

    def requests_for(pids: list[str]) -> list[Request]:
        missing = store.missing(run_id, pids, n)
        return [Request(key=(pid, tuple(missing[pid])), messages=tuple(tmpl.messages(by_id[pid].question)),
                        continuation=tmpl.continuation(by_id[pid].question), params=params,
                        seeds=tuple(sample_seed(seed, pid, i) for i in missing[pid]))
                for pid in pids if missing[pid]]

    ids = [p.id for p in problems]
    queue = deque(ids[i:i + unit] for i in range(0, len(ids), unit))
    running: dict[Any, tuple[Any, list[str]]] = {}  # generator -> (actor, its problems)
    idle = list(pool)
    restarts = drawn = tokens = ended = 0
    start = time.perf_counter()
    if on_actors:
        on_actors(list(pool))
    while queue or running:
        while idle and queue:
            pids = queue.popleft()
            reqs = requests_for(pids)
            if not reqs:
                continue
            actor = idle.pop()
            running[actor.sample.remote(reqs)] = (actor, pids)
        if not running:
            if queue and not idle:
                raise RuntimeError("no live actors left to sample with")
            continue
        ready, _ = ray.wait(list(running), num_returns=1)
        gen = ready[0]
        actor, pids = running[gen]
        try:
            c = ray.get(next(gen))
        except StopIteration:
            del running[gen]
            idle.append(actor)
            continue
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError):
            del running[gen]
            queue.appendleft(pids)  # what the store still lacks for these problems is asked again
            if not restart_dead or restarts >= max_restarts:
                pool.remove(actor)
                if not pool:
                    raise RuntimeError("every Ray actor died") from None
            else:
                restarts += 1
                pool.remove(actor)
                fresh = Actor.remote(engine, engine_args)
                pool.append(fresh)
                idle.append(fresh)
            if on_actors:
                on_actors(list(pool))
            continue
        pid, indices = c.key
        if not store_completion(store, run_id, pid, indices[c.index], c):
            ended += 1
            continue
        drawn += 1
        tokens += c.completion_tokens
        if progress:
            progress(1, c.completion_tokens)
    for a in pool:
        ray.kill(a)
    return SampleResult(run_id, drawn, tokens, time.perf_counter() - start, ended)
