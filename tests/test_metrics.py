import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from testtime import metrics


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c correct) that contain a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_matches_brute_force_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            got = metrics.pass_at_k([n], [c], k)[0]
            assert got == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_when_every_subset_holds_a_correct_sample():
    # n - c < k: no k-subset can avoid the correct samples
    assert metrics.pass_at_k([10], [8], 3)[0] == 1.0
    assert metrics.pass_at_k([10], [1], 10)[0] == 1.0
    assert metrics.pass_at_k([10], [0], 10)[0] == 0.0


def test_pass_at_k_is_vectorised_over_problems_with_different_n():
    n, c = np.array([4, 10, 7, 3]), np.array([1, 0, 7, 2])
    got = metrics.pass_at_k(n, c, 3)
    assert got == pytest.approx([brute_pass_at_k(*nc, 3) for nc in zip(n, c)])
    assert np.isnan(metrics.pass_at_k([2], [1], 3)[0])  # n < k: no unbiased estimate


def test_pass_at_k_is_exact_for_large_n():
    n, c, k = 10_000, 3, 2_500
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert metrics.pass_at_k([n], [c], k)[0] == pytest.approx(float(exact), rel=1e-10)
    n, c, k = 5_000, 1, 1
    assert metrics.pass_at_k([n], [c], k)[0] == pytest.approx(1 / 5000, rel=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        metrics.pass_at_k([3], [4], 1)
    with pytest.raises(ValueError):
        metrics.pass_at_k([3], [1], 0)


def test_coverage_curve_is_mean_pass_at_k_and_monotone():
    n, c = np.array([16, 16, 16]), np.array([0, 1, 8])
    ks, cov = metrics.coverage_curve(n, c)
    assert list(ks) == list(range(1, 17))
    assert cov[0] == pytest.approx((0 + 1 / 16 + 8 / 16) / 3)
    assert cov[-1] == pytest.approx(2 / 3)
    assert np.all(np.diff(cov) >= -1e-15)


def test_power_law_fit_recovers_known_parameters():
    ks = np.arange(1, 257)
    a, b = -1.7, -0.35
    cov = np.exp(a * ks ** b)
    fit = metrics.fit_power_law(ks, cov, k_max_fit=64)
    assert fit.a == pytest.approx(a, rel=1e-3)
    assert fit.b == pytest.approx(b, rel=1e-3)
    assert fit.predict([256])[0] == pytest.approx(cov[-1], abs=1e-4)  # extrapolates past the fitted range


def test_power_law_fit_with_noise_has_honest_error_bars():
    rng = np.random.default_rng(0)
    ks = np.arange(1, 129)
    a, b = -2.0, -0.5
    cov = np.exp(a * ks ** b) + rng.normal(0, 0.004, ks.size)
    fit = metrics.fit_power_law(ks, cov)
    assert abs(fit.a - a) < 4 * fit.a_se + 0.05
    assert abs(fit.b - b) < 4 * fit.b_se + 0.02
    lo, hi = fit.interval([512])
    assert lo[0] <= np.exp(a * 512 ** b) <= hi[0] + 0.02
    assert 0.002 < fit.rmse < 0.006


def test_power_law_fit_needs_three_points():
    with pytest.raises(ValueError, match="at least 3"):
        metrics.fit_power_law([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], k_max_fit=2)


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_problems():
    rng = np.random.default_rng(1)
    small = rng.uniform(size=(20, 1))
    large = rng.uniform(size=(2000, 1))
    lo_s, hi_s = metrics.bootstrap_ci(small)
    lo_l, hi_l = metrics.bootstrap_ci(large)
    assert lo_s[0] < small.mean() < hi_s[0]
    assert lo_l[0] < large.mean() < hi_l[0]
    assert (hi_l - lo_l)[0] < (hi_s - lo_s)[0] / 5
    # about 1.96 standard errors each side for a large sample
    se = large.std() / np.sqrt(len(large))
    assert (hi_l - lo_l)[0] == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_log_spaced_ks_cover_the_range():
    ks = metrics.log_spaced_ks(100)
    assert ks[0] == 1 and ks[-1] == 100
    assert np.all(np.diff(ks) > 0)
    assert list(metrics.log_spaced_ks(1)) == [1]


def test_by_group_averages_per_label():
    vals = np.array([[1.0], [0.0], [0.5], [0.5]])
    groups = metrics.by_group(vals, [1, 1, 2, 2])
    assert groups[1][0] == 0.5 and groups[2][0] == 0.5


def test_forecast_recovers_a_known_law_at_4k_and_16k():
    a, b = -2.0, -0.4
    ks = np.arange(1, 257)
    truth = np.exp(a * ks.astype(float) ** b)
    measured = {64: float(truth[63]), 256: float(truth[255])}
    fit, points = metrics.forecast_coverage(truth[:16], ks[:16], k_fit=16, measured=measured)
    assert fit.a == pytest.approx(a, rel=1e-3) and fit.b == pytest.approx(b, rel=1e-3)
    assert [p.k for p in points] == [64, 256]
    for p in points:
        assert p.predicted == pytest.approx(np.exp(a * p.k ** b), abs=1e-4)
        assert p.error == pytest.approx(0.0, abs=1e-4)


def test_forecast_interval_from_problems_covers_the_truth_and_reports_errors():
    # 400 problems with per-problem success rates drawn so that mean pass@k follows no exact law;
    # the forecast from k <= 8 must still land near the measured coverage at 32 with an interval
    rng = np.random.default_rng(1)
    p = rng.beta(0.3, 3.0, size=400)
    ks = np.arange(1, 129)
    per_problem = 1 - (1 - p[:, None]) ** ks[None, :]  # exact pass@k of each problem
    curve = per_problem.mean(axis=0)
    fit, points = metrics.forecast_coverage(per_problem[:, :8], ks[:8], k_fit=8,
                                            measured={32: float(curve[31])}, n_boot=100)
    near, far = points
    assert (near.k, far.k) == (32, 128)
    assert near.low <= near.predicted <= near.high and near.high - near.low > 0
    assert near.error == pytest.approx(near.predicted - curve[31])
    assert abs(near.error) < 0.05
    assert far.measured is None and far.error is None
