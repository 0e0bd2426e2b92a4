"""A verifier learned from the embedded model's own rollouts, judged on problems it never saw.

On the embedded model (SmolLM2-135M), arithmetic levels 1-3 (the problems of
`make run`; at levels 4-5 it almost never answers, so there is nothing to select):

1. **Train problems** (task seed 1): `--train-n` samples each, and Monte Carlo step
   labels (`testtime label`, m rollouts from each step's prefix) for up to
   `--label-max` of those samples.
2. **A verifier** (`testtime train-verifier`): logistic regression on the frozen
   model's hidden states at each step's end (the final ones, or with `--layer` a
   block's residual stream; with `--feature-model` another frozen model's, such as
   gemma3-270m reading the 135M policy's solutions), fitted to the soft labels, plus the
   last step of every other graded training sample labelled by its verdict. The
   fit (pooled or within-problem), the regularisation and the decision threshold
   come from cross-validation grouped by problem on the training problems only; any training problem whose text also
   occurs among the held-out problems is left out. `--train-also SEED:PER_LEVEL` adds an earlier held-out set
   (drawn and labelled as `--eval-seed SEED --per-level PER_LEVEL` drew it) to the training sets;
   `--outcomes mixed` keeps outcome labels only on problems with both verified and failed samples, and
   `--outcomes-per-problem K` at most K of them per problem and set.
3. **Held-out problems** (task seed 0, or `--eval-seed`): N samples each, step labels for up to
   `--eval-label-max` of them, and:
   - step metrics of the verifier against those labels: step accuracy, macro F1
     (good and bad steps' F1 averaged), AUC, and ProcessBench's first-error
     accuracy;
   - how well the last step's score ranks each problem's N samples by their
     verdict (within-problem AUC over every held-out sample, not only the labelled
     ones): the ranking that selection depends on;
   - selection at N: majority vote, best-of-N with the trained verifier weighted
     (each answer's scores summed) and naive (the top-scored sample), weighted
     best-of-N with the judge PRM (the same model asked "is this step correct?"),
     and pass@N, each the expectation over N-subsets of the drawn samples, with a
     95% bootstrap interval over problems, and the paired difference from majority
     with the problems won and lost;
   - beam search (width 4) steered by the trained verifier, live, at `--beam-n`;
   - with `--compute-ratio`: `compute_optimal.py --prm-path` with the trained
     verifier as its reward model (levels 1-5 seed 0; checked for overlap; its
     own budget sweep, long);
   - with `--against FILE`: a second verifier's best-of-N on the same samples, and the
     paired difference between the two.

Last line: `step_f1=<x> bon_gain=<y> compute_ratio=<z>`; bon_gain is trained-verifier
weighted best-of-N minus majority at N on held-out problems (its paired 95% interval,
and the naive best-of-N's, are printed above it); compute_ratio is n/a unless
--compute-ratio ran. Quick mode: fewer problems and labels, no judge, no beam search.

    python benchmarks/learned_verifier.py [--quick] [--per-level 10] [--train-per-level 15] [--layer 15 | auto]
                                          [--feature-model gemma3-270m] [--kind finetune [--lora 16]] [--compute-ratio]
                                          [--train-also 6:40 ...] [--outcomes mixed] [--outcomes-per-problem 8]
    python benchmarks/learned_verifier.py --verifier FILE [--eval-seed 6] [--beam-n 8]   # evaluate a stored one
                                          [--against OTHER_FILE]                        # ... paired with another
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from selection_signals import interval, per_problem
from testtime import SamplingParams, api
from testtime.analysis import graded_samples, selected
from testtime.engines.llamacpp import LlamaCppEngine
from testtime.learned import problem_key, verifier_header, within_auc
from testtime.rewards.judge import JudgePRM
from testtime.rewards.trained import TrainedPRM
from testtime.runner import score_samples, scorer_name
from testtime.store import Store

LEVELS = [1, 2, 3]
MAX_TOKENS = 128


def sample(workspace, seed, per_level, n):
    t = time.perf_counter()
    run = api.sample("arithmetic", n=n, limit=len(LEVELS) * per_level, task_args={"levels": LEVELS, "seed": seed},
                     workspace=workspace, params=SamplingParams(max_tokens=MAX_TOKENS))
    print(f"arithmetic seed {seed}: run {run.run_id}, {len(LEVELS) * per_level} problems x {n} samples "
          f"({run.drawn} drawn now, {time.perf_counter() - t:.0f} s)", flush=True)
    return run.run_id


def label(workspace, run_id, m, max_samples):
    res = api.label(run_id, m, max_samples=max_samples, workspace=workspace)
    u = res.usage
    print(f"labels for run {run_id}: {res.total} samples ({res.labelled} now), {res.rollouts} rollouts now, "
          f"{u.decode:,} tokens generated, {u.prefill:,} prompt tokens computed ({res.seconds:.0f} s)", flush=True)
    return res.labeler


def ranking(store, run_id, ids, scores, n):
    """How well the last step's score ranks one problem's first n samples by their verdict
    (the within-problem AUC, on every held-out sample, not only the step-labelled ones), and
    on how many problems it can matter (some right and some wrong samples)."""
    graded = graded_samples(store, run_id, "math_answer")
    p, y, g = [], [], []
    for k, pid in enumerate(ids):
        for i, _, ok in sorted(graded.get(pid, [])):
            if i < n:
                p.append((scores.get((pid, i)) or [0.0])[-1])
                y.append(bool(ok))
                g.append(k)
    p, y, g = np.asarray(p), np.asarray(y), np.asarray(g)
    mixed = sum(1 for k in np.unique(g) if 0 < y[g == k].mean() < 1)
    return within_auc(p, y, g), mixed


def unseen(path, ws, eval_run):
    """The meta and threshold of a verifier file, refused if it was trained on any held-out problem."""
    m, threshold = verifier_header(path)
    with Store(ws) as store:
        held = {problem_key(p["question"]) for p in store.problems(eval_run)}
    if set(m["train_problems"]) & held:
        raise SystemExit(f"{path} was trained on {len(set(m['train_problems']) & held)} of the held-out problems "
                         f"(run {eval_run}); its figures would flatter it")
    print(f"verifier {Path(path).name} ({m.get('kind', 'probe')} on {m['features']['model'].get('model')}), trained "
          f"on {len(m['train_problems'])} problems, none of the {len(held)} held out; threshold {threshold:.3f}",
          flush=True)
    return m, threshold


def trained_scores(store, run_id, path, n, who="trained verifier"):
    """Every held-out sample's step scores by a verifier file (stored, so a second call reads them back)."""
    prm = TrainedPRM(path)
    t = time.perf_counter()
    try:
        score_samples(store, run_id, prm, "\n", limit=n)
        name = scorer_name(prm, "\n")
    finally:
        prm.close()
    print(f"{who} scored the held-out samples: {prm.usage.prefill:,} prompt tokens computed "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    return store.step_scores(run_id, name)


def plural(k, noun):
    return f"{k} {noun}" + ("" if k == 1 else "s")


def row(name, values):
    lo, hi = interval(values)
    print(f"{name:34s} {values.mean():.3f}   [{lo:.3f}, {hi:.3f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 held-out and 8 training problems per level, smaller "
                    "label sets, no judge, no beam search (about 10 minutes on 2 cores)")
    ap.add_argument("--per-level", type=int, default=10, help="held-out problems per level")
    ap.add_argument("--train-per-level", type=int, default=15, help="training problems per level")
    ap.add_argument("-n", type=int, default=16, help="samples per held-out problem (the N of best-of-N)")
    ap.add_argument("--train-n", type=int, default=8, help="samples per training problem")
    ap.add_argument("-m", type=int, default=4, help="rollouts per step for the labels")
    ap.add_argument("--label-max", type=int, default=150, help="training samples given step labels")
    ap.add_argument("--eval-label-max", type=int, default=50, help="held-out samples given step labels")
    ap.add_argument("--beam-n", type=int, default=8, help="beam search budget (0: skip)")
    ap.add_argument("--no-judge", action="store_true", help="skip best-of-N with the judge PRM")
    ap.add_argument("--compute-ratio", action="store_true", help="also run compute_optimal.py with the trained "
                    "verifier (its full mode: about an hour more)")
    ap.add_argument("--eval-seed", type=int, default=0, help="task seed of the held-out problems (0: the problems "
                    "of the other benchmarks; the training problems are seed 1)")
    ap.add_argument("--layer", action="append", default=[], help="features from this block's residual stream "
                    "(repeatable; 'auto': the block that cross-validates best on the training problems; default: "
                    "the final hidden state)")
    ap.add_argument("--feature-model", default=None, help="the frozen model whose states are the features (GGUF "
                    "file, or gemma3-270m; default: the policy, smollm2-135m); the policy stays smollm2-135m")
    ap.add_argument("--kind", choices=("probe", "finetune"), default="probe", help="probe: logistic regression on "
                    "a frozen model's states; finetune: the policy's weights fine-tuned with a value head (torch)")
    ap.add_argument("--epochs", type=int, default=3, help="finetune: epochs (the best on the dev problems is kept)")
    ap.add_argument("--lr", type=float, default=2e-5, help="finetune: learning rate of the body")
    ap.add_argument("--lora", type=int, default=0, help="finetune: train LoRA adapters of this rank instead of "
                    "the body's weights")
    ap.add_argument("--train-also", action="append", default=[], metavar="SEED:PER_LEVEL",
                    help="also train on an earlier held-out set, drawn and labelled as --eval-seed SEED --per-level "
                         "PER_LEVEL would draw it (-n samples, --eval-label-max labelled); repeatable")
    ap.add_argument("--outcomes", choices=("all", "mixed", "none"), default="all", help="which unlabelled graded "
                    "samples also teach the verifier (their last step, by verdict): all, only those of problems "
                    "with both verified and failed samples, or none")
    ap.add_argument("--outcomes-per-problem", type=int, default=0, help="at most this many of them per problem and "
                    "run (0: all)")
    ap.add_argument("--verifier", default=None, help="evaluate this trained verifier file (either kind) instead "
                    "of training one; refused if it saw any held-out problem")
    ap.add_argument("--against", default=None, metavar="FILE", help="also score the held-out samples with this "
                    "verifier file and print the paired difference in best-of-N (refused if it saw any held-out "
                    "problem)")
    ap.add_argument("--workspace", default=None)
    args = ap.parse_args()
    if args.verifier and (args.layer or args.feature_model or args.kind != "probe" or args.lora):
        raise SystemExit("--verifier evaluates a file as it was trained; --layer, --feature-model, --kind and --lora "
                         "choose how to train one")
    try:
        also = [tuple(int(x) for x in a.split(":")) for a in args.train_also]
    except ValueError:
        raise SystemExit(f"--train-also takes SEED:PER_LEVEL, got {args.train_also}") from None
    if any(len(a) != 2 or a[1] < 1 for a in also):
        raise SystemExit(f"--train-also takes SEED:PER_LEVEL with PER_LEVEL >= 1, got {args.train_also}")
    if args.eval_seed in {a[0] for a in also}:
        raise SystemExit(f"--eval-seed {args.eval_seed} is among the training sets' seeds")
    if args.verifier and (also or args.outcomes != "all" or args.outcomes_per_problem):
        raise SystemExit("--train-also, --outcomes and --outcomes-per-problem choose how to train a verifier; "
                         "--verifier evaluates one as it was trained")
    if args.lora and args.kind != "finetune":
        raise SystemExit("--lora is a way to fine-tune: add --kind finetune")
    if args.quick:
        args.per_level, args.train_per_level, args.label_max, args.eval_label_max = 5, 8, 80, 30
        args.beam_n, args.no_judge = 0, True
    if "auto" in args.layer and len(args.layer) > 1:
        raise SystemExit("--layer auto chooses one block; give it alone")
    try:
        layers = "auto" if args.layer == ["auto"] else [int(x) for x in args.layer]
    except ValueError:
        raise SystemExit(f"--layer takes block numbers or 'auto', got {args.layer}") from None
    t0 = time.perf_counter()
    ws = args.workspace
    # a stored verifier file names its own training problems: no training run is needed then
    train_run = None if args.verifier else sample(ws, 1, args.train_per_level, args.train_n)
    if args.eval_seed == 1:
        raise SystemExit("--eval-seed 1 is the training problems' seed")
    also_runs = [sample(ws, seed, per_level, args.n) for seed, per_level in also]
    eval_run = sample(ws, args.eval_seed, args.per_level, args.n)
    if not args.verifier:
        label(ws, train_run, args.m, args.label_max)
        for run in also_runs:
            label(ws, run, args.m, args.eval_label_max)
    label(ws, eval_run, args.m, args.eval_label_max)

    with Store(ws) as store:
        root = Path(store.workspace)
    tag = "".join(f"-l{i}" for i in args.layer)
    if args.feature_model:
        tag += "-" + Path(args.feature_model).stem
    if args.kind == "finetune":
        if layers:
            raise SystemExit("--layer chooses a frozen model's features; --kind finetune reads the last hidden state")
        tag += f"-ft-e{args.epochs}-lr{args.lr:g}" + (f"-lora{args.lora}" if args.lora else "")
    if also:
        tag += "-also" + "-".join(f"{seed}x{per_level}" for seed, per_level in also)
    if args.outcomes != "all" or args.outcomes_per_problem:
        tag += f"-out{args.outcomes}{args.outcomes_per_problem or ''}"
    suffix = ".safetensors" if args.kind == "finetune" else ".npz"
    path = root / f"verifier-{train_run}-not-{eval_run}{tag}{suffix}"  # one per held-out set: none overwrites another
    t = time.perf_counter()
    if args.against:
        unseen(args.against, ws, eval_run)
    if args.verifier:
        path = Path(args.verifier)
        m, _ = unseen(path, ws, eval_run)
    elif args.kind == "finetune":
        v = api.train_verifier([train_run, *also_runs], path, exclude=[eval_run], force=True,
                               model=args.feature_model, kind="finetune", outcomes=args.outcomes,
                               outcomes_per_problem=args.outcomes_per_problem, workspace=ws,
                               finetune={"epochs": args.epochs, "lr": args.lr, "lora": args.lora},
                               log=lambda line: print("  " + line, flush=True))
        m = v.meta
        print(f"verifier {path.name}: {m['features']['model'].get('model')} fine-tuned with a value head on "
              f"{m['train_steps']} steps of {m['train_solutions'] + m['dev_solutions']} solutions on "
              f"{len(m['train_problems'])} problems ({m['good_steps']} good steps; {m['dropped_problems']} training "
              f"problems dropped as they are among the {m['excluded_problems']} held out); epoch "
              f"{m['chosen_epoch']} of {len(m['epochs'])} kept by the {len(m['dev_problems'])} dev problems' "
              f"within-problem AUC {m['dev_within_auc']:.3f}, threshold {v.threshold:.3f}, dev step accuracy "
              f"{m['dev_step_accuracy']:.3f}, macro F1 {m['dev_step_f1']:.3f} ({time.perf_counter() - t:.0f} s)",
              flush=True)
    else:
        v = api.train_verifier([train_run, *also_runs], path, exclude=[eval_run], force=True, layers=layers,
                               model=args.feature_model, outcomes=args.outcomes,
                               outcomes_per_problem=args.outcomes_per_problem, workspace=ws)
        m = v.meta
    chosen = m["features"].get("layers")
    if args.kind == "probe" and not args.verifier:
        print(f"verifier {path.name}: features of {m['features']['model'].get('model')}"
              f"{f' block {chosen}' if chosen else ''}; {m['train_steps']} steps of {m['train_solutions']} solutions on "
              f"{len(m['train_problems'])} problems ({m['good_steps']} good steps; {m['dropped_problems']} training "
              f"problems dropped as they are among the {m['excluded_problems']} held out), {m['fit']} fit, "
              f"C={m['c']}, threshold {v.threshold:.3f}; cross-validated: step accuracy {m['cv_step_accuracy']:.3f}, "
              f"macro F1 {m['cv_step_f1']:.3f}, AUC {m['cv_auc']:.3f}, within problems {m['cv_within_auc']:.3f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        for name, figs in m["cv"].items():
            print(f"  cv {name}: within-problem AUC {figs['within_auc']:.3f}, log loss {figs['log_loss']:.3f}")

    r = api.eval_verifier(path, eval_run, workspace=ws)
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"held-out steps: {r['steps']} of {r['solutions']} solutions on {r['problems']} problems "
          f"({r['good_steps']} good; {r['seen_problems_left_out']} seen problems left out): step accuracy "
          f"{fmt(r['step_accuracy'])}, macro F1 {fmt(r['step_f1'])} (good {fmt(r['step_f1_good'])}, bad "
          f"{fmt(r['step_f1_bad'])}), AUC {fmt(r['auc'])} (within problems {fmt(r.get('within_auc'))}); "
          f"first error: {fmt(r['first_error_acc_erroneous'])} on "
          f"solutions with one, {fmt(r['first_error_acc_correct'])} on those without, F1 {fmt(r['first_error_f1'])}",
          flush=True)

    with Store(ws) as store:
        ids = [p["problem_id"] for p in store.problems(eval_run)][:len(LEVELS) * args.per_level]
        scores = trained_scores(store, eval_run, path, args.n)
        auc, mixed = ranking(store, eval_run, ids, scores, args.n)
        print(f"trained verifier, last step vs verdict on all held-out samples: within-problem AUC {fmt(auc)} "
              f"over the {mixed} problems with right and wrong samples", flush=True)
        table = {
            "majority": per_problem(store, eval_run, ids, None, "vote", 1.0, args.n),
            "trained, weighted best-of-N": per_problem(store, eval_run, ids, scores, "weighted", 1.0, args.n),
            "trained, naive best-of-N": per_problem(store, eval_run, ids, scores, "naive", 1.0, args.n),
        }
        if args.against:
            other = trained_scores(store, eval_run, args.against, args.n, "--against verifier")
            auc, _ = ranking(store, eval_run, ids, other, args.n)
            print(f"--against verifier, last step vs verdict on all held-out samples: within-problem AUC {fmt(auc)}",
                  flush=True)
            table["--against, weighted best-of-N"] = per_problem(store, eval_run, ids, other, "weighted", 1.0, args.n)
            table["--against, naive best-of-N"] = per_problem(store, eval_run, ids, other, "naive", 1.0, args.n)
        if not args.no_judge:
            engine = LlamaCppEngine(slots=16, max_prefixes=32)
            judge = JudgePRM(engine)
            t = time.perf_counter()
            score_samples(store, eval_run, judge, "\n", limit=args.n)
            jscores = store.step_scores(eval_run, scorer_name(judge, "\n"))
            print(f"judge scored the held-out samples ({time.perf_counter() - t:.0f} s)", flush=True)
            engine.close()
            table["judge PRM, weighted best-of-N"] = per_problem(store, eval_run, ids, jscores, "weighted", 1.0, args.n)
        table["pass@N (ceiling)"] = per_problem(store, eval_run, ids, None, "pass", 1.0, args.n)

    beam = None
    if args.beam_n:
        t = time.perf_counter()
        res = api.sample("arithmetic", n=args.beam_n, limit=len(LEVELS) * args.per_level,
                         task_args={"levels": LEVELS, "seed": args.eval_seed},
                         strategy="beam_search", strategy_args={"width": 4, "max_steps": 4, "step_tokens": 48},
                         prm="trained", prm_args={"path": str(path)}, params=SamplingParams(max_tokens=MAX_TOKENS),
                         workspace=ws)
        with Store(ws) as store:
            got = selected(store, res.run_id, "math_answer")
        beam = np.asarray([got[p][0] for p in ids if p in got])
        print(f"beam search (trained verifier, N={args.beam_n}, width 4): run {res.run_id} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)

    print(f"\nheld-out accuracy, {len(ids)} problems, N={args.n} (95% bootstrap intervals over problems)")
    for name, values in table.items():
        row(name, values)
    if beam is not None:
        row(f"beam search, trained (N={args.beam_n})", beam)
    for kind in ("naive", "weighted"):
        diff = table[f"trained, {kind} best-of-N"] - table["majority"]
        lo, hi = interval(diff)
        print(f"trained {kind} best-of-N minus majority: {diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] (paired; "
              f"won on {plural((diff > 0).sum(), 'problem')}, lost on {(diff < 0).sum()})")
    if args.against:
        for kind in ("naive", "weighted"):
            diff = table[f"trained, {kind} best-of-N"] - table[f"--against, {kind} best-of-N"]
            lo, hi = interval(diff)
            print(f"trained minus --against, {kind} best-of-N: {diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] (paired; "
                  f"ahead on {plural((diff > 0).sum(), 'problem')}, behind on {(diff < 0).sum()})")
    gain = table["trained, weighted best-of-N"] - table["majority"]

    ratio = "n/a"
    if args.compute_ratio:
        cmd = [sys.executable, str(Path(__file__).parent / "compute_optimal.py"), "--prm-path", str(path)]
        if ws:
            cmd += ["--workspace", ws]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        print(out.stdout[-3000:], end="")
        last = [ln for ln in out.stdout.splitlines() if ln.startswith("compute_ratio=")]
        ratio = last[-1].split("=", 1)[1].split()[0] if last else f"failed ({out.returncode})"
    print(f"total {time.perf_counter() - t0:.0f} s")
    print(f"step_f1={fmt(r['step_f1'])} bon_gain={gain.mean():+.3f} compute_ratio={ratio}")


if __name__ == "__main__":
    main()
