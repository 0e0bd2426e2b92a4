"""A process reward model behind HTTP.

Two wire formats:

- `vllm`: vLLM's pooling API (`POST {base_url}/pooling`) serving a PRM with step
  pooling. The input is the question, then each step followed by the model's
  step tag; the response holds one row of class probabilities per step tag, and
  `good_index` picks the column that means "this step is good". How the
  well-known open PRMs are served this way is in the README (step tag, the
  `--override-pooler-config` with `step_tag_id` and `returned_token_ids`).
- `scores`: any endpoint that takes `{"question": ..., "steps": [...]}` and returns
  `{"scores": [one per step]}` (`POST {base_url}`): a thin adapter in front of
  any scorer.

Requests are sent concurrently (bounded), retried with backoff on connection
errors, 429 and 5xx, and fail with a clear message otherwise.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ..flops import Usage
from .base import REWARD_MODELS, Scoring


class RewardServerError(RuntimeError):
    """The reward server could not be reached or answered something unusable."""


@REWARD_MODELS.register("served")
class ServedPRM:
    name = "served"

    def __init__(self, base_url: str, model: str | None = None, wire: str = "vllm",
                 step_tag: str = "\n\n", good_index: int = -1, question_template: str = "{question}\n",
                 concurrency: int = 8, timeout_s: float = 60.0, retries: int = 3, shape: Any = None):
        """shape: the PRM's `flops.ModelShape` (e.g. `ModelShape.from_hf_config(...)`), so
        FLOPs can count what scoring computed; without it only tokens are counted."""
        if wire not in ("vllm", "scores"):
            raise ValueError(f"wire must be 'vllm' or 'scores', got {wire!r}")
        self.base_url = base_url.rstrip("/")
        self.model, self.wire = model, wire
        self.step_tag, self.good_index, self.question_template = step_tag, good_index, question_template
        self.concurrency, self.timeout_s, self.retries = concurrency, timeout_s, retries
        self._shape = shape
        self.usage = Usage()
        """Tokens the server reported scoring (vLLM's `usage.prompt_tokens`)."""
        self.unmetered = 0
        """Scoring calls whose response reported no token count."""
        self._lock = threading.Lock()

    def identity(self) -> dict[str, Any]:
        return {"reward_model": "served", "url": self.base_url, "model": self.model, "wire": self.wire,
                "step_tag": self.step_tag, "good_index": self.good_index}

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

    def _meter(self, out: Any) -> None:
        tokens = (out.get("usage") or {}).get("prompt_tokens") if isinstance(out, dict) else None
        with self._lock:
            if isinstance(tokens, int) and tokens >= 0:
                self.usage += Usage.of(tokens, 0, 0)
            else:
                self.unmetered += 1

    def _one(self, item: Scoring) -> list[float]:
        steps = list(item.steps)
        if self.wire == "scores":
            out = self._post(self.base_url, {"question": item.question, "steps": steps})
            self._meter(out)
            scores = out.get("scores") if isinstance(out, dict) else None
        else:
            text = self.question_template.format(question=item.question) + \
                "".join(s + self.step_tag for s in steps)
            body: dict[str, Any] = {"input": text}
            if self.model:
                body["model"] = self.model
            out = self._post(f"{self.base_url}/pooling", body)
            self._meter(out)
            try:
                rows = out["data"][0]["data"]
                scores = [float(r[self.good_index]) if isinstance(r, list) else float(r) for r in rows]
            except (KeyError, IndexError, TypeError, ValueError):
                raise RewardServerError(f"unexpected pooling response from {self.base_url}: {str(out)[:300]}") from None
        if not isinstance(scores, list) or len(scores) != len(steps):
            raise RewardServerError(f"reward server returned {len(scores) if isinstance(scores, list) else 'no'} "
                                    f"scores for {len(steps)} steps (is the step tag right? {self.step_tag!r})")
        return [float(s) for s in scores[item.known:]]

    def score(self, items: Sequence[Scoring]) -> list[list[float]]:
        if not items:
            return []
        with ThreadPoolExecutor(min(self.concurrency, len(items))) as ex:
            return list(ex.map(self._one, items))
