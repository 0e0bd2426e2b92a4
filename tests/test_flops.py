"""FLOPs and dollars against hand computations, the GGUF header reader, and usage from the store."""

import json
import random
import struct

import pytest

from testtime.flops import ModelShape, Price, PriceTable, Usage, cost_summary, read_gguf_header

TINY = ModelShape("tiny", params=1080, n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, vocab=10,
                  tied_embeddings=True)


def test_usage_of_one_sample_by_hand():
    u = Usage.of(prompt_tokens=10, cached_tokens=4, completion_tokens=3)
    assert (u.prefill, u.prompt, u.decode, u.cached) == (6, 10, 3, 4)
    assert u.prefill_ctx == 5 + 6 + 7 + 8 + 9 + 10  # positions 4..9 attend to 5..10 keys
    assert u.prompt_ctx == sum(range(1, 11))
    assert u.decode_ctx == 11 + 12 + 13
    with pytest.raises(ValueError, match="cached"):
        Usage.of(3, 4, 1)


def test_flops_for_a_known_shape_by_hand():
    u = Usage.of(10, 4, 3)
    # body 1080 - 10*8 (tied) = 1000; head 80; attention 4 * 2 layers * (2 heads * 4) = 64 per key
    assert TINY.body_params == 1000 and TINY.d_attn == 8
    assert TINY.flops(u) == 2 * 1000 * (6 + 3) + 2 * 80 * 3 + 64 * (45 + 36)
    assert TINY.flops(u, shared=False) == 2 * 1000 * (10 + 3) + 2 * 80 * 3 + 64 * (55 + 36)
    b = TINY.breakdown(u)
    assert b["prefill"] == 2 * 1000 * 6 + 64 * 45
    assert b["decode"] == 2 * 1080 * 3 + 64 * 36
    assert b["total"] == TINY.flops(u)
    assert b["saved_fraction"] == pytest.approx(1 - TINY.flops(u) / TINY.flops(u, shared=False))
    untied = ModelShape("u", params=1160, n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, vocab=10,
                        tied_embeddings=False)
    assert untied.body_params == 1000 and untied.flops(u) == TINY.flops(u)


def test_usage_adds_and_scales():
    a, b = Usage.of(10, 4, 3), Usage.of(7, 0, 5)
    s = a + b
    assert s.sequences == 2 and s.decode == 8 and s.prefill_ctx == a.prefill_ctx + b.prefill_ctx
    assert TINY.flops(s) == TINY.flops(a) + TINY.flops(b)  # FLOPs are additive over usages
    assert TINY.flops(s.scaled(0.5)) == pytest.approx(TINY.flops(s) / 2)
    assert Usage.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    c = Usage()
    c += a
    assert c == a


SMOLLM2_135M_CONFIG = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                       "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                       "tie_word_embeddings": True, "max_position_embeddings": 8192}


def test_hf_config_parameter_count_matches_the_released_model(tmp_path):
    shape = ModelShape.from_hf_config(SMOLLM2_135M_CONFIG, name="SmolLM2-135M-Instruct")
    assert shape.params == 134_515_008  # the tensor count of the released GGUF file
    assert (shape.head_dim, shape.n_kv_heads, shape.tied_embeddings) == (64, 3, True)
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M_CONFIG))
    assert ModelShape.from_hf_config(tmp_path).params == shape.params
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelShape.from_hf_config({k: v for k, v in SMOLLM2_135M_CONFIG.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="cannot read"):
        ModelShape.from_hf_config(tmp_path / "nope.json")


def _gguf(path, meta, tensors):
    """A minimal GGUF v3 file: header, metadata and tensor infos (no tensor data)."""
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    def val(v):
        if isinstance(v, str):
            return struct.pack("<I", 8) + s(v)
        if isinstance(v, float):
            return struct.pack("<If", 6, v)
        if isinstance(v, list):
            if isinstance(v[0], str):
                return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(s(x) for x in v)
            return struct.pack("<IIQ", 9, 5, len(v)) + b"".join(struct.pack("<i", x) for x in v)
        return struct.pack("<II", 4, v)

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, v in meta.items():
        out += s(k) + val(v)
    for name, dims in tensors.items():
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
            struct.pack("<IQ", 0, 0)
    path.write_bytes(out)


def test_gguf_header_reader_and_shape(tmp_path):
    vocab = [f"t{i}" for i in range(100)]  # a long string array is skipped, its length kept
    meta = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 8,
            "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1, "llama.context_length": 64,
            "llama.rope.freq_base": 10000.0, "tokenizer.ggml.tokens": vocab, "llama.some_ints": [1, 2, 3]}
    tensors = {"token_embd.weight": (8, 100), "blk.0.attn_q.weight": (8, 8), "blk.1.attn_q.weight": (8, 8),
               "output_norm.weight": (8,)}
    _gguf(tmp_path / "m.gguf", meta, tensors)
    got, shapes = read_gguf_header(tmp_path / "m.gguf")
    assert got["llama.block_count"] == 2 and got["tokenizer.ggml.tokens"] == 100
    assert got["llama.some_ints"] == [1, 2, 3] and got["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert shapes["blk.0.attn_q.weight"] == (8, 8)
    shape = ModelShape.from_gguf(tmp_path / "m.gguf")
    assert shape.params == 800 + 64 + 64 + 8 and shape.vocab == 100 and shape.tied_embeddings
    assert (shape.n_layers, shape.d_model, shape.head_dim, shape.n_kv_heads) == (2, 8, 4, 1)
    assert shape.name == "m"

    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF"):
        ModelShape.from_gguf(tmp_path / "bad.gguf")
    (tmp_path / "short.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated"):
        ModelShape.from_gguf(tmp_path / "short.gguf")
    with pytest.raises(ValueError, match="cannot open"):
        ModelShape.from_gguf(tmp_path / "absent.gguf")
    del meta["llama.block_count"]
    _gguf(tmp_path / "nolayers.gguf", meta, tensors)
    with pytest.raises(ValueError, match="block_count"):
        ModelShape.from_gguf(tmp_path / "nolayers.gguf")


@pytest.mark.model
def test_embedded_model_shape_agrees_with_its_hf_config(engine):
    shape = engine.shape()
    ref = ModelShape.from_hf_config(SMOLLM2_135M_CONFIG)
    assert shape.params == ref.params
    assert (shape.n_layers, shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.vocab,
            shape.tied_embeddings) == (30, 576, 9, 3, 64, 49152, True)


def test_dollars_by_hand_and_price_tables(tmp_path, monkeypatch):
    u = Usage.of(1_000_000, 600_000, 2_000_000)
    p = Price(input=1.0, output=3.0, cached_input=0.25)
    assert p.dollars(u) == pytest.approx(0.4 * 1.0 + 0.6 * 0.25 + 2 * 3.0)
    assert p.dollars(u, shared=False) == pytest.approx(1.0 + 6.0)
    assert Price(1.0, 3.0).dollars(u) == pytest.approx(7.0)  # no cache discount given

    default = PriceTable.load()
    assert default.source == "bundled default"
    small, big = default.price("anything", params=135_000_000), default.price("anything", params=70_000_000_000)
    assert small.output < big.output
    table = {"prices": [{"model": "*smollm2*", "input": 0.5, "output": 0.7}, {"max_params": 1e12, "input": 9, "output": 9}]}
    (tmp_path / "p.json").write_text(json.dumps(table))
    monkeypatch.setenv("TESTTIME_PRICES", str(tmp_path / "p.json"))
    mine = PriceTable.load()
    assert mine.price("SmolLM2-135M-Instruct.Q4_1").output == 0.7
    assert mine.price("other", params=10).input == 9
    with pytest.raises(ValueError, match="no entry for model 'other'"):
        mine.price("other")
    (tmp_path / "bad.json").write_text(json.dumps({"prices": [{"model": "x", "input": -1, "output": 1}]}))
    with pytest.raises(ValueError, match="'input' must be a number >= 0"):
        PriceTable.load(tmp_path / "bad.json")
    s = cost_summary(TINY, u, p)
    assert s["dollars"]["total"] == pytest.approx(p.dollars(u)) and s["flops"]["total"] == TINY.flops(u)


def test_store_usage_equals_the_sum_over_samples(tmp_path):
    from testtime.spec import RunSpec, SamplingParams
    from testtime.store import SampleRow, Store
    from testtime.tasks.base import Problem

    rng = random.Random(0)
    with Store(tmp_path) as store:
        spec = RunSpec(model={"engine": "x"}, task={"name": "t"}, template={}, sampling=SamplingParams())
        run = store.register_run(spec, 3, [Problem("a", "q", "1"), Problem("b", "q", "2")])
        rows, expect = [], {"a": Usage(), "b": Usage()}
        for pid in ("a", "b"):
            for i in range(5):
                p = rng.randint(1, 900)
                c, g = rng.randint(0, p), rng.randint(0, 300)
                rows.append(SampleRow(run, pid, i, i, "t", p, c, g, "stop"))
                expect[pid] += Usage.of(p, c, g)
        store.add_samples(rows)
        got = store.usage(run)
        assert {k: Usage.from_dict(v) for k, v in got.items()} == expect
        assert Usage.from_dict(store.usage(run, n=2)["a"]).sequences == 2
        store.set_model_shape(run, TINY.to_dict())
        assert ModelShape.from_dict(store.model_shape(run)) == TINY
