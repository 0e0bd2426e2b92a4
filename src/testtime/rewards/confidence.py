"""`confidence`: the policy's own token confidence as a reward model (issue 13).

It reads the per-token statistics the engine recorded while sampling
(`testtime.confidence`), so it costs nothing: no forward pass, no judge. A sample
gets one score, its trace's confidence under `metric`; best-of-N and weighted
voting use it like any reward model's score (the DeepConf confidence-weighted
vote is weighted best-of-N with these scores; its offline filter is the
`filtered` selection). Scores are >= 0, higher is more confident: the DeepConf
measures and self-certainty are >= 0 already, and `mean_logprob` is given as the
geometric-mean token probability, exp(mean log p).

Text alone carries no logits, so step-wise search (beam, DVTS), which scores
partial solutions as it builds them, cannot use it yet: `score` says so.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..confidence import METRICS, TAIL, WINDOW, trace_score
from ..errors import InputError
from .base import REWARD_MODELS, Scoring


@REWARD_MODELS.register("confidence")
class ConfidenceScorer:
    name = "confidence"

    def __init__(self, metric: str = "lowest_group", window: int = WINDOW, tail: int = TAIL):
        """metric: mean, lowest_group, bottom10, tail (DeepConf), self_certainty or mean_logprob.
        window: tokens per sliding group (lowest_group, bottom10). tail: tokens at the end (tail)."""
        if metric not in METRICS:
            raise InputError(f"confidence metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if int(window) < 1 or int(tail) < 1:
            raise InputError(f"window and tail must be >= 1 tokens, got {window} and {tail}")
        self.metric, self.window, self.tail = metric, int(window), int(tail)

    def identity(self) -> dict[str, Any]:
        return {"reward_model": "confidence", "metric": self.metric, "window": self.window, "tail": self.tail}

    def score_stats(self, stats: np.ndarray) -> float | None:
        """A sample's score from its per-token stats; None where the measure is undefined
        (no tokens; self-certainty from a server that did not give the vocabulary size)."""
        value = trace_score(stats, self.metric, self.window, self.tail)
        if math.isnan(value):
            return None
        return math.exp(value) if self.metric == "mean_logprob" else max(value, 0.0)

    def score(self, items: Sequence[Scoring]) -> list[list[float]]:
        raise InputError("the confidence reward model scores samples from the token statistics their engine "
                         "recorded (a sampling run: sample --prm confidence); text alone has no logits, so "
                         "step-wise search strategies cannot use it")
