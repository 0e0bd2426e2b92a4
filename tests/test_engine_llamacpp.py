"""The embedded engine on the real SmolLM2-135M model."""

import pytest

from testtime.engines import Request, load_engine
from testtime.engines._llama import ModelError
from testtime.spec import SamplingParams

pytestmark = pytest.mark.model

ASK = ({"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"},)


def req(key="a", seeds=(1, 2, 3, 4), messages=ASK, **params):
    params.setdefault("max_tokens", 24)
    return Request(key=key, messages=messages, seeds=tuple(seeds), params=SamplingParams(**params))


def run(engine, *requests):
    return sorted(engine.generate(list(requests)), key=lambda c: (str(c.key), c.index))


def test_same_seeds_give_the_same_samples(engine):
    a = [c.text for c in run(engine, req(seeds=(11, 12, 13, 14), temperature=1.0))]
    engine.drop_cache()
    b = [c.text for c in run(engine, req(seeds=(11, 12, 13, 14), temperature=1.0))]
    assert a == b
    assert len(set(a)) > 1  # and different seeds give different samples


def test_a_sample_does_not_depend_on_its_batch(engine):
    """Seed 7 alone, or among other samples and another prompt, gives the same text."""
    alone = run(engine, req(seeds=(7,), temperature=1.0))[0].text
    other = req(key="b", messages=({"role": "user", "content": "Name a colour."},), seeds=(1, 2, 3), temperature=1.0)
    crowd = run(engine, other, req(key="c", seeds=(5, 6, 7, 8), temperature=1.0))
    assert [c.text for c in crowd if c.key == "c" and c.seed == 7] == [alone]


def test_greedy_is_deterministic_and_identical_across_seeds(engine):
    texts = {c.text for c in run(engine, req(seeds=(1, 2, 3), temperature=0))}
    assert len(texts) == 1


def test_max_tokens_gives_length_finish(engine):
    for c in run(engine, req(seeds=(1, 2), temperature=1.0, max_tokens=5)):
        assert c.completion_tokens <= 5
        if c.finish_reason == "length":
            assert c.completion_tokens == 5


def test_stop_strings_cut_the_text(engine):
    full = run(engine, req(seeds=(3,), temperature=0, max_tokens=40))[0].text
    word = full.split()[3]
    cut = run(engine, req(seeds=(3,), temperature=0, max_tokens=40, stop=[word]))[0]
    assert cut.finish_reason == "stop"
    assert word not in cut.text
    assert full.startswith(cut.text)


def test_running_samples_stream_their_text_and_never_past_a_stop(engine):
    """`on_token`: each sample's pieces join to a prefix of its final text; a stop string is
    never streamed, not even its first characters (they are held back until settled)."""
    full = run(engine, req(seeds=(3,), temperature=0, max_tokens=40))[0].text
    stop = full.split()[5][:3]  # a word's first characters: matched part way through a token, often
    for stops in ([], [stop], ["\n\n", "answer is"]):
        pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
        out = run(engine, Request(key="s", messages=ASK, seeds=(3, 4, 5), on_token=lambda i, t: pieces[i].append(t),
                                  params=SamplingParams(temperature=1.0, max_tokens=40, stop=tuple(stops))))
        for c in out:
            streamed = "".join(pieces[c.index])
            assert c.text.startswith(streamed) and len(pieces[c.index]) >= min(3, c.completion_tokens - 2), stops
            assert not any(s in streamed for s in stops) and len(c.text) - len(streamed) < 40
    assert engine.streams_text


def test_prompt_is_prefilled_once_for_all_samples(engine):
    engine.drop_cache()
    engine.reset_stats()
    r = req(seeds=tuple(range(12)), temperature=1.0, max_tokens=4)  # more samples than slots
    prompt_len = len(engine.prefix_tokens(r))
    out = run(engine, r)
    assert len(out) == 12
    assert engine.stats["prompt_computed"] == prompt_len
    assert sum(c.prompt_tokens - c.cached_tokens for c in out) == prompt_len
    # the same prompt again is served from the cache
    engine.reset_stats()
    run(engine, req(seeds=(99,), temperature=1.0, max_tokens=4))
    assert engine.stats["prompt_computed"] == 0


def test_shared_leading_tokens_are_not_recomputed(engine):
    engine.drop_cache()
    engine.reset_stats()
    system = {"role": "system", "content": "You are a careful assistant. " * 10}
    a = req(key="a", messages=(system, {"role": "user", "content": "What is 2+2?"}), seeds=(1,), max_tokens=2)
    b = req(key="b", messages=(system, {"role": "user", "content": "What is 3+5?"}), seeds=(1,), max_tokens=2)
    ta, tb = engine.prefix_tokens(a), engine.prefix_tokens(b)
    common = next(i for i, (x, y) in enumerate(zip(ta, tb)) if x != y)
    run(engine, a)
    run(engine, b)
    assert engine.stats["prompt_computed"] == len(ta) + len(tb) - common


def test_continuation_of_a_partial_assistant_message(engine):
    base = req(seeds=(1,), temperature=0, max_tokens=8)
    partial = "Let me count.\n\nStep 1:"
    cont = Request(key="c", messages=ASK, continuation=partial, seeds=(1,), params=base.params)
    pre, full = engine.prefix_tokens(base), engine.prefix_tokens(cont)
    assert full[:len(pre)] == pre  # the chat is not re-templated
    tail = b"".join(engine.llm.piece(t) for t in full[len(pre):]).decode()
    assert tail == partial  # the trailing blank line and text are kept exactly
    out = run(engine, cont)[0]
    assert out.prompt_tokens == len(full) and out.completion_tokens > 0
    assert full.count(engine.llm.eos) == pre.count(engine.llm.eos)  # no end-of-turn was added


def test_bos_is_never_doubled_by_a_template_that_prints_it():
    # like Llama 3's template: BOS written as text, content trimmed
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    from testtime.engines.llamacpp import LlamaCppEngine
    e = LlamaCppEngine(slots=1, max_prefixes=1, chat_template=template)
    try:
        toks = e.prefix_tokens(req(seeds=(1,)))
        assert toks[0] == e.llm.bos
        assert toks.count(e.llm.bos) == 1
    finally:
        e.close()


def test_logprobs_when_asked(engine):
    c = run(engine, req(seeds=(1,), temperature=1.0, max_tokens=4, logprobs=3))[0]
    assert len(c.logprobs) == c.completion_tokens
    for lp in c.logprobs:
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        assert max(lp.top.values()) >= lp.logprob - 1e-9


def test_prompt_too_long_is_a_clear_error(engine):
    huge = ({"role": "user", "content": "word " * 5000},)
    with pytest.raises(ValueError, match="exceeds the .* tokens a sequence can hold"):
        run(engine, req(messages=huge))


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        load_engine("llamacpp", model=tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="not a GGUF model file"):
        load_engine("llamacpp", model=bad)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError, match="could not load"):
        load_engine("llamacpp", model=truncated)


def test_samples_of_different_problems_share_decode_steps(engine):
    """Continuous batching: two 4-sample requests fill the 8 slots together."""
    engine.reset_stats()
    other = ({"role": "user", "content": "Write a haiku about the sea."},)
    out = run(engine, req(key="a", seeds=(1, 2, 3, 4), temperature=1.0, max_tokens=12),
              req(key="b", messages=other, seeds=(1, 2, 3, 4), temperature=1.0, max_tokens=12))
    assert len(out) == 8
    assert engine.stats["slot_steps"] / engine.stats["steps"] > 4
    assert engine.stats["generated"] == sum(c.completion_tokens for c in out)


def test_every_decode_presents_sequences_in_increasing_order(engine):
    """llama.cpp splits a batch whose sequence ids are out of order into several
    micro-batches (each reading all the weights); refills must not cause that."""
    seen = []
    decode = engine.llm.decode

    def spy(tok, pos, seq, out):
        seen.append(seq.copy())
        return decode(tok, pos, seq, out)

    engine.llm.decode = spy
    try:
        reqs = [req(key=k, seeds=tuple(range(6)), temperature=1.0, max_tokens=m)
                for k, m in (("a", 3), ("b", 9), ("c", 5), ("d", 12))]
        assert len(run(engine, *reqs)) == 24
    finally:
        del engine.llm.decode
    multi = [s for s in seen if len(set(s.tolist())) > 1]
    assert len(multi) > 5
    assert all((s[1:] > s[:-1]).all() for s in multi)


def test_a_model_with_damaged_weights_is_a_clear_error(tmp_path):
    """Issue 16.9: a GGUF whose tensor data is overwritten with 0xFF loaded and sampled
    the same garbage for every seed."""
    import shutil

    from testtime.engines._llama import default_model_path

    dst = tmp_path / "damaged.gguf"
    shutil.copy(default_model_path(), dst)
    size = dst.stat().st_size
    with open(dst, "r+b") as f:  # the header (and its tokenizer) stays; the weights after it do not
        f.seek(size // 2)
        f.write(b"\xff" * (size - size // 2))
    engine = load_engine("llamacpp", model=str(dst), slots=2, max_prefixes=2, seq_ctx=256)
    try:
        req = Request(key=0, seeds=(1, 2), params=SamplingParams(max_tokens=8),
                      messages=({"role": "user", "content": "What is 2 + 2?"},))
        with pytest.raises(ModelError, match="first logits are not finite"):
            list(engine.generate([req]))
    finally:
        engine.close()
