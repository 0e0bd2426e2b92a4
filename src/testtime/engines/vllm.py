"""vLLM in-process on GPUs (`pip install 'testtime[vllm]'`).

A thin layer over vLLM's offline API, `LLM.generate(prompts, sampling_params)`:

- every sample is its own prompt with its own `SamplingParams(n=1, seed=...)`,
  so sample i of a problem is reproducible alone, as with the other engines;
  automatic prefix caching (on) computes a prompt shared by many samples once;
- chats are rendered with the model's tokenizer chat template
  (`add_generation_prompt=True`) and a partial assistant message is appended
  verbatim, so step-wise search never re-templates;
- `tensor_parallel_size` spreads one replica over GPUs; run one replica per GPU
  group and shard problems across them with the Ray runner for more.

Requests are taken in chunks of `chunk` samples; each chunk is one
`LLM.generate` call (vLLM batches it continuously inside), and its completions
are yielded when it returns.

On a GPU machine:

    pip install 'testtime[vllm]'
    testtime sample --engine vllm --engine-arg model=Qwen/Qwen2.5-Math-1.5B-Instruct \\
        --engine-arg tensor_parallel_size=1 --task gsm8k -n 64 --max-tokens 512
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Iterator

from .base import ENGINES, Completion, Request, TokenLogprob


@ENGINES.register("vllm")
class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, dtype: str = "auto", chunk: int = 1024, shape: Any = None,
                 **llm_kwargs: Any):
        try:
            import vllm
        except ImportError:
            raise ImportError("the vllm engine needs vLLM and a GPU: pip install 'testtime[vllm]' "
                              "(or use the llamacpp engine on a CPU, or the openai engine against a vLLM server)") from None
        self._vllm = vllm
        self.model_name, self.chunk = model, chunk
        kwargs = {"model": model, "tensor_parallel_size": tensor_parallel_size, "enable_prefix_caching": True,
                  "gpu_memory_utilization": gpu_memory_utilization, "dtype": dtype, **llm_kwargs}
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._shape = shape

    def identity(self) -> dict[str, Any]:
        template = getattr(self.tokenizer, "chat_template", None) or ""
        return {"engine": "vllm", "model": self.model_name,
                "chat_template": hashlib.sha256(str(template).encode()).hexdigest()[:12]}

    def shape(self) -> Any:
        if self._shape is None:
            from ..flops import ModelShape

            cfg = getattr(getattr(self.llm.llm_engine, "model_config", None), "hf_config", None)
            if cfg is not None:
                self._shape = ModelShape.from_hf_config(cfg.to_dict(), name=self.model_name)
        return self._shape

    def prompt(self, req: Request) -> str:
        if req.prompt is not None:
            return req.prompt
        text = self.tokenizer.apply_chat_template(list(req.messages), tokenize=False, add_generation_prompt=True)
        return text + req.continuation

    def params(self, req: Request, seed: int) -> Any:
        p = req.params
        return self._vllm.SamplingParams(n=1, seed=seed, temperature=p.temperature, top_p=p.top_p,
                                         top_k=p.top_k if p.top_k > 0 else -1, min_p=p.min_p,
                                         max_tokens=p.max_tokens, stop=list(p.stop) or None,
                                         logprobs=p.logprobs)

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        batch: list[tuple[Request, int]] = []
        for req in requests:
            batch += [(req, i) for i in range(req.n)]
            while len(batch) >= self.chunk:
                yield from self._run(batch[:self.chunk])
                batch = batch[self.chunk:]
        if batch:
            yield from self._run(batch)

    def _run(self, batch: list[tuple[Request, int]]) -> Iterator[Completion]:
        prompts = {}
        for req, _ in batch:
            if id(req) not in prompts:
                prompts[id(req)] = self.prompt(req)
        outs = self.llm.generate([prompts[id(r)] for r, _ in batch], [self.params(r, r.seeds[i]) for r, i in batch],
                                 use_tqdm=False)
        for (req, i), out in zip(batch, outs):
            o = out.outputs[0]
            stop_reason = getattr(o, "stop_reason", None)
            yield Completion(key=req.key, index=i, seed=req.seeds[i], text=o.text, token_ids=list(o.token_ids),
                             prompt_tokens=len(out.prompt_token_ids or []),
                             cached_tokens=int(getattr(out, "num_cached_tokens", 0) or 0),
                             finish_reason="length" if o.finish_reason == "length" else "stop",
                             logprobs=_logprobs(o, self.tokenizer) if req.params.logprobs is not None else None,
                             stop_hit=stop_reason if isinstance(stop_reason, str) else None)

    def close(self) -> None:
        self.llm = None


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
