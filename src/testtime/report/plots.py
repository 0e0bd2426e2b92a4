"""Matplotlib figures for a coverage analysis; each function writes one PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..analysis import CoverageAnalysis  # noqa: E402

EXTRAPOLATE = 4  # the fit is drawn out to 4x the largest measured k


def _finish(fig, ax, path: Path, title: str) -> Path:
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def coverage_plot(a: CoverageAnalysis, path: Path) -> Path:
    """Coverage vs k (log axis): measured with a 95% band, the power-law fit and its extrapolation."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.fill_between(a.ks, a.ci_low, a.ci_high, alpha=0.2, color="C0", label="95% bootstrap CI")
    ax.plot(a.ks, a.coverage, "o-", ms=3, color="C0", label="measured coverage (pass@k)")
    for i, sel in enumerate(a.selection):  # what a selector picks, beside what a verifier could find
        color = f"C{2 + i}"
        ax.fill_between(sel.ks, sel.low, sel.high, alpha=0.15, color=color)
        ax.plot(sel.ks, sel.mean, "s-", ms=3, color=color, label=sel.method)
    if a.fit is not None:
        k_fit = np.geomspace(1, a.fit.k_max_fit, 100)
        far = max([a.n * EXTRAPOLATE] + [f.k for f in a.forecast])
        k_ext = np.geomspace(a.fit.k_max_fit, far, 100)
        lo, hi = a.fit.interval(k_ext)
        ax.plot(k_fit, a.fit.predict(k_fit), "-", color="C3",
                label=f"fit exp({a.fit.a:.2f} k^{a.fit.b:.2f}), k<={a.fit.k_max_fit}")
        ax.plot(k_ext, a.fit.predict(k_ext), "--", color="C3", label="extrapolation")
        ax.fill_between(k_ext, lo, hi, color="C3", alpha=0.12)
        ax.axvline(a.fit.k_max_fit, color="gray", lw=0.8, ls=":")
    for i, f in enumerate(a.forecast):
        ax.errorbar([f.k], [f.predicted], yerr=[[f.predicted - f.low], [f.high - f.predicted]], fmt="D",
                    color="C3", ms=5, capsize=3, label="forecast (bootstrap 95%)" if i == 0 else None)
        if f.measured is not None:
            ax.plot([f.k], [f.measured], "s", color="k", ms=5, mfc="none",
                    label="measured at the forecast k" if i == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("coverage")
    ax.set_ylim(0, 1)
    return _finish(fig, ax, path, f"Coverage, {a.problems} problems, n={a.n}")


def fail_plot(a: CoverageAnalysis, path: Path) -> Path:
    """fail@k = 1 - coverage on log-log axes, where a power law is a straight line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fail = 1 - a.coverage
    ok = fail > 0
    ax.plot(a.ks[ok], fail[ok], "o-", ms=3, color="C0", label="measured fail@k")
    if a.fit is not None:
        k = np.geomspace(1, a.n * EXTRAPOLATE, 200)
        ax.plot(k, 1 - a.fit.predict(k), "--", color="C3", label="1 - fitted coverage")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("fail@k")
    return _finish(fig, ax, path, "fail@k (log-log)")


def levels_plot(a: CoverageAnalysis, path: Path) -> Path:
    """One coverage curve per difficulty level."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (level, curve) in enumerate(sorted(a.levels.items())):
        ax.plot(a.ks, curve, "o-", ms=3, color=plt.cm.viridis(i / max(1, len(a.levels) - 1)),
                label=f"level {level} ({a.level_sizes[level]} problems)")
    ax.set_xscale("log")
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("coverage")
    ax.set_ylim(0, 1)
    return _finish(fig, ax, path, "Coverage by difficulty level")
