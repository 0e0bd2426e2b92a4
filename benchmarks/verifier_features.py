"""What a trained verifier's features cost, against raw prefill of the same tokens.

A trained verifier (`testtime train-verifier`, `--prm trained`) reads the frozen
model's hidden states at each step of a solution: the final hidden state
(`embeddings=True`) or, with `--layer`, a block's residual stream, copied out by
llama.cpp's eval callback (`engines._llama._LayerObserver`). Both cost one forward
pass over the solution's tokens; this script measures what they add to it.

Solutions: the embedded model's own samples of arithmetic problems (levels 1-3,
drawn here into a scratch workspace unless `--workspace` holds them already).
Per solution, in rotation (so this machine's drift hits every side alike):

- raw: one `llama_decode` of the solution's tokens after its cached question, on a
  bare context, with no outputs asked for (the forward pass alone);
- final: `HiddenStates().features` (the final hidden state of every token);
- layer: `HiddenStates(layers=[L]).features`;
- auto: `HiddenStates(layers=auto_layers(n))` (what `--layer auto` reads in one pass).

Each prints tokens per second; the last line is `final_ratio=<raw s / final s>
layer_ratio=<raw s / layer s> auto_ratio=<raw s / auto s>` (1.0: nothing beyond the forward
pass; 0.5: twice raw's time).

    python benchmarks/verifier_features.py [--quick] [--problems 30] [--layer 7]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from testtime import SamplingParams, api
from testtime.engines._llama import LlamaModel, default_model_path
from testtime.flops import ModelShape
from testtime.learned import HiddenStates, auto_layers
from testtime.store import Store


def solutions(workspace, problems, n):
    run = api.sample("arithmetic", n=n, limit=problems, task_args={"levels": [1, 2, 3], "seed": 5},
                     workspace=workspace, params=SamplingParams(max_tokens=128))
    out = []
    with Store(workspace) as store:
        questions = {p["problem_id"]: p["question"] for p in store.problems(run.run_id)}
        for s in store.samples(run.run_id):
            steps = [x for x in s.text.split("\n") if x.strip()]
            if steps:
                out.append((questions[s.problem_id], steps))
    return out


class Raw:
    """The forward pass alone: the question once into sequence 0, then each solution's
    tokens into sequence 1 (copied from 0) with no outputs."""

    def __init__(self, tokens_of):
        self.llm = LlamaModel(default_model_path(), n_ctx=2048, n_seq=2)
        self.tokens_of = tokens_of
        self.head = None

    def run(self, question, steps):
        head, full = self.tokens_of(question, steps)
        computed = len(full) - len(head)
        if head != self.head:
            computed = len(full)
            self.llm.seq_rm(0)
            self.llm.decode(np.asarray(head, np.int32), np.arange(len(head), dtype=np.int32),
                            np.zeros(len(head), np.int32), np.zeros(len(head), np.int8))
            self.head = head
        self.llm.seq_rm(1)
        self.llm.seq_cp(0, 1)
        rest = full[len(head):]
        self.llm.decode(np.asarray(rest, np.int32), np.arange(len(head), len(full), dtype=np.int32),
                        np.ones(len(rest), np.int32), np.zeros(len(rest), np.int8))
        return computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 problems x 4 samples (a few minutes)")
    ap.add_argument("--problems", type=int, default=30)
    ap.add_argument("-n", type=int, default=8, help="samples per problem")
    ap.add_argument("--layer", type=int, default=7)
    ap.add_argument("--workspace", default=None, help="where the solutions are drawn (default: a scratch folder)")
    args = ap.parse_args()
    if args.quick:
        args.problems, args.n = 10, 4
    scratch = tempfile.TemporaryDirectory() if args.workspace is None else None
    ws = args.workspace or scratch.name
    t = time.perf_counter()
    sols = solutions(ws, args.problems, args.n)
    print(f"{len(sols)} solutions of {args.problems} problems ({time.perf_counter() - t:.0f} s to draw or read)")

    n_layer = ModelShape.from_gguf(default_model_path()).n_layers
    feats = {"final": HiddenStates(), "layer": HiddenStates(layers=[args.layer]),
             "auto": HiddenStates(layers=auto_layers(n_layer))}
    probe = feats["final"]

    def tokens_of(question, steps):
        return probe._tokens(question, ""), probe._tokens(question, "\n".join(steps))

    raw = Raw(tokens_of)
    sides = {"raw": lambda q, s: raw.run(q, s)}
    for name, f in feats.items():
        sides[name] = lambda q, s, f=f: (f.features(q, s, "\n"), f.last_usage.prefill)[1]
    for q, s in sols[:2]:  # warm-up: first decodes allocate buffers
        for fn in sides.values():
            fn(q, s)
    secs = dict.fromkeys(sides, 0.0)
    toks = dict.fromkeys(sides, 0)
    for q, s in sols:
        for name, fn in sides.items():
            t = time.perf_counter()
            toks[name] += fn(q, s)
            secs[name] += time.perf_counter() - t
    for name in sides:
        extra = {"layer": f" (block {args.layer})", "auto": f" (blocks {list(auto_layers(n_layer))})"}.get(name, "")
        print(f"{name:6s}{extra}: {toks[name]:,} tokens in {secs[name]:.1f} s, {toks[name] / secs[name]:.0f} tok/s")
    for f in feats.values():
        f.close()
    raw.llm.close()
    r = {k: secs["raw"] / secs[k] for k in feats}
    print(f"final_ratio={r['final']:.2f} layer_ratio={r['layer']:.2f} auto_ratio={r['auto']:.2f}")


if __name__ == "__main__":
    main()
