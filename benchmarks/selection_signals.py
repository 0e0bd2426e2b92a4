"""Which free signal picks the right answer best: selection accuracy on held-out problems.

On the embedded model (SmolLM2-135M), arithmetic levels 1-5 (`--levels`) and GSM8K training
problems (`_signals.py`: one stored sampling run per task, N samples per problem,
with the per-token statistics llama.cpp records while sampling). For each
confidence measure (`testtime.confidence`: DeepConf's mean, lowest-group,
bottom-10% and tail confidence, self-certainty, mean log-probability) it scores
every sample for free (`--prm confidence`), then measures, at N:

  - majority vote;
  - confidence-weighted majority (each vote weighted by the sample's confidence);
  - DeepConf's offline filter (the top 10% / 90% most confident vote, weighted);
  - best single sample (for self-certainty: Kang et al.'s best-of-N);
  - with --judge: best-of-N weighted by the judge PRM (the model asked about each step);
  - particle filtering (a live strategy run, `particle_filtering` with N particles)
    steered by the confidence measure that selected best on the fit half (and by the
    judge, with --judge), its final population's weighted vote;
  - pass@N, the ceiling.

Each is the expectation over N-subsets of the drawn samples (`metrics.selection_at_k`),
with a 95% bootstrap interval over problems. The best selector is chosen on the fit
half of the problems and its gain over majority reported on the other half (paired
bootstrap interval), so the choice does not flatter itself. A tie on the fit half
goes to the arm that generated fewer tokens there (the selectors over stored
samples all spend majority's; particle filtering its own), then to one that needs
no judge. Last line:

    best=<name> gain_over_majority=<x>

Particle filtering is a search, not a selection over the stored samples, so it
runs live (its signal is chosen on the fit half first); it spends about what N
samples spend (its tokens are printed beside majority's). It runs on both halves
and competes for `best` like any selector; in --quick mode it runs on the report
half only, to stay within 10 minutes, so it is reported (with its paired gain
over majority on the same problems) but cannot be chosen. Skip it with
--no-particles.

    python benchmarks/selection_signals.py [--quick] [-n 64] [--per-level 20] [--levels 1 2 3] [--gsm8k 50] [--judge]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _signals import add_args, draw, quick
from testtime import metrics
from testtime.analysis import answer_rules, graded_samples
from testtime.confidence import METRICS
from testtime.rewards.confidence import ConfidenceScorer
from testtime.runner import score_samples, scorer_name
from testtime.select import AnswerKeys
from testtime.store import Store

SELECTIONS = (("weighted", 1.0), ("filtered", 0.1), ("filtered", 0.9), ("naive", 1.0))


def per_problem(store, run_id, ids, scores, method, eta, n):
    graded = graded_samples(store, run_id, "math_answer")
    keys, rules = AnswerKeys(), answer_rules(store, run_id)
    out = []
    for pid in ids:
        items = [x for x in sorted(graded.get(pid, [])) if x[0] < n]
        if len(items) < n:
            continue
        ans = [keys.of_text(t, rules[pid]) for _, t, _ in items]
        ok = [o for _, _, o in items]
        if method == "pass":
            out.append(float(any(ok)))
            continue
        sc = None if scores is None else [max((scores.get((pid, i)) or [0.0])[-1], 0.0) for i, _, _ in items]
        out.append(metrics.selection_at_k(ans, ok, n, method, sc, eta=eta).mean)
    return np.asarray(out)


def particle_run(store, d, ids, n, prm_name, prm_args) -> tuple[dict[str, float], float]:
    """Particle filtering live on these problems: per problem, the accuracy of the final
    population's weighted vote, and the tokens it generated over majority@n's. Steps are
    lines; at most 6 of max_tokens / 3 tokens each."""
    from testtime.analysis import selected
    from testtime.engines.llamacpp import LlamaCppEngine
    from testtime.rewards.base import load_reward_model
    from testtime.runner import grade, run_strategy
    from testtime.spec import SamplingParams
    from testtime.strategies.base import strategy_params
    from testtime.verifiers.math_answer import MathAnswerVerifier

    task, problems = d.problems(ids)
    engine = LlamaCppEngine(model=d.model)
    judge_engine = LlamaCppEngine(model=d.model, slots=16, max_prefixes=32) if prm_name == "judge" else None
    prm = load_reward_model(prm_name, **({"engine": judge_engine} if judge_engine else prm_args))
    params = strategy_params("particle_filtering", {"n": n, "max_steps": 6, "step_tokens": d.max_tokens // 3})
    t = time.perf_counter()
    try:
        res = run_strategy(store, task, engine, "particle_filtering", params,
                           SamplingParams(max_tokens=d.max_tokens), prm, problems=problems)
    finally:
        engine.close()
        if judge_engine is not None:
            judge_engine.close()
    grade(store, res.run_id, MathAnswerVerifier())
    mine = set(ids)  # the run holds both halves once both have run: count these only
    got = {pid: acc for pid, (acc, _) in selected(store, res.run_id, "math_answer").items() if pid in mine}
    tokens = sum(int(u["decode"]) for pid, u in store.usage(res.run_id).items() if pid in got)
    sampled = sum(int(u["decode"]) for pid, u in store.usage(d.run_id, n).items() if pid in got)
    print(f"{d.task}: particle filtering ({prm_name}) run {res.run_id} on {len(problems)} problems: "
          f"{tokens} tokens, majority@{n} {sampled} ({time.perf_counter() - t:.0f} s)", flush=True)
    return got, tokens / max(1, sampled)


def interval(values, n_boot=2000, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (n_boot, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    ap.add_argument("--judge", action="store_true", help="also best-of-N with the judge PRM (slow on CPU)")
    ap.add_argument("--no-particles", action="store_true", help="skip the live particle-filtering runs")
    args = ap.parse_args()
    quick(args)
    t0 = time.perf_counter()
    runs = draw(args)
    fit_rows, report_rows = {}, {}
    with Store(args.workspace) as store:
        for d in runs:
            scorers = {}
            for metric in METRICS:
                prm = ConfidenceScorer(metric=metric)
                score_samples(store, d.run_id, prm)
                scorers[metric] = store.step_scores(d.run_id, scorer_name(prm, "\n"))
            if args.judge:
                from testtime.engines.llamacpp import LlamaCppEngine
                from testtime.rewards.judge import JudgePRM

                judge_engine = LlamaCppEngine(model=d.model, slots=16, max_prefixes=32)
                try:
                    prm = JudgePRM(judge_engine)
                    score_samples(store, d.run_id, prm, limit=args.n)
                    scorers["judge"] = store.step_scores(d.run_id, scorer_name(prm, "\n"))
                finally:
                    judge_engine.close()
            arms = {"majority": (None, "vote", 1.0), "pass@N (ceiling)": (None, "pass", 1.0)}
            for metric, sc in scorers.items():
                for method, eta in SELECTIONS:
                    if metric == "judge" and method != "weighted":
                        continue
                    name = {"weighted": "weighted vote", "naive": "best single"}.get(method, f"top {eta:.0%} vote")
                    arms[f"{name} ({metric})"] = (sc, method, eta)
            for half, ids, rows in (("fit", d.fit, fit_rows), ("report", d.report, report_rows)):
                for name, (sc, method, eta) in arms.items():
                    rows.setdefault(name, []).append(per_problem(store, d.run_id, ids, sc, method, eta, args.n))
            print(f"{d.task}: {len(d.fit)} fit / {len(d.report)} report problems", flush=True)
    fit = {k: np.concatenate(v) for k, v in fit_rows.items()}
    cost: dict[str, list[float]] = {}  # a live arm's generated tokens over majority's, on the fit half
    if not args.no_particles:
        # the confidence measure whose best selection did best on the fit half steers the filter
        metric = max(METRICS, key=lambda m: max(fit[k].mean() for k in fit if k.endswith(f"({m})")))
        signals = [("confidence", {"metric": metric})] + ([("judge", {})] if args.judge else [])
        with Store(args.workspace) as store:
            for prm, prm_args in signals:
                name = f"particle filtering ({metric if prm == 'confidence' else prm})"
                for d in runs:
                    halves = ((d.report, report_rows),) if args.quick else ((d.fit, fit_rows), (d.report, report_rows))
                    for ids, rows in halves:
                        got, spent = particle_run(store, d, ids, args.n, prm, prm_args)
                        if rows is fit_rows:
                            cost.setdefault(name, []).append(spent)
                        mine = [pid for pid in ids if pid in got]
                        rows.setdefault(name, []).append(np.asarray([got[pid] for pid in mine]))
                        # majority over the same problems, for a paired difference
                        rows.setdefault(f"majority, {name} problems", []).append(
                            per_problem(store, d.run_id, mine, None, "vote", 1.0, args.n))
        fit = {k: np.concatenate(v) for k, v in fit_rows.items()}
    rep = {k: np.concatenate(v) for k, v in report_rows.items()}
    print(f"\naccuracy at N={args.n} (95% bootstrap interval over problems); fit half | report half")
    for name in rep:
        if name.startswith("majority, "):
            continue
        lo, hi = interval(rep[name])
        left = f"{fit[name].mean():.3f}" if name in fit else "  -  "
        print(f"  {name:<34} {left} | {rep[name].mean():.3f} [{lo:.3f}, {hi:.3f}]")
    for name in [k for k in rep if k.startswith("particle")]:
        gain = rep[name] - rep[f"majority, {name} problems"]
        lo, hi = interval(gain)
        print(f"  {name}: gain over majority on the report half {gain.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")
    candidates = [k for k in fit if k not in ("majority", "pass@N (ceiling)") and not k.startswith("majority, ")]

    # a tie on the fit half goes to the arm that generated fewer tokens there (the stored-sample
    # selectors all spend majority's), then to one that needs no judge, then to the one listed first
    def rank(k: str) -> tuple:
        spent = float(np.mean(cost.get(k, [1.0])))
        return round(float(fit[k].mean()), 6), -spent, "judge" not in k, -candidates.index(k)

    best = max(candidates, key=rank)
    gain = rep[best] - rep[f"majority, {best} problems" if best.startswith("particle") else "majority"]
    lo, hi = interval(gain)
    print(f"\nchosen on the fit half: {best} ({fit[best].mean():.3f} vs majority {fit['majority'].mean():.3f}); "
          f"on the report half its gain over majority is {gain.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] "
          f"({time.perf_counter() - t0:.0f} s in all)")
    print(f"best={best.replace(' ', '_')} gain_over_majority={gain.mean():.3f}")


if __name__ == "__main__":
    main()
