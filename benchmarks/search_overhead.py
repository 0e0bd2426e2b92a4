"""What step-wise search costs over best-of-N, measured in one run on the same problems.

Both strategies run on the embedded model with the same budget N per problem
and the same judge PRM (a second instance of the embedded model), which scores
every step of every candidate in both:

  - best-of-N: N complete samples per problem, then every step scored;
  - beam search: N candidates per iteration, width M, steps split on a newline,
    each iteration scored before the next.

tok_ratio = generated tokens/s of beam search / generated tokens/s of best-of-N,
wall clock including scoring (search-and-learn's published timings imply about
0.05 for its beam search). prefill_ratio = prompt tokens the policy engine
computed during beam search / unique prefix tokens, where the unique prefix
tokens are the nodes of the token trie of every prefix the search asked for.
A continued path's step text was generated, so its KV cells already exist:
the ratio is below 1 when the search reuses them, and 1.0 would mean every
prefix token computed once by prefill.

Both go through the store as runs do (`testtime sample`): best-of-N is a
repeated-sampling run whose samples' steps are then scored into the run; beam
search is a strategy run, stored a problem at a time with its step scores and
usage. The workspace is a temporary folder.

Last line: tok_ratio=<x> prefill_ratio=<y>

    python benchmarks/search_overhead.py [--problems 6] [--n 8] [--width 2] [--iterations 6] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from testtime.engines.llamacpp import LlamaCppEngine
from testtime.rewards.judge import JudgePRM
from testtime.runner import draw_samples, grade, run_strategy, score_samples
from testtime.spec import SamplingParams
from testtime.store import Store
from testtime.strategies import strategy_params
from testtime.tasks import load_task


class Recording:
    """Passes requests to the engine and keeps every prefix it was asked for."""

    def __init__(self, engine: LlamaCppEngine):
        self.engine = engine
        self.prefixes: list[list[int]] = []

    def identity(self):
        return self.engine.identity()

    def shape(self):
        return self.engine.shape()

    def generate(self, requests):
        def tap():
            for r in requests:
                self.prefixes.append(self.engine.prefix_tokens(r))
                yield r
        return self.engine.generate(tap())


def trie_size(prefixes: list[list[int]]) -> int:
    root: dict = {}
    nodes = 0
    for toks in prefixes:
        node = root
        for t in toks:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                nodes += 1
            node = nxt
    return nodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=6)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--width", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--step-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="3 problems (about 3 minutes on 2 cores)")
    args = ap.parse_args()
    if args.quick:
        args.problems = 3

    task = load_task("arithmetic", levels=[3, 4, 5])
    problems = task.problems(args.problems)
    policy = LlamaCppEngine(slots=16, max_prefixes=64)
    prm = JudgePRM(LlamaCppEngine(slots=16, max_prefixes=32))
    beam = strategy_params("beam_search", {"n": args.n, "width": args.width, "max_steps": args.iterations,
                                           "step_tokens": args.step_tokens, "delimiter": "\n"})
    sampling = SamplingParams(temperature=0.7, max_tokens=args.step_tokens * args.iterations)

    results = {}
    with tempfile.TemporaryDirectory() as ws, Store(ws) as store:
        for name in ("best_of_n", "beam_search"):
            policy.drop_cache()
            policy.reset_stats()
            rec = Recording(policy)
            t = time.perf_counter()
            if name == "best_of_n":
                res = draw_samples(store, task, rec, args.n, sampling, limit=args.problems)
                score_samples(store, res.run_id, prm, "\n")
            else:
                res = run_strategy(store, task, rec, "beam_search", beam, sampling, prm, limit=args.problems)
            seconds = time.perf_counter() - t
            grade(store, res.run_id, "math_answer")
            generated = int(sum(u["decode"] for u in store.usage(res.run_id).values()))
            scored = sum(len(v) for s in store.scorers(res.run_id) for v in store.step_scores(res.run_id, s).values())
            unique = trie_size(rec.prefixes)
            s = policy.stats
            results[name] = (generated / seconds, s["prompt_computed"] / unique)
            if name == "best_of_n":
                first_prompts = s["prompt_computed"]
            else:
                print(f"  beyond the problems' own prompts ({first_prompts} tokens), beam search computed "
                      f"{s['prompt_computed'] - first_prompts} prompt tokens for {unique - first_prompts} tokens "
                      f"of continued paths")
            print(f"{name}: {generated} tokens generated in {seconds:.1f} s = {generated / seconds:.1f} tok/s "
                  f"(final candidates' steps scored {scored}); prompt tokens computed {s['prompt_computed']} "
                  f"of {s['prompt_tokens']} asked, unique prefix tokens {unique}; run {res.run_id}")
    tok_ratio = results["beam_search"][0] / results["best_of_n"][0]
    print(f"tok_ratio={tok_ratio:.2f} prefill_ratio={results['beam_search'][1]:.3f}")


if __name__ == "__main__":
    main()
