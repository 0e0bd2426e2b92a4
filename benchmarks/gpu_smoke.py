"""The first thing to run on a new GPU machine: vLLM end to end through testtime.

It loads a small instruct model in vLLM (in-process, the `vllm` engine), draws
samples for a few GSM8K-style problems, continues a partial assistant message,
and scores the steps with a PRM served by vLLM's pooling runner (started here
unless --prm-url points at one). It prints the figures and, last, one line:

    tok_per_s=<generated tokens/s> prefix_hit=<cached / prompt tokens> prm_items_per_s=<scored paths/s>

Without a GPU (or without vLLM) it prints why on one line and exits 0.

    python benchmarks/gpu_smoke.py [--model Qwen/Qwen2.5-0.5B-Instruct]
        [--prm-model Qwen/Qwen2.5-Math-PRM-7B | --prm-url http://host:8001] [--n 16]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

PROBLEMS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her parents "
    "decided to give her $15 for that purpose, and her grandparents twice as much as her parents. How much more money "
    "does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]
QWEN_PRM_TEMPLATE = ("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                     "\\boxed{{}}.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def no_gpu_reason() -> str | None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed (pip install 'testtime[vllm]' on a machine with a GPU)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def start_prm(model: str, port: int) -> subprocess.Popen:
    exe = shutil.which("vllm") or sys.exit("the vllm command is not on PATH")
    proc = subprocess.Popen([exe, "serve", model, "--runner", "pooling", "--port", str(port),
                             "--gpu-memory-utilization", "0.45", "--max-model-len", "4096"])
    deadline = time.time() + 900
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"vllm serve {model} exited with {proc.returncode}")
            time.sleep(2)
    proc.kill()
    sys.exit(f"vllm serve {model} did not start in 15 minutes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    ap.add_argument("--prm-model", default="Qwen/Qwen2.5-Math-PRM-7B")
    ap.add_argument("--prm-url", default=None, help="a running PRM pooling server [default: start one]")
    ap.add_argument("--n", type=int, default=16, help="samples per problem")
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--quick", action="store_true", help="4 samples per problem, 192 tokens")
    args = ap.parse_args()
    if args.quick:
        args.n, args.max_tokens = 4, 192
    reason = no_gpu_reason()
    if reason:
        print(f"gpu_smoke: skipped: {reason}")
        return

    from testtime.engines.base import Request
    from testtime.engines.vllm import VLLMEngine
    from testtime.rewards.base import Scoring, split_steps
    from testtime.rewards.served import ServedPRM
    from testtime.spec import SamplingParams

    prm_proc = None
    prm_url = args.prm_url
    if prm_url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        prm_proc = start_prm(args.prm_model, port)
        prm_url = f"http://127.0.0.1:{port}"
    try:
        eng = VLLMEngine(args.model, gpu_memory_utilization=0.4 if prm_proc else 0.85, max_model_len=4096)
        params = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, max_tokens=args.max_tokens)
        chats = [({"role": "user", "content": q + "\nSolve it step by step."},) for q in PROBLEMS]
        reqs = [Request(key=i, seeds=tuple(range(args.n)), params=params, messages=m) for i, m in enumerate(chats)]
        t = time.perf_counter()
        done = list(eng.generate(reqs))
        gen_s = time.perf_counter() - t
        tokens = sum(c.completion_tokens for c in done)
        prompt = sum(c.prompt_tokens for c in done)
        cached = sum(c.cached_tokens or 0 for c in done)
        print(f"sampled {len(done)} completions, {tokens} tokens in {gen_s:.1f} s; prompt tokens {prompt}, "
              f"served from the prefix cache {cached}")
        cont = Request(key="c", seeds=(0,), params=SamplingParams(temperature=0.0, max_tokens=64),
                       messages=chats[0], continuation="Step 1: In April she sold 48 clips.\n\n")
        [c] = eng.generate([cont])
        print(f"continued a partial assistant message ({c.finish_reason}): {c.text[:80]!r}")
        prm = ServedPRM(prm_url, model=None, wire="vllm", step_tag="<extra_0>", good_index=1,
                        question_template=QWEN_PRM_TEMPLATE)
        items = [Scoring(PROBLEMS[c.key], tuple(split_steps(c.text))) for c in done if split_steps(c.text)]
        t = time.perf_counter()
        scores = prm.score(items)
        prm_s = time.perf_counter() - t
        print(f"PRM scored {len(items)} paths ({sum(map(len, scores))} steps, {prm.usage.prompt} tokens) "
              f"in {prm_s:.1f} s")
        print(f"tok_per_s={tokens / gen_s:.1f} prefix_hit={cached / max(1, prompt):.3f} "
              f"prm_items_per_s={len(items) / prm_s:.1f}")
    finally:
        if prm_proc is not None:
            prm_proc.terminate()
            prm_proc.wait(timeout=60)


if __name__ == "__main__":
    main()
