"""Token sampling over a batch of logits rows, vectorised in numpy.

Why not llama.cpp's sampler chains: one chain per sequence walks the whole
49k-token vocabulary several times per token, which cost about a fifth of
decode throughput at batch 16 here. Why not a per-row sort: a small model's
next-token distribution is flat (on SmolLM2-135M nearly every token lies
within 30 nats of the best), so nothing can be pruned cheaply, and sorting
49k entries per row per step costs a fifth of a decode step.

So the common path is O(vocab) and vectorised over the rows that share
parameters:
- temperature: one exp over the (rows, vocab) block;
- min_p, top_k: thresholds on the tempered log-probabilities (np.partition
  finds the k-th largest in linear time; tokens tied with it are kept too);
- top_p: the 1024 likeliest tokens of each row are found in linear time; when
  they hold top_p of the mass (the usual case) the nucleus is among them and
  only they are sorted; otherwise that row is sorted in full. Either way the
  kept set is exactly the sorted-prefix nucleus;
- the draw: an inverse CDF in token-id order, done in two levels (sums of
  blocks of 256 tokens, then one block), because a cumulative sum over the
  whole block of rows costs more than everything else together.

With top-k (the default sampler is truncated: top-k 40, top-p 0.95, min-p
0.05) everything after the top-k selection happens on the k candidates of each
row, vectorised over rows: no exp over the vocabulary, no nucleus search, a
draw over k numbers. It keeps exactly the tokens the general path keeps and
draws the same token for the same uniform number (tested against it); a row
whose k-th value is tied with others goes the general way.

Randomness is stateless: the uniform number for step t of a sample with seed s
is a hash of (s, t). A sample's draws therefore do not depend on which other
samples share its batch, on the order of completion, or on resuming.
"""

import math

import numpy as np

from ..spec import SamplingParams

_MASK64 = (1 << 64) - 1
_NUCLEUS_CANDIDATES = 1024
_BLOCK = 256


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step)."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 11) * (1.0 / (1 << 53))


def _nucleus(z: np.ndarray, p: np.ndarray, top_p: float) -> np.ndarray:
    """Mask of the smallest most-likely set of each row holding top_p of its mass.
    z: tempered log-probabilities relative to the row's best (<= 0); p = exp(z)."""
    rows, vocab = z.shape
    keep = np.zeros(z.shape, dtype=bool)
    total = p.sum(axis=1, dtype=np.float64)
    k = min(_NUCLEUS_CANDIDATES, vocab)
    kth = np.partition(z, vocab - k, axis=1)[:, vocab - k]  # values are cheaper to select than indices
    for r in range(rows):
        idx = np.flatnonzero(z[r] >= kth[r])
        if p[r, idx].sum(dtype=np.float64) < top_p * total[r]:
            idx = np.arange(vocab)
        # likeliest first; ties by token id, so the set is deterministic
        idx = idx[np.lexsort((idx, -z[r, idx]))]
        cut = int(np.searchsorted(np.cumsum(p[r, idx], dtype=np.float64), top_p * total[r])) + 1
        keep[r, idx[:cut]] = True
    return keep


def _draw(p: np.ndarray, seeds, steps) -> np.ndarray:
    """Inverse-CDF draw of one token per row of unnormalised probabilities p."""
    rows, vocab = p.shape
    n_blocks = -(-vocab // _BLOCK)
    if n_blocks * _BLOCK != vocab:
        p = np.concatenate([p, np.zeros((rows, n_blocks * _BLOCK - vocab), p.dtype)], axis=1)
    blocks = p.reshape(rows, n_blocks, _BLOCK)
    cum_blocks = np.cumsum(blocks.sum(axis=2, dtype=np.float64), axis=1)
    out = np.empty(rows, dtype=np.int64)
    for r in range(rows):
        target = uniform(int(seeds[r]), int(steps[r])) * cum_blocks[r, -1]
        j = min(int(np.searchsorted(cum_blocks[r], target, side="right")), n_blocks - 1)
        within = target - (cum_blocks[r, j - 1] if j > 0 else 0.0)
        cum = np.cumsum(blocks[r, j], dtype=np.float64)
        i = int(np.searchsorted(cum, within, side="right"))
        if i >= _BLOCK or blocks[r, j, i] == 0:  # rounding at the block's end
            i = int(np.flatnonzero(blocks[r, j])[-1])
        out[r] = j * _BLOCK + i
    return out


def _top_k_candidates(z: np.ndarray, k: int) -> np.ndarray | None:
    """Indices (rows, k) of each row's k largest values, or None when some row has
    other values tied with its k-th (top-k then keeps more than k tokens)."""
    vocab = z.shape[1]
    idx = np.argpartition(z, vocab - k, axis=1)[:, vocab - k:]
    kth = np.take_along_axis(z, idx, axis=1).min(axis=1)
    if ((z >= kth[:, None]).sum(axis=1) != k).any():
        return None
    return idx


def _sample_candidates(z: np.ndarray, idx: np.ndarray, params: SamplingParams, seeds, steps) -> np.ndarray:
    """min-p, top-p and the draw over each row's top-k candidates (see the module doc)."""
    rows, k = idx.shape
    zc = np.take_along_axis(z, idx, axis=1)
    pc = np.exp(zc)
    if params.min_p > 0:
        pc[zc < np.float32(math.log(params.min_p))] = 0.0
    if params.top_p < 1.0:
        order = np.lexsort((idx, -zc), axis=1)  # likeliest first; ties by token id
        cum = np.cumsum(np.take_along_axis(pc, order, axis=1), axis=1, dtype=np.float64)
        target = params.top_p * cum[:, -1]
        cut = (cum < target[:, None]).sum(axis=1) + 1
        drop = np.arange(k)[None, :] >= cut[:, None]
        np.put_along_axis(pc, order, np.where(drop, 0.0, np.take_along_axis(pc, order, axis=1)), axis=1)
    by_id = np.argsort(idx, axis=1)  # the draw walks tokens in id order, as the general path does
    ids = np.take_along_axis(idx, by_id, axis=1)
    cum = np.cumsum(np.take_along_axis(pc, by_id, axis=1), axis=1, dtype=np.float64)
    out = np.empty(rows, dtype=np.int64)
    for r in range(rows):
        i = int(np.searchsorted(cum[r], uniform(int(seeds[r]), int(steps[r])) * cum[r, -1], side="right"))
        out[r] = ids[r, min(i, k - 1)]
    return out


def sample_rows(logits: np.ndarray, params: SamplingParams, seeds, steps) -> np.ndarray:
    """Draw one token per row of raw logits (rows, vocab), all rows under `params`;
    row i uses uniform(seeds[i], steps[i])."""
    if params.greedy:
        return np.argmax(logits, axis=1)
    z = np.asarray(logits, dtype=np.float32) - np.max(logits, axis=1, keepdims=True)
    z *= np.float32(1.0 / params.temperature)
    if 0 < params.top_k <= _NUCLEUS_CANDIDATES and params.top_k < z.shape[1]:
        idx = _top_k_candidates(z, params.top_k)
        if idx is not None:
            return _sample_candidates(z, idx, params, seeds, steps)
    p = np.exp(z)
    if params.min_p > 0:
        p[z < np.float32(math.log(params.min_p))] = 0.0
    if params.top_k and params.top_k < z.shape[1]:
        kth = np.partition(z, z.shape[1] - params.top_k, axis=1)[:, z.shape[1] - params.top_k]
        p[z < kth[:, None]] = 0.0
    if params.top_p < 1.0:
        p[~_nucleus(z, p, params.top_p)] = 0.0
    return _draw(p, seeds, steps)


def sample_row(logits: np.ndarray, params: SamplingParams, seed: int, step: int) -> int:
    """Draw one token from one row of raw logits."""
    return int(sample_rows(logits[None, :], params, [seed], [step])[0])


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
