"""Token sampling over a batch of logits rows, in numpy.

Why not llama.cpp's sampler chains: one chain per sequence walks the whole
49k-token vocabulary several times per token (softmax, sort, filters), which
cost about a fifth of decode throughput at batch 16 here. This sampler first
drops every token whose probability is below e^-30 times the best one (they
hold under 5e-9 of the mass together, even over a 49k vocabulary), so the
filters and the draw work on a few hundred candidates at most.

Randomness is stateless: the uniform number for step t of a sample with seed s
is a hash of (s, t). A sample's draws therefore do not depend on which other
samples share its batch, on the order of completion, or on resuming.
"""

from __future__ import annotations

import math

import numpy as np

from ..spec import SamplingParams

_MASK64 = (1 << 64) - 1
# Below this many nats under the best logit, a token cannot matter (see above).
_CUTOFF_NATS = 30.0


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step)."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 11) * (1.0 / (1 << 53))


def sample_row(logits: np.ndarray, params: SamplingParams, seed: int, step: int) -> int:
    """Draw one token id from one row of raw logits under `params`."""
    if params.greedy:
        return int(np.argmax(logits))
    t = params.temperature
    best = float(logits.max())
    cand = np.flatnonzero(logits >= best - _CUTOFF_NATS * t)
    z = (logits[cand].astype(np.float64) - best) / t  # <= 0, best token at 0
    if params.min_p > 0:
        keep = z >= math.log(params.min_p)
        cand, z = cand[keep], z[keep]
    if params.top_k and len(cand) > params.top_k:
        part = np.argpartition(-z, params.top_k - 1)[: params.top_k]
        cand, z = cand[part], z[part]
    if params.top_p < 1.0:
        order = np.argsort(-z, kind="stable")
        cand, z = cand[order], z[order]
        p = np.exp(z)
        cum = np.cumsum(p)
        # smallest prefix whose mass reaches top_p of the total
        cut = int(np.searchsorted(cum, params.top_p * cum[-1])) + 1
        cand, z = cand[:cut], z[:cut]
    cum = np.cumsum(np.exp(z))
    i = int(np.searchsorted(cum, uniform(seed, step) * cum[-1], side="right"))
    return int(cand[min(i, len(cand) - 1)])


def log_softmax_row(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of one row under the untempered distribution (float64)."""
    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


def top_logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the n most likely tokens with theirs."""
    lp = log_softmax_row(logits)
    top: list[tuple[int, float]] = []
    if n > 0:
        idx = np.argpartition(-lp, n - 1)[:n]
        idx = idx[np.argsort(-lp[idx], kind="stable")]
        top = [(int(i), float(lp[i])) for i in idx]
    return float(lp[token]), top
