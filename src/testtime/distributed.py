"""Ray runner (`pip install 'testtime[ray]'`): shard a run's problems across actors
that each own an engine, and stream their results back to the driver's store.

- One actor per engine replica: llama.cpp actors with a few threads each on CPUs,
  one vLLM replica per GPU (group) in production (`num_gpus`).
- Work is handed out in units of a few problems; an actor that finishes a unit
  gets the next, so fast and slow replicas stay busy.
- Every result is a stream item (a Ray generator), stored by the driver the moment
  it arrives, in its own transaction: a sample of a sampling run, or a problem's
  final candidates of a strategy run (beam search, DVTS, ... through the strategy
  registry, each actor with its own reward model).
- An actor that dies (a crash, a preempted node, `ray.kill`) loses at most its
  work in flight: its unit's problems go back on the queue with only what the
  store still lacks (sample indices, or unfinished problems), and a replacement
  actor is started. Sample i of a problem always has the same seed, so a
  reassigned sample is the same sample, and the store's keys never hold one twice.

The run id is the same as with the in-process runner: it comes from the engine's
(and reward model's) identity, which the first actor reports.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterator

from .errors import InfrastructureError, MissingDependencyError
from .engines.base import Request
from .runner import SampleResult, sample_requests, store_result, store_stream, strategy_spec, template_sampling
from .spec import RunSpec, SamplingParams, SpecError
from .store import Store
from .strategies.base import StrategyParams, load_strategy
from .tasks.base import Problem, Task


def _ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("the Ray runner needs Ray: pip install 'testtime[ray]'") from None
    return ray


def _actor_class():
    ray = _ray()

    @ray.remote
    class EngineActor:
        """Owns one engine (and, for a strategy run, its reward model); streams the
        results of the work it is given."""

        def __init__(self, engine: str, engine_args: dict[str, Any], prm: dict[str, Any] | None = None):
            from .engines import load_engine
            from .searchspec import RewardModelSpec

            self.engine = load_engine(engine, **engine_args)
            self.prm, self.owned = (RewardModelSpec(prm["name"], prm["args"]).build(engine, engine_args)
                                    if prm else (None, []))

        def describe(self) -> dict[str, Any]:
            from .runner import scorer_name

            shapes = {}
            for role, model in (("policy", self.engine), ("prm", self.prm)):
                shape = getattr(model, "shape", None) if model is not None else None
                shape = shape() if shape is not None else None
                if shape is not None:
                    shapes[role] = shape.to_dict()
            return {"identity": self.engine.identity(), "shapes": shapes,
                    "prm": self.prm.identity() if self.prm is not None else None,
                    "scorer": scorer_name(self.prm) if self.prm is not None else ""}

        def sample(self, requests: list[Request]):
            for c in self.engine.generate(requests):
                yield c

        def search(self, problems: list[Problem], strategy: str, params: StrategyParams, template: Any,
                   sampling: SamplingParams, seed: int, scorer: str):
            from .strategies.base import SearchContext

            ctx = SearchContext(self.engine, self.prm, template, sampling, seed, scorer)
            for res in load_strategy(strategy).run(problems, ctx, params):
                yield res

    return EngineActor


class _Pool:
    """Live actors, and the one loop that hands out units of problems and streams back
    their items, replacing actors that die."""

    def __init__(self, engine: str, engine_args: dict[str, Any], actors: int, actor_cpus: float, actor_gpus: float,
                 prm: dict[str, Any] | None, ray_address: str | None, restart_dead: bool, max_restarts: int,
                 on_actors: Callable[[list[Any]], None] | None):
        self.ray = ray = _ray()
        if actors < 1:
            raise SpecError(f"actors must be >= 1, got {actors}")
        if not ray.is_initialized():
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                     **({} if ray_address else {"num_cpus": max(1, int(actors * actor_cpus))}))
        self.Actor = _actor_class().options(num_cpus=actor_cpus, num_gpus=actor_gpus)
        self.args = (engine, engine_args, prm)
        self.actors = [self.Actor.remote(*self.args) for _ in range(actors)]
        first = ray.get(self.actors[0].describe.remote())
        self.identity, self.shapes, self.prm_identity, self.scorer = (first["identity"], first["shapes"],
                                                                      first["prm"], first["scorer"])
        ray.get([a.describe.remote() for a in self.actors[1:]])  # every replica loaded before timing starts
        self.restart_dead, self.max_restarts, self.on_actors = restart_dead, max_restarts, on_actors

    def drive(self, units: list[list[str]], call: Callable[[Any, list[str]], Any | None]) -> Iterator[Any]:
        """Yield every item the actors stream for the units. `call(actor, unit)` starts
        an actor on what the store still lacks of a unit (None when it lacks nothing)."""
        ray = self.ray
        queue = deque(units)
        running: dict[Any, tuple[Any, list[str]]] = {}  # generator -> (actor, its problems)
        idle = list(self.actors)
        restarts = 0
        if self.on_actors:
            self.on_actors(list(self.actors))
        while queue or running:
            while idle and queue:
                pids = queue.popleft()
                gen = call(idle[-1], pids)
                if gen is not None:
                    running[gen] = (idle.pop(), pids)
            if not running:
                if queue and not idle:
                    raise InfrastructureError("no live actors left to work with")
                continue
            ready, _ = ray.wait(list(running), num_returns=1)
            gen = ready[0]
            actor, pids = running[gen]
            try:
                item = ray.get(next(gen))
            except StopIteration:
                del running[gen]
                idle.append(actor)
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError):
                del running[gen]
                queue.appendleft(pids)  # what the store still lacks for these problems is asked again
                self.actors.remove(actor)
                if self.restart_dead and restarts < self.max_restarts:
                    restarts += 1
                    fresh = self.Actor.remote(*self.args)
                    self.actors.append(fresh)
                    idle.append(fresh)
                elif not self.actors:
                    raise InfrastructureError("every Ray actor died") from None
                if self.on_actors:
                    self.on_actors(list(self.actors))
                continue
            yield item

    def record_shapes(self, store: Store, run_id: str) -> None:
        for role, shape in self.shapes.items():
            if store.model_shape(run_id, role) is None:
                store.set_model_shape(run_id, shape, role)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


def run_sharded(store: Store, task: Task, engine: str, engine_args: dict[str, Any], n: int, params: SamplingParams,
                actors: int = 2, actor_cpus: float = 1.0, actor_gpus: float = 0.0, limit: int | None = None,
                template: str | None = None, seed: int = 0, unit: int = 4, label: str | None = None,
                ray_address: str | None = None, restart_dead: bool = True, max_restarts: int = 8,
                progress: Callable[[int, int], None] | None = None,
                on_actors: Callable[[list[Any]], None] | None = None) -> SampleResult:
    """Bring the run up to n samples per problem using `actors` Ray actors.

    unit: problems handed to an actor at a time. on_actors: called with the live
    actor handles whenever they change (tests use it to kill one)."""
    if n < 1 or unit < 1:
        raise SpecError(f"n and unit must be >= 1, got n={n}, unit={unit}")
    problems = task.problems(limit)  # before any actor starts: a bad task argument fails here
    by_id = {p.id: p for p in problems}
    tmpl, params = template_sampling(task, template, params)
    pool = _Pool(engine, engine_args, actors, actor_cpus, actor_gpus, None, ray_address, restart_dead, max_restarts,
                 on_actors)
    try:
        spec = RunSpec(model=pool.identity, task=task.identity, template=tmpl.identity(), sampling=params, seed=seed)
        run_id = store.register_run(spec, n, problems, label=label)
        pool.record_shapes(store, run_id)

        def call(actor: Any, pids: list[str]) -> Any | None:
            reqs = list(sample_requests([by_id[pid] for pid in pids], store.missing(run_id, pids, n), tmpl, params,
                                        seed))
            return actor.sample.remote(reqs) if reqs else None

        ids = [p.id for p in problems]
        start = time.perf_counter()
        shards = [ids[i:i + unit] for i in range(0, len(ids), unit)]
        drawn, tokens, ended = store_stream(store, run_id, pool.drive(shards, call), progress)
    finally:
        pool.close()
    return SampleResult(run_id, drawn, tokens, time.perf_counter() - start, ended)


def run_strategy_sharded(store: Store, task: Task, engine: str, engine_args: dict[str, Any], strategy: str,
                         params: StrategyParams, sampling: SamplingParams, prm: dict[str, Any] | None = None,
                         actors: int = 2, actor_cpus: float = 1.0, actor_gpus: float = 0.0,
                         limit: int | None = None, template: str | None = None, seed: int = 0, unit: int = 4,
                         label: str | None = None, ray_address: str | None = None, restart_dead: bool = True,
                         max_restarts: int = 8, progress: Callable[[int, int], None] | None = None,
                         on_actors: Callable[[list[Any]], None] | None = None) -> SampleResult:
    """A strategy run (the same run, and run id, as `runner.run_strategy`) sharded over
    actors: each runs the registered strategy on a unit of problems with its own
    engine and reward model (`prm`: {"name", "args"}, built on the actor), and each
    problem's result is stored as it arrives."""
    if load_strategy(strategy).needs_prm and prm is None:
        raise SpecError(f"strategy {strategy!r} needs a reward model (--prm judge, or --prm served with its url)")
    if unit < 1:
        raise SpecError(f"unit must be >= 1, got {unit}")
    problems = task.problems(limit)
    by_id = {p.id: p for p in problems}
    tmpl, sampling = template_sampling(task, template, sampling)
    pool = _Pool(engine, engine_args, actors, actor_cpus, actor_gpus, prm, ray_address, restart_dead, max_restarts,
                 on_actors)
    try:
        spec = strategy_spec(pool.identity, task, tmpl, sampling, strategy, params, pool.prm_identity, seed)
        run_id = store.register_run(spec, params.n, problems, label=label)
        pool.record_shapes(store, run_id)

        def call(actor: Any, pids: list[str]) -> Any | None:
            done = store.finished_problems(run_id)
            todo = [by_id[pid] for pid in pids if pid not in done]
            return actor.search.remote(todo, strategy, params, tmpl, sampling, seed, pool.scorer) if todo else None

        ids = [p.id for p in problems]
        drawn = tokens = 0
        start = time.perf_counter()
        for res in pool.drive([ids[i:i + unit] for i in range(0, len(ids), unit)], call):
            rows, generated = store_result(store, run_id, res, pool.scorer)
            drawn += rows
            tokens += generated
            if progress:
                progress(rows, generated)
    finally:
        pool.close()
    return SampleResult(run_id, drawn, tokens, time.perf_counter() - start)
