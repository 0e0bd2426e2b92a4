"""Reports: PNG figures and one self-contained HTML page per run, inside the workspace."""

from __future__ import annotations

from pathlib import Path

from ..analysis import analyse_run, format_check, is_strategy_run, pick_verifier, run_cost, search_summary
from ..store import Store
from . import html, plots
from .files import write_json


def write_report(store: Store, run_id: str, verifier: str | None = None, fit_k: int | None = None,
                 prices: str | None = None) -> Path:
    """Write figures, summary.json and report.html under <workspace>/reports/<run_id>/."""
    out = store.workspace / "reports" / run_id
    out.mkdir(parents=True, exist_ok=True)
    run = next(r for r in store.runs() if r["run_id"] == run_id)
    if is_strategy_run(run["spec"]):
        return _search_report(store, run, pick_verifier(store, run_id, verifier), prices, out)
    a = analyse_run(store, run_id, verifier=verifier, fit_k=fit_k)
    figures = [plots.coverage_plot(a, out / "coverage.png"), plots.fail_plot(a, out / "fail_at_k.png")]
    if a.levels:
        figures.append(plots.levels_plot(a, out / "coverage_by_level.png"))
    summary = {
        "run_id": run_id, "verifier": a.verifier, "problems": a.problems, "n": a.n,
        "spec": run["spec"], "samples": run["samples"], "completion_tokens": run["completion_tokens"],
        "pass_at_k": a.table, "coverage_by_level": {str(k): float(v[-1]) for k, v in a.levels.items()},
        "fit": None if a.fit is None else {"a": a.fit.a, "b": a.fit.b, "a_se": a.fit.a_se, "b_se": a.fit.b_se,
                                           "k_max_fit": a.fit.k_max_fit, "rmse": a.fit.rmse,
                                           "error_at_n": a.fit_error_at_n},
        "forecast": [f.__dict__ for f in a.forecast],
        "selection": [sel.__dict__ for sel in a.selection],
        "extraction": a.extraction,
        "cost": {k: v for k, v in run_cost(store, run_id, prices).items() if k != "per_problem_flops"},
        "infra_errors": a.infra_errors,
        "format": format_check(store, run_id),
        "grading": store.grading_info(run_id, a.verifier),
    }
    write_json(out / "summary.json", summary)
    return html.render(a, summary, figures, out / "report.html")


def _search_report(store: Store, run: dict, verifier: str, prices: str | None, out: Path) -> Path:
    """A search run: the selected answer's accuracy, its candidates' coverage, and
    tokens and FLOPs per problem."""
    run_id = run["run_id"]
    agg = (run["spec"].get("strategy") or {}).get("aggregation", "last")
    summary = {
        "run_id": run_id, "verifier": verifier, "spec": run["spec"], "samples": run["samples"],
        "completion_tokens": run["completion_tokens"], "search": search_summary(store, run_id, verifier, agg),
        "cost": {k: v for k, v in run_cost(store, run_id, prices).items() if k != "per_problem_flops"},
        "format": format_check(store, run_id), "grading": store.grading_info(run_id, verifier),
    }
    write_json(out / "summary.json", summary)
    return html.render_search(summary, out / "report.html")
