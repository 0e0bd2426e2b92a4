"""`confidence`: the policy's own token confidence as a reward model (issue 13).

It reads the per-token statistics the engine recorded while sampling
(`testtime.confidence`), so it costs nothing: no forward pass, no judge. A sample
gets one score, its trace's confidence under `metric`; best-of-N and weighted
voting use it like any reward model's score (the DeepConf confidence-weighted
vote is weighted best-of-N with these scores; its offline filter is the
`filtered` selection). Scores are >= 0, higher is more confident: the DeepConf
measures and self-certainty are >= 0 already, and `mean_logprob` is given as the
geometric-mean token probability, exp(mean log p).

Step-wise search (beam, DVTS, particle filtering) uses it too: each step's score
is the confidence of the partial solution up to it, from the statistics the
engine recorded for the steps (`strategies._steps`). Text alone carries no
logits, so scoring stored text (`score`) says so.
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

    def log_weight(self, score: float) -> float:
        """A score as a particle filter's log-potential: the DeepConf measures and
        self-certainty are in nats already; `mean_logprob` goes back to its log."""
        return math.log(max(score, 1e-30)) if self.metric == "mean_logprob" else score

    def score(self, items: Sequence[Scoring]) -> list[list[float]]:
        raise InputError("the confidence reward model scores samples from the token statistics their engine "
                         "recorded: a sampling run (sample --prm confidence) or a step-wise search, whose engine "
                         "records them as it generates; text alone has no logits")
