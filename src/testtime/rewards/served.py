"""A process reward model behind HTTP.

Three wire formats:

- `vllm`: vLLM's pooling API (`POST {base_url}/pooling`) serving a PRM whose
  architecture pools at step tags, such as Qwen2.5-Math-PRM-7B
  (`vllm serve Qwen/Qwen2.5-Math-PRM-7B`: a pooling model with STEP pooling by
  default, step tag `<extra_0>`). The input is the question, then each step
  followed by the model's step tag; the response holds one row of class
  probabilities per step tag, and `good_index` picks the column that means
  "this step is good". Items go `batch` to a request (`input` as a list).
  What it costs: vLLM turns prefix caching off for STEP pooling, so every
  call computes its whole path again. A beam search that scores each path
  after every step pays for step 1 at every depth: the PRM's tokens grow with
  the square of the depth (they are counted from vLLM's `usage`).
- `logprobs`: a PRM that is a causal LM reading "good"/"bad" tokens at a step
  tag (Math-Shepherd: ` ки`, then `+` or `-`), scored through a generate
  server's `/v1/completions`: for each step, the path up to that step's tag,
  one token, top logprobs; the score is P(good) / (P(good) + P(bad)). vLLM's
  pooling runner cannot do this: converting a `*ForCausalLM` model to a
  pooling model drops its LM head, so `returned_token_ids` would pick
  hidden-state columns, not vocabulary logits. A generate server keeps prefix
  caching on, so each step's prefix is computed once.
- `scores`: any endpoint that takes `{"question": ..., "steps": [...]}` and returns
  `{"scores": [one per step]}` (`POST {base_url}`): a thin adapter in front of
  any scorer.

Requests are sent concurrently (bounded), retried with backoff on connection
errors, 429 and 5xx, and fail with a clear message otherwise.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ..errors import InfrastructureError, InputError
from ..flops import Usage
from .base import REWARD_MODELS, Scoring


class RewardServerError(InfrastructureError):
    """The reward server could not be reached or answered something unusable."""


@REWARD_MODELS.register("served")
class ServedPRM:
    name = "served"

    def __init__(self, base_url: str, model: str | None = None, wire: str = "vllm",
                 step_tag: str = "\n\n", good_index: int = -1, question_template: str = "{question}\n",
                 concurrency: int = 8, timeout_s: float = 60.0, retries: int = 3, batch: int = 16,
                 good_token: str = "+", bad_token: str = "-", top_logprobs: int = 20, shape: Any = None):
        """
        wire: "vllm" (pooling API), "logprobs" (a generate server's completions) or "scores".
        step_tag: text after each step (the PRM's step tag).
        good_index: vllm: the column of a pooled row that means "good".
        batch: vllm: items per request.
        good_token, bad_token, top_logprobs: logprobs: the tokens read after each step tag,
            among how many top alternatives (a token outside them counts as impossible).
        shape: the PRM's `flops.ModelShape` (e.g. `ModelShape.from_hf_config(...)`), so
            FLOPs can count what scoring computed; without it only tokens are counted.
        """
        if wire not in ("vllm", "logprobs", "scores"):
            raise InputError(f"wire must be 'vllm', 'logprobs' or 'scores', got {wire!r}")
        if batch < 1:
            raise InputError(f"batch must be >= 1, got {batch}")
        self.base_url = base_url.rstrip("/")
        self.model, self.wire = model, wire
        self.step_tag, self.good_index, self.question_template = step_tag, good_index, question_template
        self.concurrency, self.timeout_s, self.retries, self.batch = concurrency, timeout_s, retries, batch
        self.good_token, self.bad_token, self.top_logprobs = good_token, bad_token, top_logprobs
        self._shape = shape
        self.usage = Usage()
        """Tokens the server reported scoring (vLLM's `usage.prompt_tokens`)."""
        self.unmetered = 0
        """Scoring calls whose response reported no token count."""
        self._lock = threading.Lock()

    def identity(self) -> dict[str, Any]:
        ident = {"reward_model": "served", "url": self.base_url, "model": self.model, "wire": self.wire,
                 "step_tag": self.step_tag, "good_index": self.good_index}
        if self.wire == "logprobs":
            ident.update(good_token=self.good_token, bad_token=self.bad_token)
        return ident

    def _post(self, url: str, body: dict[str, Any]) -> Any:
        data = json.dumps(body).encode()
        delay = 0.5
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                if (e.code == 429 or e.code >= 500) and attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                detail = e.read()[:300].decode(errors="replace")
                raise RewardServerError(f"reward server {url} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise RewardServerError(f"reward server {url} unreachable after {self.retries + 1} tries: "
                                        f"{getattr(e, 'reason', e)}") from None
            except ValueError:
                raise RewardServerError(f"reward server {url} did not answer JSON") from None
        raise AssertionError("unreachable")

    def shape(self) -> Any:
        return self._shape

    def _meter(self, out: Any, texts: Sequence[str] = ("",)) -> None:
        """Count the tokens the server reports; a batch's total is shared out over its
        items by length, so each counts as one sequence of about its own size."""
        tokens = (out.get("usage") or {}).get("prompt_tokens") if isinstance(out, dict) else None
        with self._lock:
            if not (isinstance(tokens, int) and tokens >= 0):
                self.unmetered += 1
                return
            total = sum(len(t) for t in texts) or 1
            shares = [tokens * len(t) // total for t in texts[:-1]]
            for share in shares + [tokens - sum(shares)]:
                self.usage += Usage.of(share, 0, 0)

    def _path(self, item: Scoring, upto: int | None = None) -> str:
        steps = item.steps if upto is None else item.steps[:upto]
        return self.question_template.format(question=item.question) + "".join(s + self.step_tag for s in steps)

    def _check(self, scores: Any, steps: int) -> None:
        if not isinstance(scores, list) or len(scores) != steps:
            raise RewardServerError(f"reward server returned {len(scores) if isinstance(scores, list) else 'no'} "
                                    f"scores for {steps} steps (is the step tag right? {self.step_tag!r})")

    def _scores_one(self, item: Scoring) -> list[float]:
        out = self._post(self.base_url, {"question": item.question, "steps": list(item.steps)})
        self._meter(out)
        scores = out.get("scores") if isinstance(out, dict) else None
        self._check(scores, len(item.steps))
        return [float(s) for s in scores[item.known:]]

    def _pooling_batch(self, items: Sequence[Scoring]) -> list[list[float]]:
        texts = [self._path(item) for item in items]
        body: dict[str, Any] = {"input": texts}
        if self.model:
            body["model"] = self.model
        out = self._post(f"{self.base_url}/pooling", body)
        self._meter(out, texts)
        try:
            data = sorted(out["data"], key=lambda d: d.get("index", 0))
            rows_per_item = [d["data"] for d in data]
        except (KeyError, TypeError, AttributeError):
            raise RewardServerError(f"unexpected pooling response from {self.base_url}: {str(out)[:300]}") from None
        if len(rows_per_item) != len(items):
            raise RewardServerError(f"pooling response from {self.base_url} has {len(rows_per_item)} results for "
                                    f"{len(items)} inputs")
        result = []
        for item, rows in zip(items, rows_per_item):
            try:
                scores = [float(r[self.good_index]) if isinstance(r, list) else float(r) for r in rows]
            except (IndexError, TypeError, ValueError):
                raise RewardServerError(f"unexpected pooling rows from {self.base_url}: {str(rows)[:300]}") from None
            self._check(scores, len(item.steps))
            result.append(scores[item.known:])
        return result

    def _logprob_step(self, item: Scoring, k: int) -> float:
        """P(good) / (P(good) + P(bad)) after step k's tag, from one generated token's top logprobs."""
        prompt = self._path(item, k + 1).rstrip()  # the tag's last token predicts good or bad
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                                "logprobs": self.top_logprobs}
        if self.model:
            body["model"] = self.model
        out = self._post(f"{self.base_url}/v1/completions", body)
        self._meter(out, (prompt,))
        try:
            top = out["choices"][0]["logprobs"]["top_logprobs"][0]
        except (KeyError, IndexError, TypeError):
            raise RewardServerError(f"unexpected completions response from {self.base_url}: {str(out)[:300]}") from None
        found = {t.strip(): v for t, v in top.items()}
        good, bad = found.get(self.good_token.strip()), found.get(self.bad_token.strip())
        if good is None and bad is None:
            raise RewardServerError(f"neither {self.good_token!r} nor {self.bad_token!r} is among the top "
                                    f"{self.top_logprobs} tokens after the step tag {self.step_tag!r}: is the PRM "
                                    f"or the tag right? (top: {list(top)[:5]})")
        if good is None:
            return 0.0
        if bad is None:
            return 1.0
        return 1.0 / (1.0 + math.exp(bad - good))

    def score(self, items: Sequence[Scoring]) -> list[list[float]]:
        if not items:
            return []
        if self.wire == "scores":
            jobs, run = list(items), self._scores_one
        elif self.wire == "vllm":
            jobs = [items[i:i + self.batch] for i in range(0, len(items), self.batch)]
            run = self._pooling_batch
        else:
            jobs = [(item, k) for item in items for k in range(item.known, len(item.steps))]
            run = lambda job: self._logprob_step(*job)  # noqa: E731
        with ThreadPoolExecutor(min(self.concurrency, len(jobs) or 1)) as ex:
            results = list(ex.map(run, jobs))
        if self.wire == "scores":
            return results
        if self.wire == "vllm":
            return [scores for batch in results for scores in batch]
        out, it = [], iter(results)
        for item in items:
            out.append([next(it) for _ in range(item.known, len(item.steps))])
        return out
