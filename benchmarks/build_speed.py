"""Raw batched decode of two llama.cpp builds on this machine, measured in one run.

testtime builds llama.cpp portably (scripts/build-llama.sh: every CPU variant,
the best one loaded at start-up) instead of with -march=native. This measures
what that costs: raw batched `llama_decode` (B sequences, one token each per
call, fixed tokens, no sampling; the same loop as engine_throughput.py's raw
side) in this interpreter's build and in a baseline interpreter's (a venv with
a native build of the same llama-cpp-python version and testtime installed).
The two alternate, one process per measurement, over several rounds, because
this machine's speed drifts by a third over minutes.

Last line: ratio=<portable tok/s / baseline tok/s> (median of the rounds' ratios).

    python benchmarks/build_speed.py --baseline-python /path/to/native-venv/bin/python [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def worker(batch: int, steps: int, threads: int | None) -> None:
    """One measurement in this interpreter; prints a JSON line."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llama_cpp
    from engine_throughput import RawDecoder

    from testtime.engines import _ggml
    from testtime.engines._llama import default_model_path

    raw = RawDecoder(default_model_path(), batch, list(range(1, 65)), span=256, unified=False, threads=threads)
    for _ in range(steps):
        raw.step()
    print(json.dumps({"tok_s": raw.tokens_per_s, "variant": _ggml.loaded_variant() or "native (linked in)",
                      "features": sorted(_ggml.cpu_features(llama_cpp)),
                      "version": llama_cpp.__version__}))


def measure(python: str, args: argparse.Namespace) -> dict:
    cmd = [python, __file__, "--worker", "--batch", str(args.batch), "--steps", str(args.steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-python", help="interpreter of the venv with the native build")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300, help="decode calls per measurement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 150 steps")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.batch, args.steps, args.threads)
        return
    if not args.baseline_python:
        ap.error("--baseline-python is required")
    if args.quick:
        args.rounds, args.steps = 2, 150
    ratios = []
    for r in range(args.rounds):
        first, second = (sys.executable, args.baseline_python) if r % 2 == 0 else (args.baseline_python, sys.executable)
        got = {first: measure(first, args), second: measure(second, args)}
        mine, base = got[sys.executable], got[args.baseline_python]
        ratios.append(mine["tok_s"] / base["tok_s"])
        print(f"round {r}: portable ({mine['variant']}) {mine['tok_s']:.1f} tok/s, "
              f"baseline ({base['variant']}) {base['tok_s']:.1f} tok/s, ratio {ratios[-1]:.3f}")
    print(f"portable features in use: {', '.join(mine['features'])}")
    print(f"baseline features in use: {', '.join(base['features'])}")
    print(f"ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
