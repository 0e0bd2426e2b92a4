"""Engine throughput against raw batched llama_decode, measured in one run.

Raw: B sequences share one prefilled prompt; each step decodes one token for all
B of them in a single llama_decode. Tokens are fed from a fixed list and no
logits are read: no sampling or bookkeeping at all, the ceiling for this model,
thread count and batch size. It runs on its own copy of the model in the
faster of llama.cpp's two KV layouts here (one stream per sequence; the
unified buffer is measured too and printed).

Engine: `LlamaCppEngine.generate` drawing B samples per prompt for several
prompts (real sampling, stop conditions, slot refills, prefill, the tail where
the batch drains), timed end to end.

The two are interleaved step by step: whenever the engine hands back a
completion, raw steps are run until they match the engine's decode steps so
far. This machine's speed drifts by a third over minutes; interleaving makes
both sides see the same drift, so the ratio is stable even when absolute
figures are not.

Prompts are few-shot arithmetic problems of all five levels; "unique prompt
tokens" is the summed length of the distinct prompts, so sharing the few-shot
examples across problems shows as a prefill_ratio below 1.

Last line: ratio=<engine tok/s / raw tok/s> prefill_ratio=<prompt tokens
computed / unique prompt tokens>.

    python benchmarks/engine_throughput.py [--batch 16] [--prompts 12] [--max-tokens 128] [--quick]
        [--temperature T --top-k K --top-p P --min-p M]   # default: the engine's default sampler
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


class RawDecoder:
    """B sequences stepping through a fixed token list; wraps back to the prompt
    after `span` tokens so its contexts stay as long as the engine's."""

    def __init__(self, path, batch: int, prompt: list[int], span: int, unified: bool, threads: int | None):
        self.llm = LlamaModel(path, n_ctx=1024 * batch, n_seq=batch, n_threads=threads, kv_unified=unified)
        self.batch, self.n, self.span = batch, len(prompt), span
        self.llm.decode(np.array(prompt, np.int32), np.arange(self.n, dtype=np.int32),
                        np.zeros(self.n, np.int32), np.zeros(self.n, np.int8))
        for s in range(1, batch):
            self.llm.seq_cp(0, s)
        self.feed = np.random.default_rng(0).integers(1000, 20000, size=(span, batch)).astype(np.int32)
        self.seqs = np.arange(batch, dtype=np.int32)
        self.ones = np.ones(batch, np.int8)
        self.i, self.steps, self.seconds = 0, 0, 0.0
        self.step()  # applies the copies; not counted
        self.steps, self.seconds = 0, 0.0

    def step(self) -> None:
        if self.i == self.span:  # start the generations over from the prompt
            for s in range(self.batch):
                self.llm.seq_rm(s, self.n, -1)
            self.i = 0
        t = time.perf_counter()
        self.llm.decode(self.feed[self.i], np.full(self.batch, self.n + self.i, np.int32), self.seqs, self.ones)
        self.seconds += time.perf_counter() - t
        self.steps += 1
        self.i += 1

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.steps / self.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=128)
    d = SamplingParams()  # the engine's default sampler (truncated), unless told otherwise
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--top-p", type=float, default=d.top_p)
    ap.add_argument("--top-k", type=int, default=d.top_k)
    ap.add_argument("--min-p", type=float, default=d.min_p)
    ap.add_argument("--quick", action="store_true", help="6 prompts (about 2 minutes on 2 cores)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seq-ctx", type=int, default=1024, help="engine KV cells per sequence")
    args = ap.parse_args()
    if args.quick:
        args.prompts = 6
    path = default_model_path()

    task = load_task("arithmetic", levels=(1, 2, 3, 4, 5))
    tmpl = get_template(task.template)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            max_tokens=args.max_tokens)
    print(f"sampler: temperature {params.temperature}, top-k {params.top_k}, top-p {params.top_p}, "
          f"min-p {params.min_p}; batch {args.batch}, {args.prompts} prompts, max {args.max_tokens} tokens")
    problems = task.problems(args.prompts + 1)
    reqs = [Request(key=p.id, messages=tuple(tmpl.messages(p.question)), params=params,
                    seeds=tuple(range(i * 1000, i * 1000 + args.batch))) for i, p in enumerate(problems)]

    engine = LlamaCppEngine(slots=args.batch, n_threads=args.threads, seq_ctx=args.seq_ctx)
    list(engine.generate(reqs[-1:]))  # warm-up: page in the weights, build the graphs once
    engine.drop_cache()
    engine.reset_stats()
    reqs = reqs[:-1]
    prompt = engine.prefix_tokens(reqs[0])
    unique = sum(len(p) for p in {tuple(engine.prefix_tokens(r)) for r in reqs})
    split = RawDecoder(path, args.batch, prompt, args.max_tokens, unified=False, threads=args.threads)
    unified = RawDecoder(path, args.batch, prompt, args.max_tokens, unified=True, threads=args.threads)

    tokens, engine_s = 0, 0.0
    t = time.perf_counter()
    for c in engine.generate(reqs):
        engine_s += time.perf_counter() - t
        tokens += c.completion_tokens
        while split.steps < engine.stats["steps"]:
            split.step()
        while unified.steps < engine.stats["steps"] // 4:  # a sparser sample: it is only reported
            unified.step()
        t = time.perf_counter()
    engine_s += time.perf_counter() - t
    stats = dict(engine.stats)
    engine.close()

    engine_tps = tokens / engine_s
    raw = max(split.tokens_per_s, unified.tokens_per_s)
    occupancy = stats["slot_steps"] / max(1, stats["steps"]) / args.batch
    print(f"model: {path.name}  batch: {args.batch}  prompts: {args.prompts}  max_tokens: {args.max_tokens}  "
          f"temperature: {args.temperature}  top_p: {args.top_p}  seq_ctx: {args.seq_ctx}")
    print(f"raw llama_decode, per-sequence KV: {split.tokens_per_s:7.1f} tok/s ({split.steps} steps)")
    print(f"raw llama_decode, unified KV:      {unified.tokens_per_s:7.1f} tok/s ({unified.steps} steps)")
    print(f"engine: {tokens} tokens in {engine_s:.1f} s = {engine_tps:7.1f} tok/s end to end "
          f"(decode steps {stats['decode_s']:.1f} s, prefill {stats['prefill_s']:.1f} s, "
          f"sampling {stats['sample_s']:.1f} s, slot occupancy {occupancy:.3f})")
    print(f"engine decode steps alone: {stats['slot_steps'] / stats['decode_s']:7.1f} tok/s")
    print(f"prompt tokens: asked for by samples {stats['prompt_tokens']}, unique {unique}, "
          f"computed {stats['prompt_computed']}")
    print(f"ratio={engine_tps / raw:.3f} prefill_ratio={stats['prompt_computed'] / unique:.3f}")


if __name__ == "__main__":
    main()
