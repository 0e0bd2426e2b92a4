"""llama-cpp-python's OpenAI-compatible server, started the way testtime loads models.

    python -m testtime.engines.llama_server --model model.gguf --port 8000 [any llama_cpp.server flag]

The same as `python -m llama_cpp.server`, plus the two things testtime's own
engine does before loading a model (see `_ggml`): load ggml's CPU backend
variant from llama-cpp-python's lib folder (a portable build keeps them there,
where ggml does not look by itself), and keep AMX out of the decode path.
"""

from __future__ import annotations


def main() -> None:
    import llama_cpp
    import llama_cpp.llama_cpp as low

    from . import _ggml
    from ._llama import init_backend

    init_backend(llama_cpp)
    default_params = low.llama_model_default_params

    def params():  # llama_cpp.Llama builds its model parameters from this at load time
        p = default_params()
        p.use_extra_bufts = _ggml.use_extra_bufts(llama_cpp)
        return p

    low.llama_model_default_params = params
    from llama_cpp.server.__main__ import main as serve

    serve()


if __name__ == "__main__":
    main()
