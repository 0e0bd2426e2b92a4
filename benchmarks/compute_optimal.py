"""Compute-optimal test-time scaling on the embedded model, measured on held-out problems.

The arithmetic task, all five levels, split into train and test problems (even
and odd index within each level). On every problem, with the judge PRM made
from a second instance of the embedded model:

  - best-of-N (PRM-weighted) and majority vote, from one draw of `--bon-max`
    samples per problem; every N is the unbiased expectation over N-subsets;
  - beam search and DVTS of width `--width`, at every N that the width divides.

The compute-optimal policy (`testtime.policy`) picks, for each difficulty bin
and budget N, the candidate with the best train accuracy; it is evaluated on
the test problems. Difficulty is oracle (quintiles of pass@1 from the
best-of-N samples, as in Snell et al. and search-and-learn) and, without
ground truth, predicted (quintiles of the mean PRM score of 4 samples; the
test problems are binned with the train split's edges).

Prints test accuracy at each budget for best-of-N, beam search, DVTS, majority
and both policies, then, last:

    compute_ratio=<x>

the budget best-of-N needs to reach the oracle policy's test accuracy at N=16,
divided by 16 (linear interpolation in log2 N between measured budgets; when
best-of-N never reaches it within --bon-max, the ratio is printed as >= bon_max/16).
Every (strategy, N) cell is stored in the workspace as it finishes, so an
interrupted run resumes.

    python benchmarks/compute_optimal.py [--per-level 6] [--bon-max 32] [--workspace DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from testtime.compare import CompareConfig, run_compare
from testtime.engines.llamacpp import LlamaCppEngine
from testtime.rewards.judge import JudgePRM
from testtime.store import Store
from testtime.tasks import load_task
from testtime.verifiers.math_answer import MathAnswerVerifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-level", type=int, default=6, help="problems per level (half train, half test)")
    ap.add_argument("--bon-max", type=int, default=32, help="best-of-N samples per problem")
    ap.add_argument("--n-max", type=int, default=16, help="largest search budget")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--step-tokens", type=int, default=48)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--collect-only", action="store_true", help="fill the cells and stop")
    args = ap.parse_args()

    task = load_task("arithmetic", levels=(1, 2, 3, 4, 5))
    problems = task.problems(5 * args.per_level)
    train = [p.id for p in problems if int(p.id.split("-")[1]) % 2 == 0]
    test = [p.id for p in problems if int(p.id.split("-")[1]) % 2 == 1]
    common = dict(seeds=(0,), iterations=args.iterations, delimiter="\n", aggregation="last",
                  step_tokens=args.step_tokens, temperature=0.7)
    sampled = CompareConfig(strategies=("best_of_n", "majority"), n_max=args.bon_max, width=1, **common)
    search = CompareConfig(strategies=("beam_search", "dvts"), n_max=args.n_max, width=args.width, **common)

    policy_engine = LlamaCppEngine(slots=16, max_prefixes=64)
    judge_engine = LlamaCppEngine(slots=16, max_prefixes=32)
    verifier = MathAnswerVerifier()
    cells = []
    t0 = time.perf_counter()
    try:
        with Store(args.workspace) as store:
            for label, cfg in (("sampled", sampled), ("search", search)):
                _, got = run_compare(store, task, problems, policy_engine, JudgePRM(judge_engine), verifier, cfg,
                                     progress=lambda m: print(f"  [{time.perf_counter() - t0:6.0f} s] {m}",
                                                              flush=True))
                for c in got:
                    if c.strategy in ("beam_search", "dvts"):
                        c.strategy = f"{c.strategy}(width={args.width})"
                cells += got
    finally:
        policy_engine.close()
        judge_engine.close()
    print(f"cells collected in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.collect_only:
        return
    from testtime.policy import AccuracyTable, budget_to_reach, evaluate_policy, fit_difficulty, select_policy

    table = AccuracyTable.from_cells(cells)
    probe = next(c.probe for c in cells if c.strategy == "best_of_n" and c.n == 1)
    pass1 = next(c.oracle for c in cells if c.strategy == "best_of_n" and c.n == 1)
    budgets = [n for n in table.budgets if n <= args.n_max]
    bon = "best_of_n"
    beam = f"beam_search(width={args.width})"
    print(f"\n{len(train)} train / {len(test)} test problems; budgets {budgets}; candidates: "
          f"{', '.join(table.configs)}")

    results = {}
    for kind, values in (("oracle", pass1), ("predicted", probe)):
        bins = fit_difficulty({pid: values[pid] for pid in train}, kind=kind)
        test_bins = bins.assign({pid: values[pid] for pid in test}) if kind == "predicted" else \
            fit_difficulty({pid: values[pid] for pid in test}, kind=kind).assign({pid: values[pid] for pid in test})
        policy = select_policy(table, bins.assign({pid: values[pid] for pid in train}), budgets)
        policy.difficulty = bins
        results[kind] = (policy, evaluate_policy(policy, table, test_bins, budgets))

    print("\ntest accuracy (selected answer correct), by budget N")
    cols = [bon, "majority", beam, f"dvts(width={args.width})"]
    print(f"{'N':>4}  " + "  ".join(f"{c:>18}" for c in cols) + f"  {'policy(oracle)':>15}  {'policy(predicted)':>17}")
    for n in budgets:
        row = [table.mean(c, n, test) for c in cols]
        cells_txt = "  ".join(f"{'-':>18}" if v is None else f"{v:18.3f}" for v in row)
        print(f"{n:>4}  {cells_txt}  {results['oracle'][1][n]:15.3f}  {results['predicted'][1][n]:17.3f}")
    for kind in ("oracle", "predicted"):
        print(f"\npolicy ({kind} difficulty): bin -> choice at each budget (train accuracy)")
        print(json.dumps(results[kind][0].describe(), indent=1))

    target = results["oracle"][1][args.n_max]
    bon_curve = {n: table.mean(bon, n, test) for n in table.budgets}
    need = budget_to_reach(bon_curve, target)
    bon_top = max(table.budgets)
    print(f"\nbest-of-N on test: " + ", ".join(f"N={n}: {v:.3f}" for n, v in sorted(bon_curve.items())))
    print(f"oracle policy at N={args.n_max}: {target:.3f}; best-of-N reaches it at N="
          + (f"{need:.2f}" if need is not None else f"> {bon_top} (not within the draw)"))
    ratio = (need if need is not None else bon_top) / args.n_max
    print(f"compute_ratio={'>=' if need is None else ''}{ratio:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
