"""Engine throughput against raw batched llama_decode, measured in one run.

Raw: B sequences share one prefilled prompt; each step decodes one token for all
B of them in a single llama_decode. Tokens are fed from a fixed list and no
logits are read, so there is no sampling or bookkeeping at all: the ceiling for
this model, thread count and batch size. Measured in both KV layouts llama.cpp
offers (unified buffer, and one stream per sequence); the faster is the baseline.

Engine: `LlamaCppEngine.generate` drawing B samples per prompt for several
prompts (real sampling, stop conditions, slot refills), timed end to end
including prefill.

Prompts are few-shot arithmetic problems of all five levels; "unique prompt
tokens" is the summed length of the distinct prompts, so sharing the few-shot
examples across problems shows as a prefill_ratio below 1.

Last line: ratio=<engine tok/s / raw tok/s> prefill_ratio=<prompt tokens
computed / unique prompt tokens>.

    python benchmarks/engine_throughput.py [--batch 16] [--prompts 12] [--rounds 2] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from testtime.engines._llama import LlamaModel, default_model_path
from testtime.engines.base import Request
from testtime.engines.llamacpp import LlamaCppEngine
from testtime.prompts import get_template
from testtime.spec import SamplingParams
from testtime.tasks import load_task


def raw_decode(path, batch: int, prompt: list[int], steps: int, unified: bool,
               threads: int | None) -> tuple[int, float]:
    """(tokens, seconds) of bare llama_decode calls at the given batch size."""
    llm = LlamaModel(path, n_ctx=1024 * batch, n_seq=batch, n_threads=threads, kv_unified=unified)
    n = len(prompt)
    llm.decode(np.array(prompt, np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.int32),
               np.zeros(n, np.int8))
    for s in range(1, batch):
        llm.seq_cp(0, s)
    feed = np.random.default_rng(0).integers(1000, 20000, size=(steps, batch)).astype(np.int32)
    seqs = np.arange(batch, dtype=np.int32)
    ones = np.ones(batch, np.int8)
    llm.decode(feed[0], np.full(batch, n, np.int32), seqs, ones)  # applies the copies; not timed
    t = time.perf_counter()
    for i in range(1, steps):
        llm.decode(feed[i], np.full(batch, n + i, np.int32), seqs, ones)
    dt = time.perf_counter() - t
    llm.close()
    return batch * (steps - 1), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=12, help="prompts per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    path = default_model_path()

    task = load_task("arithmetic", levels=(1, 2, 3, 4, 5))
    tmpl = get_template(task.template)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    problems = task.problems(args.prompts * args.rounds + 1)
    reqs = [Request(key=p.id, messages=tuple(tmpl.messages(p.question)), params=params,
                    seeds=tuple(range(i * 1000, i * 1000 + args.batch))) for i, p in enumerate(problems)]

    engine = LlamaCppEngine(slots=args.batch, n_threads=args.threads)
    list(engine.generate(reqs[-1:]))  # warm-up: page in the weights, build the graphs once
    engine.drop_cache()
    prompt = engine.prefix_tokens(reqs[0])

    # Interleave the three measurements round by round, so that a slow spell of
    # a shared machine hits all of them alike; totals are summed over rounds.
    totals = {"unified": [0, 0.0], "split": [0, 0.0], "engine": [0, 0.0]}
    unique = computed = requested = 0
    for r in range(args.rounds):
        for name, unified in (("unified", True), ("split", False)):
            tokens, secs = raw_decode(path, args.batch, prompt, args.max_tokens, unified, args.threads)
            totals[name][0] += tokens
            totals[name][1] += secs
        batch = reqs[r * args.prompts:(r + 1) * args.prompts]
        unique += sum(len(engine.prefix_tokens(q)) for q in batch)
        engine.drop_cache()  # each round pays for its own prefill
        engine.reset_stats()
        t = time.perf_counter()
        totals["engine"][0] += sum(c.completion_tokens for c in engine.generate(batch))
        totals["engine"][1] += time.perf_counter() - t
        computed += engine.stats["prompt_computed"]
        requested += engine.stats["prompt_tokens"]
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[0] / v[1]:.1f} tok/s" for k, v in totals.items()), flush=True)
    engine.close()

    tps = {k: v[0] / v[1] for k, v in totals.items()}
    raw = max(tps["unified"], tps["split"])
    print(f"model: {path.name}  batch: {args.batch}  rounds: {args.rounds} x {args.prompts} prompts  "
          f"max_tokens: {args.max_tokens}  temperature: {args.temperature}  top_p: {args.top_p}")
    print(f"raw llama_decode, unified KV:      {tps['unified']:8.1f} tok/s")
    print(f"raw llama_decode, per-sequence KV: {tps['split']:8.1f} tok/s")
    print(f"engine: {totals['engine'][0]} tokens in {totals['engine'][1]:.1f} s = {tps['engine']:8.1f} tok/s "
          f"(end to end: prefill, sampling, refills, tail)")
    print(f"prompt tokens: asked for by samples {requested}, unique {unique}, computed {computed}")
    print(f"ratio={tps['engine'] / raw:.3f} prefill_ratio={computed / unique:.3f}")


if __name__ == "__main__":
    main()
