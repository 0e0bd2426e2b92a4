"""Reports: PNG figures and one self-contained HTML page per run, inside the workspace."""

from __future__ import annotations

from pathlib import Path

from ..analysis import analyse_run, format_check, run_cost
from ..store import Store
from . import html, plots
from .files import write_json


def write_report(store: Store, run_id: str, verifier: str | None = None, fit_k: int | None = None,
                 prices: str | None = None) -> Path:
    """Write figures, summary.json and report.html under <workspace>/reports/<run_id>/."""
    a = analyse_run(store, run_id, verifier=verifier, fit_k=fit_k)
    out = store.workspace / "reports" / run_id
    out.mkdir(parents=True, exist_ok=True)
    figures = [plots.coverage_plot(a, out / "coverage.png"), plots.fail_plot(a, out / "fail_at_k.png")]
    if a.levels:
        figures.append(plots.levels_plot(a, out / "coverage_by_level.png"))
    run = next(r for r in store.runs() if r["run_id"] == run_id)
    summary = {
        "run_id": run_id, "verifier": a.verifier, "problems": a.problems, "n": a.n,
        "spec": run["spec"], "samples": run["samples"], "completion_tokens": run["completion_tokens"],
        "pass_at_k": a.table, "coverage_by_level": {str(k): float(v[-1]) for k, v in a.levels.items()},
        "fit": None if a.fit is None else {"a": a.fit.a, "b": a.fit.b, "a_se": a.fit.a_se, "b_se": a.fit.b_se,
                                           "k_max_fit": a.fit.k_max_fit, "rmse": a.fit.rmse,
                                           "error_at_n": a.fit_error_at_n},
        "forecast": [f.__dict__ for f in a.forecast],
        "cost": {k: v for k, v in run_cost(store, run_id, prices).items() if k != "per_problem_flops"},
        "infra_errors": a.infra_errors,
        "format": format_check(store, run_id),
        "grading": store.grading_info(run_id, a.verifier),
    }
    write_json(out / "summary.json", summary)
    return html.render(a, summary, figures, out / "report.html")
