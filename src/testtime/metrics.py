"""Metrics: pure functions over per-problem counts. Nothing here touches a model.

The inputs are arrays with one entry per problem: `n` samples drawn, `c` of them
correct. Every estimator is vectorised over problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def pass_at_k(n, c, k: int) -> np.ndarray:
    """Unbiased pass@k per problem: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    The ratio of binomials is the product over i = n-c+1..n of (1 - k/i), summed
    in log space with log1p and finished with expm1: exact to float precision
    for any n, where the binomials themselves overflow and differences of
    log-gamma values lose digits. Computed once per distinct (n, c) pair, which
    keeps it fast over thousands of problems. Problems with n < k have no
    unbiased estimate and get NaN.
    """
    n = np.asarray(n, dtype=np.int64)
    c = np.asarray(c, dtype=np.int64)
    if np.any(c > n) or np.any(c < 0):
        raise ValueError("each problem needs 0 <= c <= n")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = np.full(n.shape, np.nan, dtype=np.float64)
    ok = n >= k
    out[ok & (n - c < k)] = 1.0  # every k-subset holds a correct sample
    out[ok & (c == 0)] = 0.0
    rest = ok & (n - c >= k) & (c > 0)
    for nn, cc in set(zip(n[rest].tolist(), c[rest].tolist())):
        log_ratio = np.log1p(-k / np.arange(nn - cc + 1, nn + 1, dtype=np.float64)).sum()
        out[rest & (n == nn) & (c == cc)] = -np.expm1(log_ratio)
    return out


def chance_at_k(q, ks) -> np.ndarray:
    """Coverage at each k of a problem whose samples pass independently with
    probabilities `q` (one per sample): 1 - E[prod of (1 - q_i) over a random
    k-subset of the samples], the expectation taken exactly. With q in {0, 1} it is
    `pass_at_k`. NaN where k exceeds the samples.

    The mean of the products over k-subsets is e_k / C(m, k), e_k the elementary
    symmetric polynomial of the (1 - q_i); it obeys a_k(m) = (m-k)/m a_k(m-1)
    + k/m x_m a_{k-1}(m-1), every term in [0, 1], so no binomial is ever formed."""
    x = 1.0 - np.asarray(q, dtype=np.float64)
    if np.any(x < 0) or np.any(x > 1):
        raise ValueError("each probability must be in [0, 1]")
    ks = np.asarray(ks, dtype=np.int64)
    kmax = int(min(ks.max(initial=0), len(x)))
    a = np.zeros(kmax + 1)
    a[0] = 1.0
    j = np.arange(1, kmax + 1, dtype=np.float64)
    for m, xm in enumerate(x, 1):
        top = min(m, kmax)
        jj = j[:top]
        a[1:top + 1] = (m - jj) / m * a[1:top + 1] + jj / m * xm * a[:top]
    return np.array([1.0 - a[k] if 1 <= k <= len(x) else np.nan for k in ks])


def pass_at_k_matrix(n, c, ks) -> np.ndarray:
    """pass@k for every problem (rows) and every k in `ks` (columns)."""
    return np.stack([pass_at_k(n, c, int(k)) for k in ks], axis=1)


def coverage_curve(n, c, ks=None) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (mean pass@k over problems) for k = 1..min(n), or for the given ks."""
    n = np.asarray(n)
    if ks is None:
        ks = np.arange(1, int(n.min()) + 1)
    ks = np.asarray(ks, dtype=np.int64)
    return ks, np.nanmean(pass_at_k_matrix(n, c, ks), axis=0)


def log_spaced_ks(kmax: int, per_decade: int = 12) -> np.ndarray:
    """Integer ks from 1 to kmax, roughly evenly spaced on a log axis (always ends at kmax)."""
    if kmax < 1:
        return np.array([], dtype=np.int64)
    grid = np.unique(np.round(np.logspace(0, np.log10(kmax), per_decade * max(1, int(np.ceil(np.log10(kmax + 1))))))).astype(np.int64)
    return np.unique(np.concatenate([grid[(grid >= 1) & (grid <= kmax)], [kmax]]))


def bootstrap_ci(per_problem: np.ndarray, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over problems, for each column.

    `per_problem` is (problems, metrics). Problems are resampled with replacement,
    which is the variance that matters when a benchmark is a sample of problems.
    """
    x = np.asarray(per_problem, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    means = np.nanmean(x[idx], axis=1)  # (n_boot, metrics)
    lo, hi = np.nanpercentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return lo, hi


@dataclass(frozen=True)
class PowerLawFit:
    """coverage(k) = exp(a * k**b), fitted on k <= k_max_fit.

    With a < 0 and b < 0, log coverage rises towards 0 as a power of k: the
    exponentiated power law of Brown et al. (2024), "Large Language Monkeys".
    """

    a: float
    b: float
    a_se: float
    b_se: float
    k_max_fit: int
    rmse: float
    """Root mean squared error of the fit on the ks it was fitted to (coverage units)."""

    def predict(self, k) -> np.ndarray:
        return np.exp(self.a * np.power(np.asarray(k, dtype=np.float64), self.b))

    def interval(self, k, level: float = 0.95, draws: int = 2000, seed: int = 0):
        """Interval of the prediction at `level`, from draws of (a, b) under the
        fit's parameter standard errors."""
        rng = np.random.default_rng(seed)
        a = rng.normal(self.a, self.a_se, draws)
        b = rng.normal(self.b, self.b_se, draws)
        k = np.asarray(k, dtype=np.float64)
        pred = np.exp(np.minimum(a[:, None] * np.power(k[None, :], b[:, None]), 0.0))
        tail = 100 * (1 - level) / 2
        lo, hi = np.percentile(pred, [tail, 100 - tail], axis=0)
        return lo, hi


def fit_power_law(ks, coverage, k_max_fit: int | None = None) -> PowerLawFit:
    """Fit coverage(k) = exp(a k^b) on the points with k <= k_max_fit.

    Starts from the linear fit log(-log c) = log(-a) + b log k, then refines by
    least squares on coverage itself. Points with coverage 0 or 1 carry no
    information about the law's shape on the log-log scale and are dropped
    from the starting fit only.
    """
    ks = np.asarray(ks, dtype=np.float64)
    cov = np.asarray(coverage, dtype=np.float64)
    if k_max_fit is not None:
        keep = ks <= k_max_fit
        ks, cov = ks[keep], cov[keep]
    if len(ks) < 3:
        raise ValueError(f"need at least 3 values of k to fit a power law, got {len(ks)}")
    inner = (cov > 0) & (cov < 1)
    if inner.sum() >= 2:
        slope, icpt = np.polyfit(np.log(ks[inner]), np.log(-np.log(cov[inner])), 1)
        p0 = (-np.exp(icpt), min(slope, -1e-3))
    else:
        p0 = (-1.0, -0.5)

    def model(k, a, b):
        return np.exp(np.minimum(a * np.power(k, b), 0.0))

    from scipy.optimize import curve_fit  # here: importing scipy costs every command's start-up

    try:
        (a, b), pcov = curve_fit(model, ks, cov, p0=p0, bounds=([-np.inf, -10.0], [0.0, 0.0]), maxfev=20000)
        se = np.sqrt(np.clip(np.diag(pcov), 0, np.inf))
    except (RuntimeError, ValueError):
        (a, b), se = p0, np.array([np.inf, np.inf])
    rmse = float(np.sqrt(np.mean((model(ks, a, b) - cov) ** 2)))
    return PowerLawFit(float(a), float(b), float(se[0]), float(se[1]), int(ks.max()), rmse)


@dataclass(frozen=True)
class ForecastPoint:
    """The fitted law's coverage at k, its interval, and the measured coverage where n >= k."""

    k: int
    predicted: float
    low: float
    high: float
    measured: float | None = None
    error: float | None = None
    """predicted - measured."""


def forecast_coverage(per_problem, ks, k_fit: int, horizons=(4, 16), measured: dict[int, float] | None = None,
                      level: float = 0.95, n_boot: int = 200, seed: int = 0) -> tuple[PowerLawFit, list[ForecastPoint]]:
    """Fit the exponentiated power law on k <= k_fit and forecast coverage at
    h * k_fit for each horizon h (4K and 16K by default).

    `per_problem` is (problems, len(ks)) pass@k values, or the coverage curve
    itself (1-D). With problems, the interval is a bootstrap over problems (the
    whole fit is redone on each resample: the uncertainty that matters when the
    benchmark is a sample of problems); with a curve alone, it comes from the
    fit's parameter standard errors. `measured` maps k to the measured coverage
    for the ks where enough samples exist; each such point gets its error.
    """
    x = np.asarray(per_problem, dtype=np.float64)
    ks = np.asarray(ks, dtype=np.int64)
    curve = x if x.ndim == 1 else x.mean(axis=0)
    fit = fit_power_law(ks, curve, k_max_fit=k_fit)
    targets = np.array([int(h * k_fit) for h in horizons], dtype=np.int64)
    if x.ndim == 2 and x.shape[0] > 1:
        rng = np.random.default_rng(seed)
        keep = ks <= k_fit
        preds = []
        for _ in range(n_boot):
            boot = x[rng.integers(0, x.shape[0], x.shape[0])][:, keep].mean(axis=0)
            if boot[-1] <= 0:
                preds.append(np.zeros(len(targets)))
                continue
            preds.append(fit_power_law(ks[keep], boot).predict(targets))
        tail = 100 * (1 - level) / 2
        lo, hi = np.percentile(np.array(preds), [tail, 100 - tail], axis=0)
    else:
        lo, hi = fit.interval(targets, level=level, seed=seed)
    points = []
    for i, k in enumerate(targets.tolist()):
        pred = float(fit.predict([k])[0])
        m = None if measured is None else measured.get(k)
        points.append(ForecastPoint(k, pred, float(lo[i]), float(hi[i]), m, None if m is None else pred - m))
    return fit, points


def by_group(values: np.ndarray, groups) -> dict:
    """Mean of `values` (problems, ...) within each group label, keys sorted."""
    groups = np.asarray(groups)
    return {g: np.nanmean(values[groups == g], axis=0) for g in sorted(set(groups.tolist()))}


# ---------------------------------------------------------------- selection at k

@dataclass(frozen=True)
class SelectionEstimate:
    """Expected accuracy of a selector on a random k-subset of one problem's n samples."""

    mean: float
    se: float
    """Monte Carlo standard error (0 when the expectation was computed exactly)."""
    exact: bool


def selection_at_k(keys, correct, k: int, method: str = "vote", scores=None,
                   exact_limit: int = 20_000, draws: int = 4_000, seed: int = 0, eta: float = 0.1) -> SelectionEstimate:
    """Unbiased maj@k / best-of-N@k for one problem from n >= k samples.
    (Long because it holds three estimators, exact and sampled, that must agree; they
    share the validation and the tie rule, and the tests compare them to brute force.)

    The estimate is the expectation, over all k-subsets of the n samples, of "the
    answer the selector picks from the subset is correct", so it uses every
    sample rather than "the first k". keys: canonical answer per sample (None:
    no answer, which never wins); correct: verdict per sample; an answer is
    correct when any of its samples passed. Ties share the credit equally (the
    expectation under random tie-breaking).

    naive (highest score wins) is exact in O(n log n): with voters ranked best
    first, voter j wins exactly when it is drawn and the j better voters are
    not, which happens with probability C(n-1-j, k-1) / C(n, k). majority and
    weighted enumerate every subset when there are at most `exact_limit`, and
    otherwise average `draws` random subsets drawn with a fixed seed.

    filtered is DeepConf's offline filter: of the k drawn, the ceil(eta * k) with the
    highest scores (ties: the earlier sample) vote, weighted by their scores.
    """
    from itertools import combinations
    from math import comb

    n = len(keys)
    if method not in ("vote", "naive", "weighted", "filtered"):
        raise ValueError(f"method must be vote, naive, weighted or filtered, got {method!r}")
    if method == "filtered" and not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    if len(correct) != n or (scores is not None and len(scores) != n):
        raise ValueError("keys, correct and scores need one entry per sample")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n={n}, got {k}")
    if method != "vote" and scores is None:
        raise ValueError(f"{method} best-of-N needs scores")
    ids: dict = {}
    answer = np.array([-1 if key is None else ids.setdefault(key, len(ids)) for key in keys])
    if not ids:
        return SelectionEstimate(0.0, 0.0, True)
    key_ok = np.zeros(len(ids), bool)
    for a, ok in zip(answer, correct):
        if a >= 0 and ok:
            key_ok[a] = True

    if method == "naive":
        sc = np.asarray(scores, float)
        voters = np.flatnonzero(answer >= 0)
        # best first; among equal scores the earlier sample first (as best_of_n_naive)
        order = voters[np.lexsort((voters, -sc[voters]))]
        total = comb(n, k)
        p = np.array([comb(n - 1 - j, k - 1) for j in range(len(order))], float) / total
        return SelectionEstimate(float((p * key_ok[answer[order]]).sum()), 0.0, True)

    weight = np.ones(n) if method == "vote" else np.asarray(scores, float)
    onehot = np.zeros((n, len(ids)))
    votes = np.zeros((n, len(ids)), bool)
    rows = np.flatnonzero(answer >= 0)
    onehot[rows, answer[rows]] = weight[rows]
    votes[rows, answer[rows]] = True
    exact = comb(n, k) <= exact_limit
    if exact:
        subsets = np.array(list(combinations(range(n), k)), dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        subsets = np.argsort(rng.random((draws, n)), axis=1)[:, :k]
    if method == "filtered":
        keep = math.ceil(eta * k)
        sc = np.asarray(scores, float)[subsets]
        order = np.lexsort((subsets, -sc), axis=1)  # per subset: best first, earlier sample first on ties
        kept = np.take_along_axis(subsets, order[:, :keep], axis=1)
        totals = onehot[kept].sum(axis=1)
        present = votes[kept].any(axis=1)
    else:
        totals = onehot[subsets].sum(axis=1)
        present = votes[subsets].any(axis=1)
    totals = np.where(present, totals, -np.inf)
    best = totals.max(axis=1, keepdims=True)
    tied = (totals == best) & present
    n_tied = tied.sum(axis=1)
    value = np.where(n_tied > 0, (tied & key_ok).sum(axis=1) / np.maximum(n_tied, 1), 0.0)
    se = 0.0 if exact else float(value.std(ddof=1) / np.sqrt(len(value)))
    return SelectionEstimate(float(value.mean()), se, exact)
