"""A tiny deterministic engine for tests and dry runs: no model, instant, seeded.

Each sample's text is a pure function of the prefix and the seed: a short
"reasoning" line and "The answer is N." with N drawn from 0..answer_range-1.
So with answer_range=10, a problem whose answer is below 10 is solved by about
one sample in ten: enough structure for coverage curves, resume and
determinism to be tested without loading a model.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Iterable, Iterator

from ..flops import ModelShape
from .base import ENGINES, Completion, Request, StreamStalled, is_cancelled, never_started


@ENGINES.register("toy")
class ToyEngine:
    name = "toy"
    streams_text = True
    """Calls `Request.on_token` with each word of a sample but the last."""

    def __init__(self, answer_range: int = 10, delay_s: float = 0.0, **_: Any):
        self.answer_range = answer_range
        self.delay_s = delay_s
        """Sleep per sample, so a test can kill a run part way through."""

    def identity(self) -> dict[str, Any]:
        return {"engine": "toy", "answer_range": self.answer_range}

    def shape(self) -> ModelShape:
        """A made-up small shape, so FLOPs accounting runs end to end on this engine."""
        return ModelShape("toy", params=1_000_000, n_layers=4, d_model=64, n_heads=4, n_kv_heads=4,
                          head_dim=16, vocab=1000, tied_embeddings=True, source="toy")

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        waited = False
        for req in requests:
            if req is None:  # every earlier sample is out already: a second wait in a row never ends
                if waited:
                    raise StreamStalled("the request stream waits for results, but no sample is running")
                waited = True
                continue
            waited = False
            prefix = req.prompt if req.prompt is not None else repr(req.messages) + req.continuation
            for i, seed in enumerate(req.seeds):
                if is_cancelled(req):
                    yield never_started(req, i)
                    continue
                if self.delay_s:
                    time.sleep(self.delay_s)
                h = int.from_bytes(hashlib.sha256(f"{prefix}|{seed}".encode()).digest()[:8], "little")
                text = f"Let me think ({h % 997}).\nThe answer is {h % self.answer_range}."
                hit = None
                if req.params.stop:
                    for s in req.params.stop:
                        if s in text:
                            text, hit = text[:text.index(s)], s
                words = text.split()[: req.params.max_tokens]
                if req.on_token is not None:  # every word but the last, as a real engine streams
                    for k, w in enumerate(words[:-1]):
                        req.on_token(i, w if k == 0 else " " + w)
                yield Completion(key=req.key, index=i, seed=seed, text=" ".join(words),
                                 token_ids=list(range(len(words))), prompt_tokens=len(prefix.split()),
                                 cached_tokens=0, finish_reason="stop", stop_hit=hit)

    def close(self) -> None:
        pass
