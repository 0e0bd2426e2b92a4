"""Ray runner scaling: 2 llama.cpp actors of 1 thread each against 1 actor of 2 threads,
the same work on the same machine, in one run.

Both sample the same arithmetic problems (levels 1-3) n times with the embedded
model into fresh workspaces, through `testtime.distributed.run_sharded`. The clock
starts when every actor has loaded its model and stops when the last sample is
stored, so both figures include the driver's storing and Ray's streaming. The two
configurations alternate (a, b, a, b) to even out the machine's drift.

Last line: efficiency=<x> = generated tokens/s of 2 x 1 thread / that of 1 x 2 threads.

    python benchmarks/ray_scaling.py [--problems 8] [--n 16] [--max-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile

import ray

from testtime.distributed import run_sharded
from testtime.spec import SamplingParams
from testtime.store import Store
from testtime.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="4 problems x 8 samples, 1 round (about 2 minutes)")
    args = ap.parse_args()
    if args.quick:
        args.problems, args.n, args.rounds = 4, 8, 1
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    task = load_task("arithmetic", levels=(1, 2, 3))
    params = SamplingParams(temperature=0.7, max_tokens=args.max_tokens)
    configs = {"1 actor x 2 threads": (1, 2.0, {"n_threads": 2, "slots": 16}),
               "2 actors x 1 thread": (2, 1.0, {"n_threads": 1, "slots": 16})}
    totals = {k: [0, 0.0] for k in configs}
    for r in range(args.rounds):
        for name, (actors, cpus, eargs) in configs.items():
            with tempfile.TemporaryDirectory() as ws, Store(ws) as store:
                res = run_sharded(store, task, "llamacpp", eargs, n=args.n, params=params, actors=actors,
                                  actor_cpus=cpus, limit=args.problems, unit=max(1, args.problems // (2 * actors)),
                                  seed=r)
            totals[name][0] += res.completion_tokens
            totals[name][1] += res.seconds
            print(f"round {r}: {name}: {res.drawn} samples, {res.completion_tokens} tokens in {res.seconds:.1f} s "
                  f"= {res.completion_tokens / res.seconds:.1f} tok/s", flush=True)
    rates = {k: t / s for k, (t, s) in totals.items()}
    for k, v in rates.items():
        print(f"{k}: {v:.1f} tok/s over {args.rounds} rounds")
    ray.shutdown()
    print(f"efficiency={rates['2 actors x 1 thread'] / rates['1 actor x 2 threads']:.2f}")


if __name__ == "__main__":
    main()
