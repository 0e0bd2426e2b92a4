"""What compute bought: FLOPs and dollars per sample, run and strategy.

A forward pass of a decoder-only transformer costs about 2 FLOPs per weight used
(a multiply and an add) per token, plus attention over the context:

    per token at position t (it attends to t + 1 keys, itself included):
        2 * body_params                    every layer's matrices
      + 4 * n_layers * d_attn * (t + 1)    scores q.k and the weighted sum of v
    per generated token, in addition:
        2 * vocab * d_model                the output head (one logits row)

where d_attn = n_heads * head_dim, and body_params excludes the embedding
lookup and the output head. Prefill computes logits for its last position
only (llama.cpp and vLLM both do), which is why the head is counted per
generated token and not per prompt token. Grouped-query attention shrinks the
KV cache, not these FLOPs. Norms, rotary embeddings and the softmax are left
out: they are well under 1% at any size this tool meets.

`Usage` holds sums that make FLOPs additive: tokens, and the summed context
lengths of those tokens, for prefill and decode separately, and for prefill
also as if no prompt prefix had been shared (every sample computing its whole
prompt). FLOPs = `shape.flops(usage)`, so one usage can be priced under any
model shape, and usages of samples, problems and runs simply add.

Dollars come from a price table (per million input, cached input and output
tokens per model, by file-name pattern or by model size) that the user can
replace with their own JSON file (`TESTTIME_PRICES` or `--prices`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any
from .errors import InputError


def _tri(n: int) -> int:
    """1 + 2 + ... + n: the summed context lengths of positions 0..n-1."""
    return n * (n + 1) // 2


@dataclass
class Usage:
    """Token counts and summed context lengths; additive."""

    sequences: int = 0
    """Samples (or scoring calls) counted."""
    prefill: int = 0
    """Prompt tokens computed (not served from a shared KV cache)."""
    prefill_ctx: int = 0
    """Sum over computed prompt tokens of the keys each attends to."""
    prompt: int = 0
    """Prompt tokens as if nothing were shared."""
    prompt_ctx: int = 0
    decode: int = 0
    """Generated tokens."""
    decode_ctx: int = 0
    cache_unknown: int = 0
    """Sequences whose cached prompt tokens the engine could not tell (a server that
    does not report them); their whole prompt is counted as computed."""

    @classmethod
    def of(cls, prompt_tokens: int, cached_tokens: int | None, completion_tokens: int) -> "Usage":
        """One sample: `prompt_tokens` of context, the first `cached_tokens` of them
        served from a cache (None: unknown, counted as computed), then
        `completion_tokens` generated."""
        p, g = int(prompt_tokens), int(completion_tokens)
        c = 0 if cached_tokens is None else int(cached_tokens)
        if min(p, c, g) < 0 or c > p:
            raise ValueError(f"token counts must satisfy 0 <= cached <= prompt and generated >= 0, "
                             f"got prompt={p}, cached={c}, generated={g}")
        return cls(1, p - c, _tri(p) - _tri(c), p, _tri(p), g, _tri(p + g) - _tri(p), int(cached_tokens is None))

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __iadd__(self, other: "Usage") -> "Usage":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def scaled(self, factor: float) -> "Usage":
        """An expectation: this usage times a factor (e.g. k of n samples). Counts become floats."""
        return Usage(*(getattr(self, f.name) * factor for f in fields(self)))

    @property
    def cached(self) -> float:
        return self.prompt - self.prefill

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Usage":
        return cls(**{f.name: d.get(f.name, 0) for f in fields(cls)}) if d else cls()


@dataclass(frozen=True)
class ModelShape:
    """The numbers FLOPs need, read from a GGUF file or a Hugging Face config."""

    name: str
    params: int
    """Every stored parameter (the embedding once when it is tied to the head)."""
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    context_length: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for f in ("params", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "vocab"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise InputError(f"model shape {self.name!r}: {f} must be a positive integer, got {v!r}")
        if self.body_params < 0:
            raise InputError(f"model shape {self.name!r}: {self.params} parameters cannot hold a "
                             f"{self.vocab} x {self.d_model} embedding")

    @property
    def d_attn(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def head_params(self) -> int:
        return self.vocab * self.d_model

    @property
    def body_params(self) -> int:
        """Parameters in the layers: without the embedding lookup and the output head."""
        return self.params - self.head_params * (1 if self.tied_embeddings else 2)

    def flops(self, usage: Usage, shared: bool = True) -> float:
        """FLOPs of `usage`; `shared=False` as if every sample computed its whole prompt."""
        pre, pre_ctx = (usage.prefill, usage.prefill_ctx) if shared else (usage.prompt, usage.prompt_ctx)
        attn = 4 * self.n_layers * self.d_attn
        return float(2 * self.body_params * (pre + usage.decode) + 2 * self.head_params * usage.decode
                     + attn * (pre_ctx + usage.decode_ctx))

    def breakdown(self, usage: Usage) -> dict[str, float]:
        """Prefill and decode FLOPs (computed), the total as if nothing were shared, and the saving."""
        attn = 4 * self.n_layers * self.d_attn
        prefill = float(2 * self.body_params * usage.prefill + attn * usage.prefill_ctx)
        decode = float(2 * (self.body_params + self.head_params) * usage.decode + attn * usage.decode_ctx)
        unshared = self.flops(usage, shared=False)
        return {"prefill": prefill, "decode": decode, "total": prefill + decode, "total_unshared": unshared,
                "saved_fraction": 1 - (prefill + decode) / unshared if unshared else 0.0}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelShape":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "ModelShape":
        meta, tensors = read_gguf_header(path)
        arch = meta.get("general.architecture")
        if not arch:
            raise InputError(f"{path}: GGUF metadata has no general.architecture")

        def need(key: str) -> int:
            v = meta.get(f"{arch}.{key}")
            if v is None:
                raise InputError(f"{path}: GGUF metadata has no {arch}.{key}; cannot compute FLOPs")
            return int(v if not isinstance(v, list) else max(v))

        n_heads = need("attention.head_count")
        d_model = need("embedding_length")
        kv = meta.get(f"{arch}.attention.head_count_kv", n_heads)
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = meta.get(f"{arch}.vocab_size") or (tokens if isinstance(tokens, int) else len(tokens or ())) or \
            int(tensors.get("token_embd.weight", (0, 0))[-1])
        return cls(name=Path(path).stem, params=sum(_numel(s) for s in tensors.values()),
                   n_layers=need("block_count"), d_model=d_model, n_heads=n_heads,
                   n_kv_heads=int(kv if not isinstance(kv, list) else max(kv)),
                   head_dim=int(meta.get(f"{arch}.attention.key_length") or d_model // n_heads),
                   vocab=int(vocab), tied_embeddings="output.weight" not in tensors,
                   context_length=meta.get(f"{arch}.context_length"), source=f"gguf:{Path(path).name}")

    @classmethod
    def from_hf_config(cls, config: str | os.PathLike | dict[str, Any], name: str | None = None) -> "ModelShape":
        """From a Hugging Face `config.json` (a path, its folder, or the dict). The
        parameter count is computed for a Llama-style decoder (gated MLP) unless the
        config states one (`num_parameters`)."""
        if isinstance(config, dict):
            cfg, where = config, "dict"
        else:
            p = Path(config)
            p = p / "config.json" if p.is_dir() else p
            try:
                cfg = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"cannot read a Hugging Face config from {p}: {e}") from None
            where = p.name
        cfg = cfg.get("text_config", cfg)
        try:
            d, layers, heads = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
            vocab, ff = int(cfg["vocab_size"]), int(cfg["intermediate_size"])
        except KeyError as e:
            raise InputError(f"Hugging Face config ({where}) lacks {e.args[0]}; cannot compute FLOPs") from None
        kv = int(cfg.get("num_key_value_heads") or heads)
        hd = int(cfg.get("head_dim") or d // heads)
        tied = bool(cfg.get("tie_word_embeddings", False))
        per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * ff + 2 * d
        params = int(cfg.get("num_parameters") or layers * per_layer + d + vocab * d * (1 if tied else 2))
        return cls(name=name or str(cfg.get("_name_or_path") or where), params=params, n_layers=layers,
                   d_model=d, n_heads=heads, n_kv_heads=kv, head_dim=hd, vocab=vocab, tied_embeddings=tied,
                   context_length=cfg.get("max_position_embeddings"), source=f"hf-config:{where}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# GGUF value types: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_header(path: str | os.PathLike, max_array: int = 64) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The metadata and tensor shapes of a GGUF file, reading only its header.

    Written here rather than using the `gguf` package, which parses every
    tokenizer array into numpy objects (3.5 s for a 135M model). Arrays longer
    than `max_array` (the tokenizer's) are skipped and returned as their length."""
    p = Path(path)
    try:
        f = open(p, "rb")
    except OSError as e:
        raise InputError(f"cannot open GGUF model {p}: {e.strerror}") from None
    with f:
        def read(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            buf = f.read(size)
            if len(buf) != size:
                raise InputError(f"{p}: truncated GGUF header")
            return struct.unpack("<" + fmt, buf)[0]

        def string() -> str:
            n = read("Q")
            if n > 1 << 24:
                raise InputError(f"{p}: implausible string length {n} in GGUF header")
            return f.read(n).decode("utf-8", "replace")

        def value(t: int) -> Any:
            if t in _SCALARS:
                return read(_SCALARS[t])
            if t == _STRING:
                return string()
            if t == _ARRAY:
                et, count = read("I"), read("Q")
                if et in _SCALARS and count > max_array:
                    f.seek(count * struct.calcsize("<" + _SCALARS[et]), 1)
                    return count
                if et == _STRING and count > max_array:
                    for _ in range(count):
                        f.seek(read("Q"), 1)
                    return count
                return [value(et) for _ in range(count)]
            raise InputError(f"{p}: unknown GGUF value type {t}")

        if f.read(4) != b"GGUF":
            raise InputError(f"{p} is not a GGUF file (bad magic)")
        version = read("I")
        if version < 2:
            raise InputError(f"{p}: GGUF version {version} is too old (need 2 or later)")
        n_tensors, n_kv = read("Q"), read("Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(read("I"))
        tensors: dict[str, tuple[int, ...]] = {}
        for _ in range(n_tensors):
            name = string()
            dims = tuple(read("Q") for _ in range(read("I")))
            read("I"), read("Q")  # type, offset
            tensors[name] = dims
    return meta, tensors


# -- dollars -------------------------------------------------------------------

@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input: float
    output: float
    cached_input: float | None = None
    """Price of prompt tokens served from a cache; the input price when not given."""
    rule: str = ""
    """Which table entry matched."""

    def dollars(self, usage: Usage, shared: bool = True) -> float:
        cached_price = self.input if self.cached_input is None else self.cached_input
        if shared:
            inp = usage.prefill * self.input + usage.cached * cached_price
        else:
            inp = usage.prompt * self.input
        return (inp + usage.decode * self.output) / 1e6


class PriceTable:
    """Entries are tried in order: `{"model": "<glob on the model name>", "input": ..,
    "output": .., "cached_input": ..}`, then `{"max_params": <int>, ...}` tiers by
    size (the first whose max_params is at least the model's). JSON file:
    `{"note": "...", "prices": [entries]}`."""

    def __init__(self, entries: list[dict[str, Any]], source: str = ""):
        self.source = source
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or ("model" not in e and "max_params" not in e):
                raise InputError(f"price table {source or ''} entry {i}: needs 'model' or 'max_params', got {e!r}")
            for k in ("input", "output"):
                if not isinstance(e.get(k), (int, float)) or e[k] < 0:
                    raise InputError(f"price table {source} entry {i}: '{k}' must be a number >= 0 "
                                     f"(dollars per million tokens), got {e.get(k)!r}")
        self.entries = entries

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "PriceTable":
        """The user's table (`path`, else $TESTTIME_PRICES), else the bundled default."""
        path = path or os.environ.get("TESTTIME_PRICES")
        if path:
            try:
                data = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"cannot read price table {path}: {e}") from None
            src = str(path)
        else:
            data = json.loads(resources.files("testtime").joinpath("data/prices.json").read_text())
            src = "bundled default"
        entries = data.get("prices") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise InputError(f"price table {src}: expected a list under 'prices'")
        return cls(entries, src)

    def price(self, model: str, params: int | None = None) -> Price:
        for e in self.entries:
            if "model" in e and fnmatch.fnmatch(model.lower(), str(e["model"]).lower()):
                return Price(float(e["input"]), float(e["output"]), e.get("cached_input"), f"model {e['model']}")
        if params is not None:
            for e in self.entries:
                if "max_params" in e and params <= float(e["max_params"]):
                    return Price(float(e["input"]), float(e["output"]), e.get("cached_input"),
                                 f"size <= {float(e['max_params']):.3g} params")
        raise InputError(f"price table ({self.source}) has no entry for model {model!r}"
                         + (f" with {params} parameters" if params else "") + "; add one")


def cost_summary(shape: ModelShape, usage: Usage, price: Price | None = None) -> dict[str, Any]:
    """FLOPs (prefill, decode, total, as if unshared) and dollars of a usage, with its token counts."""
    out: dict[str, Any] = {"model": shape.name, "tokens": usage.to_dict(), "flops": shape.breakdown(usage)}
    if price is not None:
        out["dollars"] = {"total": price.dollars(usage), "total_unshared": price.dollars(usage, shared=False),
                          "rule": price.rule}
    return out
