"""What adaptive stopping saves: tokens of majority@N over tokens of stopping each
problem once its vote is decided, and the accuracy it costs, on held-out problems.

The samples are `_signals.py`'s (embedded model, arithmetic levels 1-5 and GSM8K
training problems, N per problem). Adaptive stopping is replayed on them
(`testtime.adaptive.replay`): a problem's samples are stored in the order of their
random seeds, so reading them in index order until the rule fires is what live
drawing would have done. Rules: Adaptive-Consistency's Beta criterion (threshold
grid) and early-stopping self-consistency's window (window grid). For each rule
the setting is fitted on the fit half (the fewest tokens whose accuracy is within
0.005 of majority@N there) and reported on the other half.

Not measured yet, and said so in the output: DeepConf online (stopping a sample
whose confidence drops, issue 13 part 2) and live adaptive sampling with freed
slots going to undecided problems (part 3's live half); replay gives the samples
and tokens the live version would spend, not its wall time.

Last line, for the better rule at the largest N:

    token_ratio=<x> acc_delta=<y>

    python benchmarks/adaptive_compute.py [--quick] [-n 64] [--per-level 20] [--gsm8k 50]
"""

from __future__ import annotations

import argparse

import numpy as np

from _signals import add_args, draw, quick
from testtime.adaptive import StopRule, replay
from testtime.store import Store

GRID = [StopRule("beta", threshold=t) for t in (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)] \
    + [StopRule("window", window=w) for w in (2, 3, 4, 5, 6, 8)]


def summarise(rows) -> dict:
    return {"tokens": sum(r.tokens for r in rows), "tokens_all": sum(r.tokens_all for r in rows),
            "samples": np.mean([r.samples for r in rows]), "acc": np.mean([r.correct for r in rows]),
            "acc_all": np.mean([r.correct_all for r in rows])}


def label(rule: StopRule) -> str:
    return f"beta(threshold={rule.threshold})" if rule.rule == "beta" else f"window({rule.window})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    args = ap.parse_args()
    quick(args)
    runs = draw(args)
    budgets = sorted({n for n in (16, 32, 64) if n <= args.n} | {args.n})
    final = None
    with Store(args.workspace) as store:
        for n in budgets:
            fit = {label(r): [] for r in GRID}
            rep = {label(r): [] for r in GRID}
            for d in runs:
                for rule in GRID:
                    fit[label(rule)] += replay(store, d.run_id, rule, n, problems=d.fit)
                    rep[label(rule)] += replay(store, d.run_id, rule, n, problems=d.report)
            print(f"\nN={n}: {len(next(iter(fit.values())))} fit / {len(next(iter(rep.values())))} report problems; "
                  "majority@N vs adaptive stopping (samples per problem, tokens, accuracy)")
            best_of = {}
            for kind in ("beta", "window"):
                options = [(label(r), summarise(fit[label(r)])) for r in GRID if r.rule == kind]
                ok = [(name, s) for name, s in options if s["acc"] - s["acc_all"] >= -0.005]
                name, _ = min(ok or options, key=lambda x: x[1]["tokens"])
                s = summarise(rep[name])
                ratio = s["tokens_all"] / max(1, s["tokens"])
                delta = s["acc"] - s["acc_all"]
                best_of[kind] = (ratio, delta, name)
                print(f"  {kind:<6} fitted {name}: {s['samples']:.1f} of {n} samples, token_ratio {ratio:.2f}, "
                      f"accuracy {s['acc']:.3f} vs majority@{n} {s['acc_all']:.3f} (delta {delta:+.3f})"
                      + ("" if ok else "  [no setting kept accuracy on the fit half; the cheapest shown]"))
            kept = [v for v in best_of.values() if v[1] >= -0.005] or list(best_of.values())
            final = max(kept, key=lambda v: v[0])
    print("\nnot measured: DeepConf online early stopping, and live adaptive sampling (replay only; issue 13)")
    print(f"token_ratio={final[0]:.2f} acc_delta={final[1]:.3f}  ({final[2]}, N={budgets[-1]})")


if __name__ == "__main__":
    main()
