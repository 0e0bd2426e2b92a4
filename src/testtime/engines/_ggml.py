"""ggml's CPU backends: which build variant runs, and keeping AMX out of the decode path.

testtime's build of llama.cpp (`scripts/build-llama.sh`) is portable: ggml is
compiled without `-march=native`, with every x86 CPU variant of its CPU backend
as a separate library (`GGML_BACKEND_DL` + `GGML_CPU_ALL_VARIANTS`), and at run
time ggml loads the best variant this CPU supports (AVX2, AVX-512, ...). So one
wheel runs on any x86-64 machine, and a wheel shared through a cache or a
container layer cannot carry instructions another CPU lacks.

Two consequences handled here:

- ggml looks for those libraries next to the executable and in the current
  directory, which for Python is neither; `load_backends()` loads them from
  llama-cpp-python's own `lib/` folder before llama.cpp is initialised. A
  build with the CPU backend linked in (llama-cpp-python's default) has
  nothing to load and is left alone.
- On Intel CPUs with AMX (Sapphire Rapids and later), ggml's AMX matrix
  kernels run on worker threads that never asked the kernel for AMX tile
  state and die with SIGILL in `ggml_backend_amx_mul_mat` (an open upstream
  fix, ggml-org/llama.cpp PR #26954). AMX is reached only through an "extra"
  buffer type, so `use_extra_bufts()` says to turn extra buffer types off
  exactly when the CPU backend offers an AMX one. Elsewhere they stay on
  (the repacked Q4_0/Q4_K layouts are faster on AVX2).
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path
from typing import Any
from ..errors import InfrastructureError


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


def lib_dir(llama_cpp: Any) -> Path:
    """llama-cpp-python's folder of shared libraries."""
    return Path(llama_cpp.__file__).resolve().parent / "lib"


def _mapped(prefix: str) -> str | None:
    """The path of a mapped shared library whose file name starts with `prefix`."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if os.path.basename(path).startswith(prefix):
                    return path
    except OSError:
        pass
    return None


@lru_cache(maxsize=1)
def _ggml(llama_cpp: Any) -> ctypes.CDLL | None:
    """libggml: the very file libllama loaded. A wheel stores libggml.so, .so.0 and
    .so.0.x as separate copies (zip has no symlinks), and opening another copy would
    give a second, empty backend registry."""
    path = _mapped("libggml.so") or str(lib_dir(llama_cpp) / "libggml.so")
    if not os.path.exists(path):
        return None
    lib = ctypes.CDLL(path)
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load_all_from_path.restype = None
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buft_name.restype = ctypes.c_char_p
    return lib


@lru_cache(maxsize=1)
def ggml_base(llama_cpp: Any) -> ctypes.CDLL:
    """libggml-base, as libllama loaded it: the tensor accessors the eval callback of
    `_llama.LlamaModel(layers=...)` reads the layers' states with."""
    path = _mapped("libggml-base.so") or str(lib_dir(llama_cpp) / "libggml-base.so")
    lib = ctypes.CDLL(path)
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


def cpu_variants(llama_cpp: Any) -> list[str]:
    """The CPU backend variants this build ships (empty when the CPU backend is linked in)."""
    return sorted(p.name.removeprefix("libggml-cpu-").removesuffix(".so")
                  for p in lib_dir(llama_cpp).glob("libggml-cpu-*.so"))


def load_backends(llama_cpp: Any) -> None:
    """Load the best CPU variant from llama-cpp-python's lib folder, once, before
    `llama_backend_init` would search the wrong folders for it."""
    lib = _ggml(llama_cpp)
    if lib is None or lib.ggml_backend_reg_count() > 0 or not cpu_variants(llama_cpp):
        return
    lib.ggml_backend_load_all_from_path(str(lib_dir(llama_cpp)).encode())
    if lib.ggml_backend_reg_count() == 0:
        raise InfrastructureError(f"ggml found no CPU backend it can run in {lib_dir(llama_cpp)} "
                           f"(variants: {', '.join(cpu_variants(llama_cpp))}); run `testtime env`")


def _cpu_reg(llama_cpp: Any) -> int | None:
    lib = _ggml(llama_cpp)
    return lib.ggml_backend_reg_by_name(b"CPU") if lib is not None else None


def extra_buffer_types(llama_cpp: Any) -> list[str]:
    """Names of the CPU device's extra buffer types (e.g. 'AMX', 'CPU_REPACK')."""
    lib, reg = _ggml(llama_cpp), _cpu_reg(llama_cpp)
    if not reg:
        return []
    addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return []
    fn = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
    arr = fn(lib.ggml_backend_reg_dev_get(reg, 0))
    names, i = [], 0
    while arr and arr[i]:
        names.append(lib.ggml_backend_buft_name(arr[i]).decode())
        i += 1
    return names


def use_extra_bufts(llama_cpp: Any) -> bool:
    """False when the CPU backend would put weights in AMX buffers (see the module doc)."""
    return not any("AMX" in name.upper() for name in extra_buffer_types(llama_cpp))


def cpu_features(llama_cpp: Any) -> dict[str, str]:
    """Features the running CPU backend was compiled with, as ggml reports them."""
    lib, reg = _ggml(llama_cpp), _cpu_reg(llama_cpp)
    if not reg:
        return {}
    addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    if not addr:
        return {}
    fn = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(addr)
    feats, out, i = fn(reg), {}, 0
    while feats and feats[i].name:
        out[feats[i].name.decode()] = feats[i].value.decode()
        i += 1
    return out


def loaded_variant() -> str | None:
    """Which libggml-cpu-*.so this process mapped (None when the CPU backend is linked in)."""
    path = _mapped("libggml-cpu-")
    return os.path.basename(path).removeprefix("libggml-cpu-").removesuffix(".so") if path else None


def host_cpu_flags() -> set[str]:
    """The CPU's own flags (Linux), to compare with what the backend uses."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
