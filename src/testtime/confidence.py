"""Confidence from the tokens' own next-token distributions: signals that cost no
forward pass beyond the one that drew the token.

Per generated token, three numbers are kept (`FIELDS`), computed where the logits
are (the llama.cpp engine, from the full distribution) or from the top-k
log-probabilities a server returns (`from_top_logprobs`):

- `confidence`: DeepConf's token confidence, the negative mean log-probability of
  the k likeliest tokens, k = `TOP_K` = 20 (Fu et al. 2025, "Deep Think with
  Confidence"). High when the distribution is peaked.
- `self_certainty`: the KL divergence of the next-token distribution from the
  uniform one over the vocabulary, -log V - mean_j log p_j (Kang et al. 2025,
  "Scalable Best-of-N Selection via Self-Certainty").
- `logprob`: the drawn token's log-probability.

All use the model's own distribution (raw logits, before temperature or
truncation), so they do not depend on the sampler. From a server's top-k only,
confidence is exact when k >= 20 tokens came back (otherwise the mean is over
those given). Self-certainty is not: it is set by the whole tail of the
distribution, which a server does not return. Spreading the mass outside the
top-k evenly over the rest of the vocabulary (which needs the vocabulary size)
gives a lower bound (Jensen), exact only when the tail is flat; prefer the
llama.cpp engine, or vLLM's full logprobs, where self-certainty matters.

A trace's score (`trace_score`) reduces the per-token values: the DeepConf
measures `mean`, `lowest_group` (the least confident sliding window of `window`
tokens), `bottom10` (the mean of the 10% least confident windows) and `tail` (the
last `tail` tokens), and `self_certainty` and `mean_logprob`. DeepConf's windows
are 2048 tokens on traces of tens of thousands; the defaults here (32 and 64) are
scaled to the few hundred tokens a small model writes per answer.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

TOP_K = 20
FIELDS = ("confidence", "self_certainty", "logprob")
METRICS = ("mean", "lowest_group", "bottom10", "tail", "self_certainty", "mean_logprob")
WINDOW = 32
TAIL = 64


def row_stats(logits: np.ndarray, tokens: Sequence[int], k: int = TOP_K) -> np.ndarray:
    """(rows, 3) float32: confidence, self-certainty and the drawn token's
    log-probability for each row of raw logits (one row per sequence), exactly,
    from the full distribution. Vectorised over rows: one exp and one partition
    over the block."""
    x = np.asarray(logits, dtype=np.float32)
    rows, vocab = x.shape
    k = min(k, vocab)
    m = x.max(axis=1)
    e = np.subtract(x, m[:, None])
    np.exp(e, out=e)  # in place: the exp over the block is most of the cost (~3 ms at 16 x 49k)
    lse = m + np.log(e.sum(axis=1)).astype(np.float32)
    top = np.partition(x, vocab - k, axis=1)[:, vocab - k:]
    out = np.empty((rows, 3), np.float32)
    out[:, 0] = lse - top.mean(axis=1, dtype=np.float64)
    out[:, 1] = -math.log(vocab) - (x.mean(axis=1, dtype=np.float64) - lse)
    out[:, 2] = x[np.arange(rows), np.asarray(tokens, dtype=np.int64)] - lse
    return out


def from_top_logprobs(chosen: float, top: Sequence[float], vocab: int | None, k: int = TOP_K) -> tuple[float, float, float]:
    """The same three numbers from what an API returns for one token: the drawn
    token's log-probability and the top log-probabilities. Self-certainty is NaN
    without the vocabulary size."""
    top = sorted((float(v) for v in top), reverse=True)[:k]
    if not top:
        return float("nan"), float("nan"), float(chosen)
    conf = -sum(top) / len(top)
    sc = float("nan")
    if vocab is not None and vocab > len(top):
        rest = max(1.0 - sum(math.exp(v) for v in top), 1e-30)
        log_rest = math.log(rest / (vocab - len(top)))
        sc = -math.log(vocab) - (sum(top) + (vocab - len(top)) * log_rest) / vocab
    return conf, sc, float(chosen)


def from_logprobs(logprobs: Sequence, vocab: int | None = None, k: int = TOP_K) -> np.ndarray | None:
    """Per-token stats of a completion whose engine returned top log-probabilities
    (`engines.base.TokenLogprob`); None when it returned none or no alternatives."""
    if not logprobs or not any(t.top for t in logprobs):
        return None
    return np.array([from_top_logprobs(t.logprob, list(t.top.values()), vocab, k) for t in logprobs], np.float32)


def pack(stats: np.ndarray) -> bytes:
    """Per-token stats as stored: float32, row-major (tokens x FIELDS)."""
    return np.ascontiguousarray(stats, dtype="<f4").tobytes()


def unpack(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").reshape(-1, len(FIELDS))


def _windows(values: np.ndarray, window: int) -> np.ndarray:
    """Means of every run of `window` consecutive values (one mean when shorter)."""
    if len(values) <= window:
        return np.array([values.mean()])
    c = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    return (c[window:] - c[:-window]) / window


def trace_score(stats: np.ndarray, metric: str = "lowest_group", window: int = WINDOW, tail: int = TAIL) -> float:
    """One number per trace from its per-token stats; higher means more confident.
    NaN for an empty trace (it never wins a selection)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if window < 1 or tail < 1:
        raise ValueError(f"window and tail must be >= 1, got {window} and {tail}")
    if len(stats) == 0:
        return float("nan")
    conf = stats[:, 0].astype(np.float64)
    if metric == "mean":
        return float(conf.mean())
    if metric == "lowest_group":
        return float(_windows(conf, window).min())
    if metric == "bottom10":
        groups = np.sort(_windows(conf, window))
        return float(groups[:max(1, math.ceil(0.1 * len(groups)))].mean())
    if metric == "tail":
        return float(conf[-tail:].mean())
    if metric == "self_certainty":
        return float(np.nanmean(stats[:, 1])) if not np.all(np.isnan(stats[:, 1])) else float("nan")
    return float(stats[:, 2].mean())
