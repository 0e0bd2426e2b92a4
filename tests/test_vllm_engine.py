"""The vllm engine's own logic against a stand-in for vLLM 0.33's engine loop (no GPU here).

The stand-in behaves as vLLM does where the engine could get it wrong:
- the tokenizer adds BOS when asked for special tokens, and the chat template
  prints BOS itself (as Llama 3's does), so a doubled BOS shows;
- `SamplingParams` validates as vLLM's does (temperature in [0, 2], greedy
  needs n == 1, top_k >= -1, min_p in [0, 1]);
- `add_request` takes a string id, `step()` advances at most `max_num_seqs`
  running requests by one token and returns their outputs, finished or not;
- cached prompt tokens are counted in whole blocks of 16, and never the last
  prompt token (it must be recomputed for its logits)."""

import sys
import types
from dataclasses import dataclass, field

import pytest

from testtime.engines.base import Request
from testtime.spec import SamplingParams

BOS, BLOCK = 1, 16


class FakeParams:
    def __init__(self, n=1, seed=None, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                 presence_penalty=0.0, frequency_penalty=0.0, max_tokens=16, stop=None, logprobs=None):
        if not 0 <= temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {temperature}.")
        if temperature < 1e-5 and n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {n}.")
        if top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}.")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {repetition_penalty}.")
        self.__dict__.update(n=n, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                             repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                             frequency_penalty=frequency_penalty, max_tokens=max_tokens, stop=stop, logprobs=logprobs)


@dataclass
class Logprob:
    logprob: float
    decoded_token: str | None = None


@dataclass
class Out:
    text: str
    token_ids: list
    finish_reason: str | None
    stop_reason: object = None
    logprobs: list | None = None


@dataclass
class ReqOut:
    request_id: str
    prompt_token_ids: list
    outputs: list
    finished: bool
    num_cached_tokens: int = 0


class FakeTokenizer:
    chat_template = "<s>{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, chat_template=None):
        assert tokenize is False and add_generation_prompt is True
        head = "<s>" if chat_template is None else "[custom]"
        return head + "".join(f" <{m['role']}> {m['content']}" for m in messages) + " <assistant>"

    def encode(self, text, add_special_tokens=True):
        words = text.split()
        ids = [BOS if w == "<s>" else 2 + sum(map(ord, w)) % 1000 for w in words]
        return ([BOS] if add_special_tokens else []) + ids

    def decode(self, ids):
        return f"t{ids[0]}"


@dataclass
class Running:
    rid: str
    ids: list
    params: FakeParams
    cached: int
    done: int = 0


@dataclass
class FakeEngine:
    max_num_seqs: int = 4
    waiting: list = field(default_factory=list)
    running: list = field(default_factory=list)
    blocks: set = field(default_factory=set)
    queued_at_step: list = field(default_factory=list)
    aborted: list = field(default_factory=list)
    prompts: list = field(default_factory=list)
    params: list = field(default_factory=list)
    finished: int = 0
    finish_step: dict = field(default_factory=dict)

    def add_request(self, request_id, prompt, params):
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id)}")
        ids = list(prompt["prompt_token_ids"])
        self.prompts.append(ids)
        self.params.append(params)
        hashes = [tuple(ids[:(b + 1) * BLOCK]) for b in range((len(ids) - 1) // BLOCK)]
        hit = 0
        for h in hashes:  # whole blocks only, never the last token
            if h not in self.blocks:
                break
            hit += BLOCK
        self.blocks.update(hashes)
        self.waiting.append(Running(request_id, ids, params, hit))

    def step(self):
        self.queued_at_step.append((len(self.waiting) + len(self.running), self.finished))
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.pop(0))
        outs = []
        for r in list(self.running):
            r.done += 1
            length = 1 + (r.params.seed or 0) % 3  # each sample its own length
            finished = r.done >= min(length, r.params.max_tokens)
            text = f"seed {r.params.seed}: step one\n\nstep two"
            stop_reason = None
            for s in r.params.stop or []:
                if s in text:
                    text, stop_reason = text[:text.index(s)], s
            lps = [{7: Logprob(-0.2, "Yes"), 8: Logprob(-1.9, "No")}] if r.params.logprobs else None
            outs.append(ReqOut(r.rid, r.ids, [Out(text, [7, 1, 2][:r.done], "stop" if finished else None,
                                                  stop_reason, lps)], finished, r.cached))
            if finished:
                self.running.remove(r)
                self.finished += 1
                self.finish_step[r.params.seed] = len(self.queued_at_step)
        return outs

    def abort_request(self, ids):
        self.aborted += ids
        self.running = [r for r in self.running if r.rid not in ids]
        self.waiting = [r for r in self.waiting if r.rid not in ids]


class FakeLLM:
    instances = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.llm_engine = FakeEngine(max_num_seqs=kwargs.get("max_num_seqs", 4))
        self.llm_engine.vllm_config = types.SimpleNamespace(
            scheduler_config=types.SimpleNamespace(max_num_seqs=self.llm_engine.max_num_seqs))
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return FakeTokenizer()


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    FakeLLM.instances.clear()
    return mod


MSGS = ({"role": "user", "content": "2+3?"},)


def test_one_request_and_seed_per_sample_with_prefix_caching(fake_vllm):
    from testtime.engines.vllm import VLLMEngine

    eng = VLLMEngine("org/model", tensor_parallel_size=2)
    llm = FakeLLM.instances[0]
    assert llm.kwargs["enable_prefix_caching"] is True and llm.kwargs["tensor_parallel_size"] == 2
    reqs = [Request(key="a", seeds=(10, 11), params=SamplingParams(max_tokens=9, stop=("\n\n",), top_k=0),
                    messages=MSGS, continuation="Step 1:"),
            Request(key="b", seeds=(12, 13), params=SamplingParams(max_tokens=9, logprobs=2), prompt="raw text")]
    got = {(c.key, c.index): c for c in eng.generate(reqs)}
    assert {(k, c.seed) for k, c in got.items()} == {(("a", 0), 10), (("a", 1), 11), (("b", 0), 12), (("b", 1), 13)}
    sp = llm.llm_engine.params[0]
    assert (sp.n, sp.seed, sp.max_tokens, sp.stop, sp.top_k, sp.repetition_penalty) == (1, 10, 9, ["\n\n"], 0, 1.0)
    a0 = got[("a", 0)]
    assert a0.text == "seed 10: step one" and a0.stop_hit == "\n\n"
    assert got[("b", 0)].logprobs[0].top == {"Yes": -0.2, "No": -1.9} and got[("b", 0)].stop_hit is None
    assert eng.identity()["engine"] == "vllm" and eng.identity()["model"] == "org/model"


def test_a_template_that_prints_bos_gives_exactly_one(fake_vllm):
    from testtime.engines.vllm import VLLMEngine

    eng = VLLMEngine("m")
    ids = eng.prompt_ids(Request(key=0, seeds=(1,), params=SamplingParams(), messages=MSGS, continuation="Step 1:"))
    assert ids[0] == BOS and ids.count(BOS) == 1
    tok = FakeTokenizer()
    assert ids[-2:] == tok.encode("Step 1:", add_special_tokens=False)  # the continuation, verbatim, appended
    raw = eng.prompt_ids(Request(key=0, seeds=(1,), params=SamplingParams(), prompt="1 2 3"))
    assert raw[0] == BOS  # a base-model prompt keeps the tokenizer's BOS
    custom = VLLMEngine("m", chat_template="{{ messages }}")
    assert custom.prompt_ids(Request(key=0, seeds=(1,), params=SamplingParams(), messages=MSGS))[0] != BOS


def test_the_queue_stays_full_and_samples_stream_out(fake_vllm):
    from testtime.engines.vllm import VLLMEngine

    eng = VLLMEngine("m", max_num_seqs=4, max_in_flight=8)
    core = FakeLLM.instances[0].llm_engine
    reqs = [Request(key=k, seeds=tuple(range(100 * k, 100 * k + 5)), params=SamplingParams(max_tokens=5),
                    messages=({"role": "user", "content": f"problem {k}"},)) for k in range(6)]
    seen = 0
    for c in eng.generate(iter(reqs)):
        seen += 1
        assert core.finish_step[c.seed] == len(core.queued_at_step)  # yielded before the next step
    assert seen == 30
    # before every step, the engine held as many samples as it may (8) or all that were left
    assert [q for q, _ in core.queued_at_step] == [min(8, 30 - done) for _, done in core.queued_at_step]


def test_cached_tokens_come_from_the_engine_in_whole_blocks(fake_vllm):
    from testtime.engines.vllm import VLLMEngine

    eng = VLLMEngine("m", max_in_flight=1)
    long = ({"role": "user", "content": " ".join(f"w{i}" for i in range(40))},)
    got = sorted(eng.generate([Request(key=0, seeds=(1, 2), params=SamplingParams(max_tokens=3), messages=long)]),
                 key=lambda c: c.index)
    n = got[0].prompt_tokens
    assert got[0].cached_tokens == 0
    assert got[1].cached_tokens == (n - 1) // BLOCK * BLOCK < n


def test_bad_parameters_fail_before_anything_is_queued(fake_vllm):
    from testtime.engines.vllm import VLLMEngine
    from testtime.spec import SpecError

    eng = VLLMEngine("m")
    with pytest.raises(SpecError, match=r"temperature must be in \[0, 2\].*got 2.5"):
        list(eng.generate([Request(key=0, seeds=(1,), params=SamplingParams(temperature=2.5), messages=MSGS)]))
    assert FakeLLM.instances[0].llm_engine.prompts == []
    # greedy: one request per sample, n == 1, which vLLM accepts
    got = list(eng.generate([Request(key=0, seeds=(1, 2), params=SamplingParams(temperature=0.0), messages=MSGS)]))
    assert len(got) == 2


def test_closing_early_aborts_what_is_in_flight(fake_vllm):
    from testtime.engines.vllm import VLLMEngine

    eng = VLLMEngine("m", max_in_flight=4)
    gen = eng.generate([Request(key=0, seeds=tuple(range(10)), params=SamplingParams(max_tokens=3), messages=MSGS)])
    next(gen)
    gen.close()
    core = FakeLLM.instances[0].llm_engine
    assert core.aborted and core.running == [] and core.waiting == []


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


def test_gpu_smoke_says_why_it_skips_without_a_gpu():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("gpu_smoke: skipped: ") and len(out.stdout.splitlines()) == 1
