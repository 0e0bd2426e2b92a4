"""ggml's CPU backend as testtime loads it: the variant this CPU runs, and AMX kept
out of the decode path (its kernels die with SIGILL on Sapphire Rapids)."""

import subprocess
import sys

import pytest

from testtime.engines import _ggml

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def llama_cpp():
    lc = pytest.importorskip("llama_cpp")
    from testtime.engines._llama import init_backend

    init_backend(lc)
    return lc


def test_a_cpu_backend_is_loaded_and_says_what_it_runs(llama_cpp):
    feats = _ggml.cpu_features(llama_cpp)
    assert feats, "the CPU backend reports no features"
    variants = _ggml.cpu_variants(llama_cpp)
    if variants:  # the portable build: the loaded variant is one of those shipped
        assert _ggml.loaded_variant() in variants
        # and it uses what this CPU has: AVX2 where the CPU has it
        if "avx2" in _ggml.host_cpu_flags():
            assert "AVX2" in feats
        if "avx512f" in _ggml.host_cpu_flags():
            assert "AVX512" in feats


def test_extra_buffer_types_are_off_exactly_when_amx_is_offered(llama_cpp, monkeypatch):
    from testtime.engines._llama import model_params

    here = _ggml.extra_buffer_types(llama_cpp)
    assert model_params(llama_cpp).use_extra_bufts == (not any("AMX" in b for b in here))
    monkeypatch.setattr(_ggml, "extra_buffer_types", lambda lc: ["AMX", "CPU_REPACK"])
    assert model_params(llama_cpp).use_extra_bufts is False
    monkeypatch.setattr(_ggml, "extra_buffer_types", lambda lc: ["CPU_REPACK"])
    assert model_params(llama_cpp).use_extra_bufts is True


def test_the_server_launcher_loads_models_the_same_way(llama_cpp):
    """`python -m testtime.engines.llama_server` patches llama-cpp-python's model defaults
    before the server loads anything (checked without starting a server)."""
    code = ("import llama_cpp, llama_cpp.llama_cpp as low, sys\n"
            "from testtime.engines import _ggml, llama_server\n"
            "_ggml.extra_buffer_types = lambda lc: ['AMX']\n"
            "import llama_cpp.server.__main__ as m\n"
            "m.main = lambda: print('extra', low.llama_model_default_params().use_extra_bufts)\n"
            "llama_server.main()\n")
    pytest.importorskip("llama_cpp.server")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "extra False"
