"""vLLM in-process on GPUs (`pip install 'testtime[vllm]'`, vLLM 0.33).

A thin layer over vLLM's engine loop (`LLM.llm_engine`: `add_request`, `step`):

- every sample is its own request with its own `SamplingParams(n=1, seed=...)`,
  so sample i of a problem is reproducible alone, as with the other engines;
  automatic prefix caching (on) computes a prompt shared by many samples once;
- the engine's queue is kept full: up to `max_in_flight` samples (four times
  the scheduler's `max_num_seqs` by default) are queued, a new one is added as
  soon as one finishes, and each is yielded (so stored) the moment it
  finishes; the GPU never idles at the tail of a chunk;
- prompts go in as token ids: the chat is rendered with the model's template
  and tokenized without special tokens (the template prints the BOS it wants:
  Llama 3, Gemma and Mistral templates do), and a partial assistant message is
  tokenized on its own and appended, so step-wise search never re-templates
  and no BOS is doubled; a raw prompt (base models) is tokenized with the
  tokenizer's own special tokens;
- `tensor_parallel_size` spreads one replica over GPUs; run one replica per GPU
  group and shard problems across them with the Ray runner for more.

Every sampling field is set explicitly (vLLM fills only what a request leaves
out from generation_config.json, and only on its server). vLLM rejects
temperature > 2, checked here before anything is queued. A fixed seed
reproduces a sample only within the same batch composition unless vLLM runs
with `VLLM_BATCH_INVARIANT=1` (Hopper-class GPUs): kernels reduce in a
batch-dependent order. Finish reasons `abort`, `error` and `repetition` are
passed on; the runner treats them as infrastructure failures.

On a GPU machine, first `python benchmarks/gpu_smoke.py`, then:

    pip install 'testtime[vllm]'
    testtime sample --engine vllm --engine-arg model=Qwen/Qwen2.5-Math-1.5B-Instruct \\
        --engine-arg tensor_parallel_size=1 --task gsm8k -n 64 --max-tokens 512
"""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from typing import Any, Iterable, Iterator

from ..errors import MissingDependencyError
from ..spec import SpecError
from .base import ENGINES, Completion, Request, TokenLogprob
from .chat import read_template

MAX_TEMPERATURE = 2.0
"""vLLM's SamplingParams: "temperature must be in [0, 2]"."""


@ENGINES.register("vllm")
class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, dtype: str = "auto", max_in_flight: int | None = None,
                 chat_template: str | None = None, shape: Any = None, **llm_kwargs: Any):
        """
        model: a Hugging Face model id or local folder.
        max_in_flight: samples queued in the engine at once [default: 4 x max_num_seqs].
        chat_template: Jinja source or a file overriding the tokenizer's template.
        llm_kwargs: passed to `vllm.LLM` (e.g. max_num_seqs, enable_chunked_prefill).
        """
        try:
            import vllm
        except ImportError:
            raise MissingDependencyError("the vllm engine needs vLLM and a GPU: pip install 'testtime[vllm]' "
                              "(or use the llamacpp engine on a CPU, or the openai engine against a vLLM server)") from None
        self._vllm = vllm
        self.model_name = model
        kwargs = {"model": model, "tensor_parallel_size": tensor_parallel_size, "enable_prefix_caching": True,
                  "gpu_memory_utilization": gpu_memory_utilization, "dtype": dtype, **llm_kwargs}
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        self._template = read_template(chat_template) if chat_template else None
        sched = getattr(getattr(self.engine, "vllm_config", None), "scheduler_config", None)
        self.max_in_flight = max_in_flight or 4 * int(getattr(sched, "max_num_seqs", 256))
        self._shape = shape
        self._ids = itertools.count()

    def identity(self) -> dict[str, Any]:
        template = self._template or getattr(self.tokenizer, "chat_template", None) or ""
        return {"engine": "vllm", "model": self.model_name,
                "chat_template": hashlib.sha256(str(template).encode()).hexdigest()[:12]}

    def shape(self) -> Any:
        if self._shape is None:
            from ..flops import ModelShape

            cfg = getattr(getattr(self.llm.llm_engine, "model_config", None), "hf_config", None)
            if cfg is not None:
                self._shape = ModelShape.from_hf_config(cfg.to_dict(), name=self.model_name)
        return self._shape

    def prompt_ids(self, req: Request) -> list[int]:
        """Token ids of a request's prefix: template rendered once, its own BOS only,
        the continuation tokenized on its own and appended."""
        if req.prompt is not None:
            return list(self.tokenizer.encode(req.prompt))
        kwargs = {"chat_template": self._template} if self._template else {}
        text = self.tokenizer.apply_chat_template(list(req.messages), tokenize=False, add_generation_prompt=True,
                                                  **kwargs)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if req.continuation:
            ids += self.tokenizer.encode(req.continuation, add_special_tokens=False)
        return ids

    def params(self, req: Request, seed: int) -> Any:
        p = req.params
        if p.temperature > MAX_TEMPERATURE:
            raise SpecError(f"temperature must be in [0, {MAX_TEMPERATURE:g}] for the vllm engine (vLLM rejects "
                            f"more), got {p.temperature!r}")
        return self._vllm.SamplingParams(n=1, seed=seed, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                         min_p=p.min_p, repetition_penalty=1.0, presence_penalty=0.0,
                                         frequency_penalty=0.0, max_tokens=p.max_tokens,
                                         stop=list(p.stop) or None, logprobs=p.logprobs)

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        source = iter(requests)
        waiting: deque[tuple[Request, int, list[int]]] = deque()
        live: dict[str, tuple[Request, int]] = {}
        exhausted = False
        try:
            while True:
                while len(live) < self.max_in_flight:  # keep the engine's queue full
                    if not waiting:
                        req = None if exhausted else next(source, None)
                        if req is None:
                            exhausted = True
                            break
                        ids = self.prompt_ids(req)
                        waiting.extend((req, i, ids) for i in range(req.n))
                    req, i, ids = waiting.popleft()
                    rid = f"tt-{next(self._ids)}"
                    self.engine.add_request(rid, {"prompt_token_ids": ids}, self.params(req, req.seeds[i]))
                    live[rid] = (req, i)
                if not live:
                    return
                for out in self.engine.step():
                    if out.finished and out.request_id in live:
                        req, i = live.pop(out.request_id)
                        yield self._completion(req, i, out)
        finally:
            if live:  # closed early: free the GPU of what nobody will read
                self.engine.abort_request(list(live))

    def _completion(self, req: Request, i: int, out: Any) -> Completion:
        o = out.outputs[0]
        stop_reason = getattr(o, "stop_reason", None)
        cached = getattr(out, "num_cached_tokens", None)
        return Completion(key=req.key, index=i, seed=req.seeds[i], text=o.text, token_ids=list(o.token_ids),
                          prompt_tokens=len(out.prompt_token_ids or []),
                          cached_tokens=None if cached is None else int(cached),
                          finish_reason=str(o.finish_reason or "error"),
                          logprobs=_logprobs(o, self.tokenizer) if req.params.logprobs is not None else None,
                          stop_hit=stop_reason if isinstance(stop_reason, str) else None)

    def close(self) -> None:
        self.llm = self.engine = None


def _logprobs(o: Any, tokenizer: Any) -> list[TokenLogprob] | None:
    if not o.logprobs:
        return None
    out = []
    for tid, pos in zip(o.token_ids, o.logprobs):
        def text(t: int, lp: Any) -> str:
            return lp.decoded_token if getattr(lp, "decoded_token", None) is not None else tokenizer.decode([t])
        chosen = pos.get(tid)
        out.append(TokenLogprob(text(tid, chosen) if chosen else tokenizer.decode([tid]),
                                float(chosen.logprob) if chosen else float("-inf"),
                                {text(t, lp): float(lp.logprob) for t, lp in pos.items()}))
    return out
