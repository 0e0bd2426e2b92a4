"""From stored rows to the numbers a report shows. Pure: reads the store, computes.

The fit of the exponentiated power law uses k <= fit_k only (a quarter of n by
default), so the measured points beyond fit_k check the extrapolation: the
report prints the forecast's error at the largest measured k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics
from .store import ProblemCounts, Store


@dataclass
class CoverageAnalysis:
    run_id: str
    verifier: str
    n: int
    """Samples per problem used (the smallest count over problems)."""
    problems: int
    ks: np.ndarray
    coverage: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    fit: metrics.PowerLawFit | None
    fit_error_at_n: float | None
    """Predicted minus measured coverage at k = n, when the fit used only k <= n/4."""
    levels: dict[int, np.ndarray] = field(default_factory=dict)
    """Coverage curve over `ks` for each difficulty level."""
    level_sizes: dict[int, int] = field(default_factory=dict)
    table_ks: list[int] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    """pass@k with its 95% bootstrap interval, for k = 1, 2, 4, ..., n."""
    infra_errors: int = 0
    forecast: list[metrics.ForecastPoint] = field(default_factory=list)
    """Coverage forecast at 4K and 16K (K = the fit's largest k), measured where n allows."""


def analyse(counts: ProblemCounts, run_id: str, verifier: str, fit_k: int | None = None,
            n_boot: int = 1000) -> CoverageAnalysis:
    """Coverage curve, bootstrap intervals, power-law fit and per-level curves."""
    if len(counts.n) == 0:
        raise ValueError(f"run {run_id} has no problems")
    n = int(counts.n.min())
    if n < 1:
        missing = [p for p, k in zip(counts.problem_ids, counts.n) if k == 0][:5]
        raise ValueError(f"run {run_id}: some problems have no graded samples yet (e.g. {', '.join(missing)})")
    ks = metrics.log_spaced_ks(n)
    per_problem = metrics.pass_at_k_matrix(counts.n, counts.c, ks)  # each problem uses all its samples
    coverage = per_problem.mean(axis=0)
    lo, hi = metrics.bootstrap_ci(per_problem, n_boot=n_boot)

    fit, err, forecast = None, None, []
    fit_k = fit_k or max(4, n // 4)
    if (ks <= fit_k).sum() >= 3 and 0 < coverage[-1]:
        fit_k = int(ks[ks <= fit_k].max())
        measured = {int(h * fit_k): float(np.nanmean(metrics.pass_at_k(counts.n, counts.c, int(h * fit_k))))
                    for h in (4, 16) if h * fit_k <= n}
        fit, forecast = metrics.forecast_coverage(per_problem, ks, fit_k, measured=measured,
                                                  n_boot=max(50, n_boot // 5))
        if fit_k < n:
            err = float(fit.predict([n])[0] - coverage[-1])

    graded = counts.difficulty >= 0  # -1 marks problems without a level
    levels = {int(k): v for k, v in metrics.by_group(per_problem[graded], counts.difficulty[graded]).items()}
    sizes = {level: int((counts.difficulty == level).sum()) for level in levels}

    table_ks = [k for k in (2 ** np.arange(0, 20)) if k <= n]
    if n not in table_ks:
        table_ks.append(n)
    tab = metrics.pass_at_k_matrix(counts.n, counts.c, table_ks)
    tlo, thi = metrics.bootstrap_ci(tab, n_boot=n_boot)
    table = [{"k": int(k), "pass_at_k": float(tab[:, i].mean()), "ci_low": float(tlo[i]),
              "ci_high": float(thi[i])} for i, k in enumerate(table_ks)]
    return CoverageAnalysis(run_id, verifier, n, len(counts.n), ks, coverage, lo, hi, fit, err,
                            levels, sizes, table_ks, table, counts.infra_errors, forecast)


def pick_verifier(store: Store, run_id: str, verifier: str | None) -> str:
    """The verifier asked for, or the run's first; a clear error when it has none of them."""
    known = store.verifiers(run_id)
    if verifier is None:
        if not known:
            raise ValueError(f"run {run_id} has no verdicts yet: grade it first")
        return known[0]
    if verifier not in known:
        raise ValueError(f"run {run_id} has no verdicts from {verifier!r}; it has: {', '.join(known) or 'none'}")
    return verifier


def analyse_run(store: Store, run_id: str, verifier: str | None = None, fit_k: int | None = None,
                n: int | None = None) -> CoverageAnalysis:
    """Analyse a stored run with one of its verifiers (the only one, if it has one)."""
    verifier = pick_verifier(store, run_id, verifier)
    return analyse(store.counts(run_id, verifier, n=n), run_id, verifier, fit_k=fit_k)


def run_cost(store: Store, run_id: str, prices: str | None = None, n: int | None = None,
             shape_from: str | None = None) -> dict[str, Any]:
    """FLOPs (prefill, decode, total, as if no prefix were shared) and dollars of a
    run's samples (the first n per problem if given), with per-problem figures.
    Needs the model's shape, which sampling records (or `shape_from`: a .gguf file or
    a Hugging Face config.json); `error` says why when it is missing."""
    from .flops import ModelShape, PriceTable, Usage, cost_summary

    per_problem = {pid: Usage.from_dict(u) for pid, u in store.usage(run_id, n=n).items()}
    total = sum(per_problem.values(), Usage())
    shape_d = store.model_shape(run_id)
    if shape_from:
        shape_d = (ModelShape.from_gguf(shape_from) if str(shape_from).endswith(".gguf")
                   else ModelShape.from_hf_config(shape_from)).to_dict()
    if shape_d is None:
        return {"error": f"run {run_id} has no recorded model shape (it was sampled before FLOPs were "
                         "accounted, or by an engine that cannot tell its shape); give the model with --shape-from "
                         "FILE.gguf or config.json", "tokens": total.to_dict()}
    shape = ModelShape.from_dict(shape_d)
    table = PriceTable.load(prices)
    try:
        price = table.price(shape.name, shape.params)
    except ValueError as e:
        price, note = None, str(e)
    else:
        note = None
    out = cost_summary(shape, total, price)
    out.update({"shape_source": shape.source, "params": shape.params, "price_table": table.source,
                "per_problem_flops": {pid: shape.flops(u) for pid, u in per_problem.items()}})
    if note:
        out["dollars_error"] = note
    return out


def format_check(store: Store, run_id: str, examples: int = 3) -> dict[str, Any]:
    """Samples that ran to max tokens while writing a chat format's control text
    (`<|im_end|>`, `<end_of_turn>`, ...) as plain text: the sign of a model prompted
    in a format it does not know, which never ends its turn and is graded on noise."""
    from .engines.chat import control_text

    rows = store.samples(run_id)
    length = [r for r in rows if r.finish_reason == "length"]
    flagged = [(r, m) for r in length if (m := control_text(r.text)) is not None]
    return {"samples": len(rows), "ran_to_max_tokens": len(length), "control_text_at_max_tokens": len(flagged),
            "examples": [{"problem_id": r.problem_id, "sample_index": r.sample_index, "marker": m}
                         for r, m in flagged[:examples]]}
