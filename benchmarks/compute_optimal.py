"""Compute-optimal test-time scaling on the embedded model, measured on held-out problems.

The arithmetic task, all five levels, split into train and test problems (even
and odd index within each level). On every problem, with the judge PRM made
from a second instance of the embedded model (or, with `--prm-path`, a verifier
trained by `testtime train-verifier` on other problems):

  - best-of-N (PRM-weighted) and majority vote, from one draw of `--bon-max`
    samples per problem; every N is the unbiased expectation over N-subsets;
  - beam search (and with `--tree beam_search dvts`, DVTS) of width `--width`,
    at every N that the width divides.

The compute-optimal policy (`testtime.optimal`, the code behind `testtime
optimal`) picks, for each difficulty bin and budget N, the candidate and N with
the best train accuracy; it is evaluated on the test problems. Difficulty is
oracle (quintiles of pass@1 from the best-of-N samples, as in Snell et al. and
search-and-learn) and, without ground truth, predicted (quintiles of the mean
PRM score of 4 samples). Test problems are binned with the train split's edges.

Prints test accuracy at each budget for best-of-N, beam search, DVTS, majority
and both policies, then, last:

    compute_ratio=<x>

the budget best-of-N needs to reach the oracle policy's test accuracy at N=16,
divided by 16 (linear interpolation in log2 N between measured budgets; when
best-of-N never reaches it within --bon-max, the line shows the lower bound
bon_max/16 and says so). Above it, the gap the ratio rests on: the oracle policy
at N=16 minus best-of-N at N=16 and at --bon-max, paired over the test problems,
with 95% bootstrap intervals (a ratio above 1 from a gap inside the noise is not
a measured gain).
Every point is a stored run in the workspace (one sampling draw, one search
run per N), so an interrupted run resumes and each run can be reported on.
Sampling is testtime's default truncated sampler (T 0.8, top-k 40, top-p 0.95,
min-p 0.05).

    python benchmarks/compute_optimal.py [--per-level 6] [--bon-max 32] [--workspace DIR]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np

from selection_signals import interval
from testtime.engines.llamacpp import LlamaCppEngine
from testtime.optimal import Candidates, collect, fit_policy, split
from testtime.rewards.judge import JudgePRM
from testtime.spec import SamplingParams
from testtime.store import Store
from testtime.tasks import load_task
from testtime.verifiers.math_answer import MathAnswerVerifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-level", type=int, default=6, help="problems per level (half train, half test)")
    ap.add_argument("--bon-max", type=int, default=32, help="best-of-N samples per problem")
    ap.add_argument("--n-max", type=int, default=16, help="largest search budget")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--tree", nargs="+", default=["beam_search"], choices=["beam_search", "dvts"],
                    help="tree searches to run (DVTS doubles the search time)")
    ap.add_argument("--step-tokens", type=int, default=48)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--collect-only", action="store_true", help="fill the cells and stop")
    ap.add_argument("--prm-path", default=None, help="a verifier from testtime train-verifier as the reward model "
                    "instead of the judge (it must not have been trained on these problems: checked)")
    ap.add_argument("--quick", action="store_true", help="2 problems per level, best-of-N 8, search N <= 4 with "
                    "width 2 (about 10 minutes; the ratio is then very noisy)")
    args = ap.parse_args()
    if args.quick:
        args.per_level, args.bon_max, args.n_max, args.width, args.iterations = 2, 8, 4, 2, 3

    task = load_task("arithmetic", levels=(1, 2, 3, 4, 5))
    problems = task.problems(5 * args.per_level)
    train, test = split(problems, 0.5)
    cands = Candidates(("best_of_n", "majority", *args.tree),
                       {"width": args.width, "max_steps": args.iterations, "step_tokens": args.step_tokens,
                        "delimiter": "\n", "aggregation": "last"},
                       n_max=args.n_max, bon_max=args.bon_max,
                       sampling=SamplingParams(max_tokens=args.step_tokens * args.iterations), probe=4)
    policy_engine = LlamaCppEngine(slots=16, max_prefixes=64)
    if args.prm_path:
        from testtime.learned import problem_key
        from testtime.rewards.trained import TrainedPRM

        judge_engine = prm = TrainedPRM(args.prm_path)
        seen = prm.verifier.problems & {problem_key(p.question) for p in problems}
        if seen:
            raise SystemExit(f"{args.prm_path} was trained on {len(seen)} of these problems; the ratio would "
                             "flatter it")
    else:
        judge_engine = LlamaCppEngine(slots=16, max_prefixes=32)
        prm = JudgePRM(judge_engine)
    verifier = MathAnswerVerifier()
    t0 = time.perf_counter()
    try:
        with Store(args.workspace) as store:
            cells, runs = collect(store, task, problems, policy_engine, prm, verifier, cands,
                                  progress=lambda m: print(f"  [{time.perf_counter() - t0:6.0f} s] {m}", flush=True))
    finally:
        policy_engine.close()
        judge_engine.close()
    print(f"{len(runs)} stored runs ready in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.collect_only:
        return

    budgets = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.n_max]
    ids = lambda ps: [p.id for p in ps]
    results = {kind: fit_policy(cells, ids(train), ids(test), kind=kind, budgets=budgets)
               for kind in ("oracle", "predicted")}
    curves = results["oracle"]["curves"]
    bon, beam, dvts = "best_of_n", "beam_search", "dvts"
    print(f"\n{len(train)} train / {len(test)} test problems (arithmetic levels 1-5); "
          f"candidates: {', '.join(sorted(curves))}")
    print("test accuracy of the selected answer, by budget N")
    cols = [c for c in (bon, "majority", beam, dvts) if c in curves]
    print(f"{'N':>4}  " + "  ".join(f"{c:>17}" for c in cols) + f"  {'policy(oracle)':>15}  {'policy(predicted)':>17}")
    for n in sorted(curves[bon]):
        row = "  ".join(f"{'-':>17}" if curves[c].get(n) is None else f"{curves[c][n]:17.3f}" for c in cols)
        po = results["oracle"]["policy_curve"].get(n)
        pp = results["predicted"]["policy_curve"].get(n)
        print(f"{n:>4}  {row}  " + (f"{po:15.3f}  {pp:17.3f}" if po is not None else f"{'':15}  {'':17}"))
    for kind in ("oracle", "predicted"):
        pol = results[kind]["policy"]
        print(f"\npolicy with {kind} difficulty (bin counts on train {pol.difficulty.counts}; "
              f"edges {[round(e, 3) for e in pol.difficulty.edges]}):")
        for b, choices in pol.describe().items():
            print(f"  {b}: " + "; ".join(f"{k}: {v}" for k, v in choices.items()))
        print(f"  test bins: {dict(sorted(Counter(results[kind]['test_bins'].values()).items()))}")

    r = results["oracle"]
    target = r["policy_curve"][args.n_max]
    need = r["bon_budget_to_match"]
    print(f"\noracle policy at N={args.n_max}: {target:.3f} on test; best-of-N reaches it at N="
          + (f"{need:.2f}" if need is not None else f"> {r['bon_max']} (never within its {r['bon_max']} samples)"))
    pol, acc = r["policy"], r["table"].acc
    pids = sorted(r["test_bins"])

    def policy_value(pid: str) -> float:
        c = pol.choose(args.n_max, int(r["test_bins"][pid]))
        return acc[c.config][c.n][pid]

    chosen = np.asarray([policy_value(p) for p in pids])
    assert abs(chosen.mean() - target) < 1e-9, (chosen.mean(), target)
    for n in sorted({args.n_max, r["bon_max"]}):
        diff = chosen - np.asarray([acc["best_of_n"][n][p] for p in pids])
        lo, hi = interval(diff)
        print(f"oracle policy at N={args.n_max} minus best-of-N at N={n}: {diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] "
              f"(paired over the {len(pids)} test problems; ahead on {(diff > 1e-9).sum()}, behind on "
              f"{(diff < -1e-9).sum()})")
    # when best-of-N never gets there within the draw, the ratio printed is the lower bound bon_max / n_max
    ratio = (need if need is not None else r["bon_max"]) / args.n_max
    print(f"compute_ratio={ratio:.2f}" + ("" if need is not None else "  (lower bound)"))


if __name__ == "__main__":
    main()
