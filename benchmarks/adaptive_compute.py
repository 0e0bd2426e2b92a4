"""What adaptive stopping saves: tokens of majority@N over tokens of stopping each
problem once its vote is decided, and the accuracy it costs, on held-out problems.

The samples are `_signals.py`'s (embedded model, arithmetic levels 1-5 (`--levels`) and GSM8K
training problems, N per problem). Adaptive stopping is replayed on them
(`testtime.adaptive.replay`): a problem's samples are stored in the order of their
random seeds, so reading them in index order until the rule fires is what live
drawing would have done. Rules: Adaptive-Consistency's Beta criterion (threshold
grid), the same with a futility boundary (threshold x leader-share grid: a problem
also stops once its leading answer's share is surely below the share; see
`testtime.adaptive`), and early-stopping self-consistency's window (window grid).
For each rule the setting is fitted on the fit half (the fewest tokens whose
accuracy is within 0.005 of majority@N there) and reported on the other half.

Then, live, on the report half at the largest N, each against majority@N on the
same problems (the stored run's first N samples; the live runs draw with the same
seeds, though llama.cpp's batched arithmetic can make a sample's text differ when
its batch does):

  - `adaptive_consistency` with the Beta rule and futility boundary fitted above
    (requests of 2 samples in one stream; a decided problem's outstanding samples
    cancelled);
  - `deepconf_online` with DeepConf's own settings, not fitted (warm-up 4
    samples, eta 0.9, consensus 0.95): samples whose confidence drops are ended
    by the engine.

Tokens are generated tokens (the problems' decode usage), stopped samples and
samples drawn past a stop included. Each accuracy difference is printed with its
paired 95% bootstrap interval over the report problems, and the problems won and
lost. Last line, for the better of the live
methods (by token ratio, among those within 0.005 of majority's accuracy):

    token_ratio=<x> acc_delta=<y>

    python benchmarks/adaptive_compute.py [--quick] [-n 64] [--per-level 20] [--levels 1 2 3] [--gsm8k 50]
        [--task-seed 0] [--live adaptive_consistency deepconf_online] [--fixed THRESHOLD FUTILITY]
        [--max-ahead K]

With --fixed, nothing is fitted: the Beta rule with that threshold and futility
boundary (chosen on other problems) is replayed, and run live, on every problem
drawn, each a report problem. --max-ahead K runs `adaptive_consistency` live with
at most K samples of a problem out at once (default 0: no limit, the engine's queue
kept full), which spends fewer tokens past each stop. Each live run's wall time
(loading the model, generating, grading) is printed beside its tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _signals import add_args, draw, quick
from selection_signals import interval
from testtime.adaptive import StopRule, replay
from testtime.store import Store

THRESHOLDS = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
GRID = [StopRule("beta", threshold=t) for t in THRESHOLDS] \
    + [StopRule("beta", threshold=t, futility=f) for t in THRESHOLDS for f in (0.2, 0.25, 0.3, 0.35, 0.4)] \
    + [StopRule("window", window=w) for w in (2, 3, 4, 5, 6, 8)]
LIVE = ("adaptive_consistency", "deepconf_online")


def kind(rule: StopRule) -> str:
    return "beta+futility" if rule.futility else rule.rule


def summarise(rows) -> dict:
    return {"tokens": sum(r.tokens for r in rows), "tokens_all": sum(r.tokens_all for r in rows),
            "samples": np.mean([r.samples for r in rows]), "acc": np.mean([r.correct for r in rows]),
            "acc_all": np.mean([r.correct_all for r in rows])}


def label(rule: StopRule) -> str:
    if rule.rule == "window":
        return f"window({rule.window})"
    return f"beta(threshold={rule.threshold}" + (f", futility={rule.futility})" if rule.futility else ")")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    ap.add_argument("--live", nargs="*", default=list(LIVE), choices=LIVE,
                    help="the live runs on the report half at the largest N (none: replay only)")
    ap.add_argument("--fixed", nargs=2, type=float, metavar=("THRESHOLD", "FUTILITY"),
                    help="no fitting: the Beta rule with this threshold and futility share, chosen elsewhere, "
                    "replayed and run live on every problem (all of them are report problems)")
    ap.add_argument("--max-ahead", type=int, default=0, metavar="K",
                    help="live adaptive_consistency: at most K samples of a problem out at once (0: no limit)")
    args = ap.parse_args()
    quick(args)
    runs = draw(args)
    if args.fixed:
        for d in runs:
            d.report, d.fit = d.fit + d.report, []
    budgets = sorted({n for n in (16, 32, 64) if n <= args.n} | {args.n})
    final = None
    with Store(args.workspace) as store:
        for n in budgets:
            if args.fixed:
                fitted_beta = StopRule("beta", threshold=args.fixed[0], futility=args.fixed[1])
                rows = [r for d in runs for r in replay(store, d.run_id, fitted_beta, n, problems=d.report)]
                s = summarise(rows)
                ratio, delta = s["tokens_all"] / max(1, s["tokens"]), s["acc"] - s["acc_all"]
                best_of = {"beta+futility": (ratio, delta, label(fitted_beta))}
                print(f"\nN={n}: {len(rows)} problems, {label(fitted_beta)} fixed beforehand: {s['samples']:.1f} of "
                      f"{n} samples, token_ratio {ratio:.2f}, accuracy {s['acc']:.3f} vs majority@{n} "
                      f"{s['acc_all']:.3f} (delta {delta:+.3f} "
                      f"{paired([r.correct for r in rows], [r.correct_all for r in rows])})")
                continue
            fit = {label(r): [] for r in GRID}
            rep = {label(r): [] for r in GRID}
            for d in runs:
                for rule in GRID:
                    fit[label(rule)] += replay(store, d.run_id, rule, n, problems=d.fit)
                    rep[label(rule)] += replay(store, d.run_id, rule, n, problems=d.report)
            print(f"\nN={n}: {len(next(iter(fit.values())))} fit / {len(next(iter(rep.values())))} report problems; "
                  "majority@N vs adaptive stopping (samples per problem, tokens, accuracy)")
            best_of = {}
            for k in ("beta", "beta+futility", "window"):
                options = [(label(r), summarise(fit[label(r)])) for r in GRID if kind(r) == k]
                ok = [(name, s) for name, s in options if s["acc"] - s["acc_all"] >= -0.005]
                name, _ = min(ok or options, key=lambda x: x[1]["tokens"])
                s = summarise(rep[name])
                ratio = s["tokens_all"] / max(1, s["tokens"])
                delta = s["acc"] - s["acc_all"]
                best_of[k] = (ratio, delta, name)
                print(f"  {k:<13} fitted {name}: {s['samples']:.1f} of {n} samples, token_ratio {ratio:.2f}, "
                      f"accuracy {s['acc']:.3f} vs majority@{n} {s['acc_all']:.3f} (delta {delta:+.3f} "
                      f"{paired([r.correct for r in rep[name]], [r.correct_all for r in rep[name]])})"
                      + ("" if ok else "  [no setting kept accuracy on the fit half; the cheapest shown]"))
            fitted_beta = next(r for r in GRID if label(r) == best_of["beta+futility"][2])
        n = budgets[-1]
        live = {}
        settings = {"adaptive_consistency": {"rule": "beta", "threshold": fitted_beta.threshold,
                                             "futility": fitted_beta.futility, "round": 2,
                                             "max_ahead": args.max_ahead},
                    "deepconf_online": {"warmup": 4, "eta": 0.9, "consensus": 0.95}}
        for method in args.live:
            sargs = settings[method]
            acc, acc_all, tok, tok_all = [], [], 0, 0
            t0 = time.perf_counter()
            for d in runs:
                got = live_run(store, d, method, {"n": n, **sargs})
                base = {r.problem_id: r for r in replay(store, d.run_id, fitted_beta, n, problems=d.report)}
                for pid, (a, toks) in got.items():
                    acc.append(a)
                    tok += toks
                    acc_all.append(base[pid].correct_all)
                    tok_all += base[pid].tokens_all
            wall = time.perf_counter() - t0
            ratio, delta = tok_all / max(1, tok), float(np.mean(acc) - np.mean(acc_all))
            live[method] = (ratio, delta, f"{method} live")
            shown = ""
            if method == "adaptive_consistency":
                shown = f" ({label(fitted_beta)}" + (f", max_ahead {args.max_ahead})" if args.max_ahead else ")")
            print(f"  live {method}{shown}: {tok} tokens vs majority@{n} {tok_all}, token_ratio {ratio:.2f}, accuracy "
                  f"{np.mean(acc):.3f} vs {np.mean(acc_all):.3f} (delta {delta:+.3f} {paired(acc, acc_all)}); "
                  f"{wall:.0f} s", flush=True)
        if not live:  # replay only: the fitted rule with the futility boundary, replayed
            live["replay"] = (*best_of["beta+futility"][:2], f"{best_of['beta+futility'][2]} replayed")
        kept = [v for v in live.values() if v[1] >= -0.005] or list(live.values())
        final = max(kept, key=lambda v: v[0])
    print(f"token_ratio={final[0]:.2f} acc_delta={final[1]:.3f}  ({final[2]}, N={budgets[-1]})")


def paired(acc, acc_all) -> str:
    """The accuracy difference's 95% bootstrap interval over problems, and the problems
    it won and lost."""
    diff = np.asarray(acc, float) - np.asarray(acc_all, float)
    lo, hi = interval(diff)
    return f"[{lo:+.3f}, {hi:+.3f}], {(diff > 1e-9).sum()} won, {(diff < -1e-9).sum()} lost"


def live_run(store, d, method: str, values: dict) -> dict[str, tuple[float, int]]:
    """A live strategy run on the report half: per problem, the accuracy of its
    selected answer and the tokens it generated."""
    from testtime.analysis import selected
    from testtime.engines.llamacpp import LlamaCppEngine
    from testtime.runner import grade, run_strategy
    from testtime.spec import SamplingParams
    from testtime.strategies.base import strategy_params
    from testtime.verifiers.math_answer import MathAnswerVerifier

    task, problems = d.problems(d.report)
    engine = LlamaCppEngine(model=d.model)
    try:
        res = run_strategy(store, task, engine, method, strategy_params(method, values),
                           SamplingParams(max_tokens=d.max_tokens), None, problems=problems)
    finally:
        engine.close()
    grade(store, res.run_id, MathAnswerVerifier())
    usage = store.usage(res.run_id)
    return {pid: (acc, int(usage[pid]["decode"])) for pid, (acc, _) in selected(store, res.run_id, "math_answer").items()}


if __name__ == "__main__":
    main()
