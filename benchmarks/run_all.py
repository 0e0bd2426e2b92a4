"""Run every benchmark, one after another, and write their figures to
docs/benchmark-results.md, so the figures the docs quote come from a script run
on a named machine at a named commit, not from hand-copied output.

    python benchmarks/run_all.py                      # each benchmark's --quick mode
    python benchmarks/run_all.py --full               # the full modes (hours on 2 cores)
    python benchmarks/run_all.py --only search_overhead engine_throughput
    python benchmarks/run_all.py --baseline-python /path/to/native-venv/bin/python   # adds build_speed

Benchmarks time things, so run this alone on the machine: nothing else computing.
Each benchmark prints its ratio on its last line; the page keeps that line, the
command, the wall time and the tail of the output. A benchmark that fails or
cannot run here (gpu_smoke without a GPU) is recorded as such, never dropped.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from testtime.files import write_text

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["engine_throughput", "search_overhead", "verify_throughput", "ray_scaling", "compute_optimal", "build_speed",
         "selection_signals", "adaptive_compute", "adaptive_draws", "serve_load", "learned_verifier", "verifier_features",
         "gpu_smoke"]
TAIL = 25


def scrub(text: str, baseline: str | None = None) -> str:
    """This machine's paths out of what the page keeps: the checkout, the home folder,
    the baseline interpreter."""
    if baseline:
        text = text.replace(baseline, "BASELINE_PYTHON")
    return text.replace(str(ROOT), ".").replace(str(Path.home()), "~").replace(sys.executable, "python")


def machine() -> dict:
    out = subprocess.run([sys.executable, "-m", "testtime.cli", "env", "--json"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    try:
        info = json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"error": (out.stderr or out.stdout)[-500:]}
    llama = info.get("llama_cpp", {})
    return {"python": platform.python_version(), "cpu_flags": ", ".join(llama.get("cpu_flags", [])),
            "variant_loaded": llama.get("variant_loaded"), "versions": info.get("versions")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full modes instead of --quick")
    ap.add_argument("--only", nargs="+", choices=ORDER, help="these benchmarks only")
    ap.add_argument("--baseline-python", help="build_speed's native-build interpreter (without it, build_speed is skipped)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmark-results.md"))
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark [default: 20 min quick, none full]")
    args = ap.parse_args()
    timeout = args.timeout or (None if args.full else 1200)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip())
    info = machine()
    sections = []
    for name in args.only or ORDER:
        cmd = [sys.executable, f"benchmarks/{name}.py"] + ([] if args.full else ["--quick"])
        if name == "build_speed":
            if not args.baseline_python:
                sections.append((name, " ".join(cmd), None, "skipped: needs --baseline-python (a native build's venv)",
                                 ""))
                continue
            cmd += ["--baseline-python", args.baseline_python]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
            text, status = res.stdout, "ok" if res.returncode == 0 else f"exit {res.returncode}"
            if res.returncode != 0:
                text += "\n" + res.stderr[-3000:]
        except subprocess.TimeoutExpired as e:
            text, status = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
                f"timed out after {timeout} s"
        seconds = time.perf_counter() - t
        lines = [x for x in text.strip().splitlines() if x.strip()]
        last = lines[-1] if lines and status == "ok" else status
        print(f"   {status} in {seconds:.0f} s: {last}", flush=True)
        sections.append((name, " ".join(cmd[1:]), seconds, last, "\n".join(lines[-TAIL:])))
    page = [f"# Benchmark results\n\nWritten by `benchmarks/run_all.py{' --full' if args.full else ''}` on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, at commit `{commit}`"
            f"{' (with uncommitted changes)' if dirty else ''}. Every figure below is a ratio measured in one run "
            "against a baseline on the same machine; what each benchmark measures, and why, is in "
            "[benchmarks.md](benchmarks.md).\n\nMachine: " + json.dumps(info) + "\n",
            "| benchmark | wall time | last line |", "|---|---|---|"]
    for name, _, seconds, last, _ in sections:
        page.append(f"| {name} | {'-' if seconds is None else f'{seconds:.0f} s'} | `{last}` |")
    for name, cmd, seconds, last, tail in sections:
        page.append(f"\n## {name}\n\n`python {cmd}`" + ("" if seconds is None else f" ({seconds:.0f} s)") + "\n")
        if tail:
            page.append("```\n" + tail + "\n```")
        else:
            page.append(last)
    write_text(args.out, scrub("\n".join(page) + "\n", args.baseline_python))  # atomic: a kill leaves the old page
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
