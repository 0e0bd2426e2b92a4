"""The vllm engine's own logic against a stand-in for vLLM's offline API (no GPU here):
one prompt and one seed per sample, prefix caching on, chat template plus verbatim
continuation, token counts, stop strings, logprobs; and the import guard."""

import sys
import types
from dataclasses import dataclass, field

import pytest

from testtime.engines.base import Request
from testtime.spec import SamplingParams


@dataclass
class FakeParams:
    n: int = 1
    seed: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    stop: list | None = None
    logprobs: int | None = None


@dataclass
class Logprob:
    logprob: float
    decoded_token: str | None = None


@dataclass
class Out:
    text: str
    token_ids: list
    finish_reason: str
    stop_reason: object = None
    logprobs: list | None = None


@dataclass
class ReqOut:
    prompt_token_ids: list
    outputs: list
    num_cached_tokens: int = 0


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def decode(self, ids):
        return f"t{ids[0]}"


class FakeLLM:
    instances = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return FakeTokenizer()

    def generate(self, prompts, params, use_tqdm=True):
        assert len(prompts) == len(params)
        self.calls.append((list(prompts), list(params)))
        seen, out = set(), []
        for p, sp in zip(prompts, params):
            assert sp.n == 1
            text = f"seed {sp.seed}: step one\n\nstep two"
            stop_reason = None
            for s in sp.stop or []:
                if s in text:
                    text, stop_reason = text[:text.index(s)], s
            lps = [{7: Logprob(-0.2, "Yes"), 8: Logprob(-1.9, "No")}] if sp.logprobs else None
            out.append(ReqOut(list(range(len(p.split()))), [Out(text, [7, 1, 2], "stop", stop_reason, lps)],
                              num_cached_tokens=len(p.split()) if p in seen else 0))
            seen.add(p)
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    FakeLLM.instances.clear()
    return mod


def test_one_prompt_and_seed_per_sample_with_prefix_caching(fake_vllm):
    from testtime.engines.vllm import VLLMEngine

    eng = VLLMEngine("org/model", tensor_parallel_size=2, chunk=3)
    llm = FakeLLM.instances[0]
    assert llm.kwargs["enable_prefix_caching"] is True and llm.kwargs["tensor_parallel_size"] == 2
    msgs = ({"role": "user", "content": "2+3?"},)
    reqs = [Request(key="a", seeds=(10, 11), params=SamplingParams(max_tokens=9, stop=("\n\n",), top_k=0),
                    messages=msgs, continuation="Step 1:"),
            Request(key="b", seeds=(12, 13), params=SamplingParams(max_tokens=9, logprobs=2), prompt="raw text")]
    got = list(eng.generate(reqs))
    assert [(c.key, c.index, c.seed) for c in got] == [("a", 0, 10), ("a", 1, 11), ("b", 0, 12), ("b", 1, 13)]
    assert [len(p) for p, _ in llm.calls] == [3, 1]  # chunks of 3 samples
    prompts = llm.calls[0][0]
    assert prompts[0] == "<user>2+3?<assistant>Step 1:"  # the continuation appended verbatim
    assert prompts[2] == "raw text"
    sp = llm.calls[0][1][0]
    assert (sp.seed, sp.max_tokens, sp.stop, sp.top_k) == (10, 9, ["\n\n"], -1)
    a0, a1 = got[0], got[1]
    assert a0.text == "seed 10: step one" and a0.stop_hit == "\n\n"
    assert a0.completion_tokens == 3 and a0.cached_tokens == 0 and a1.cached_tokens == a1.prompt_tokens
    assert got[2].logprobs[0].top == {"Yes": -0.2, "No": -1.9} and got[2].stop_hit is None
    assert eng.identity()["engine"] == "vllm" and eng.identity()["model"] == "org/model"


def test_the_judge_prm_runs_on_vllm(fake_vllm):
    import math

    from testtime.engines.vllm import VLLMEngine
    from testtime.rewards.base import Scoring
    from testtime.rewards.judge import JudgePRM

    scores = JudgePRM(VLLMEngine("m")).score([Scoring("q", ("a",))])
    assert scores[0][0] == pytest.approx(math.exp(-0.2) / (math.exp(-0.2) + math.exp(-1.9)))


def test_a_clear_message_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    from testtime.engines import load_engine

    with pytest.raises(ImportError, match=r"pip install 'testtime\[vllm\]'"):
        load_engine("vllm", model="m")
