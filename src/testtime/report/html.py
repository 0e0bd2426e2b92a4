"""The pages of single runs: figures embedded as data URIs, tables from the analysis.
The markup is in `templates/run.html.j2` and `templates/search.html.j2`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..analysis import CoverageAnalysis, extraction_columns
from .files import png_uri, render_page


def render(a: CoverageAnalysis, summary: dict[str, Any], figures: list[Path], out: Path) -> Path:
    """A sampling run's page: pass@k beside the selections, levels, the fit, compute."""
    ex = a.extraction or {}
    extra = extraction_columns(ex)
    pass_rows = [[t["k"], f"{t['pass_at_k']:.3f}", f"[{t['ci_low']:.3f}, {t['ci_high']:.3f}]"]
                 + [f"{sel.mean[i]:.3f} [{sel.low[i]:.3f}, {sel.high[i]:.3f}]" for sel in a.selection]
                 + [f"{col[i]:.3f}" for col in extra.values()]
                 for i, t in enumerate(a.table)]
    rule_rows = [[rule, count, f"{100 * count / ex['passes']:.1f}%"] for rule, count in ex.get("passes_by_rule", {}).items()]
    level_rows = [[lv, a.level_sizes[lv], f"{curve[0]:.3f}", f"{curve[-1]:.3f}"]
                  for lv, curve in sorted(a.levels.items())]
    forecast_rows = [[f.k, f"{f.predicted:.3f}", f"[{f.low:.3f}, {f.high:.3f}]",
                      "not measured (n too small)" if f.measured is None else f"{f.measured:.3f}",
                      "" if f.error is None else f"{f.error:+.3f}"] for f in a.forecast]
    cost = summary.get("cost") or {}
    cost_rows, per_sample, rule = [], "", "none"
    if cost.get("flops"):
        fl, dl = cost["flops"], cost.get("dollars") or {}
        cost_rows.append(["FLOPs", f"{fl['prefill']:.3g}", f"{fl['decode']:.3g}", f"{fl['total']:.3g}",
                          f"{fl['total_unshared']:.3g}", f"{100 * fl['saved_fraction']:.1f}%"])
        if dl:
            saved = 100 * (1 - dl["total"] / dl["total_unshared"]) if dl["total_unshared"] else 0
            cost_rows.append(["US$", "", "", f"{dl['total']:.4g}", f"{dl['total_unshared']:.4g}", f"{saved:.1f}%"])
        per_sample = f"{fl['total'] / max(1, cost['tokens']['sequences']):.3g}"
        rule = str(dl.get("rule", "none"))
    fmt = summary.get("format") or {}
    warning = None
    if fmt.get("control_text_at_max_tokens"):
        warning = {"count": fmt["control_text_at_max_tokens"], "samples": fmt["samples"],
                   "markers": ", ".join(sorted({e["marker"] for e in fmt["examples"]}))}
    return render_page("run.html.j2", out, a=a, images=[png_uri(f) for f in figures],
                       pass_head=["k", "pass@k", "95% CI"] + [f"{sel.method} [95% CI]" for sel in a.selection]
                       + list(extra), rule_rows=rule_rows, extraction=ex,
                       pass_rows=pass_rows, level_rows=level_rows, forecast_rows=forecast_rows,
                       cost={"tokens": {}, **cost}, cost_rows=cost_rows, per_sample_flops=per_sample,
                       price_rule=rule, format_warning=warning, grading=summary.get("grading") or {},
                       summary_json=json.dumps(summary, indent=2, default=str))


def render_search(summary: dict[str, Any], out: Path) -> Path:
    """The page of a strategy run (beam search, DVTS, lookahead, revision, ...)."""
    s, spec = summary["search"], summary["spec"]
    strat = spec.get("strategy") or {}
    ci = lambda v: f"[{v[0]:.3f}, {v[1]:.3f}]"  # noqa: E731
    fmt3 = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [["accuracy of the selected answer", fmt3(s["accuracy"]), ci(s["accuracy_ci"])],
            ["coverage (any candidate correct)", fmt3(s["coverage"]), ci(s["coverage_ci"])]]
    per = [["candidates", f"{s['candidates_per_problem']:.1f}"], ["tokens generated", f"{s['tokens_per_problem']:.0f}"],
           ["FLOPs (policy and reward model)",
            "unknown" if s["flops_per_problem"] is None else f"{s['flops_per_problem']:.3g}"]]
    cost = summary.get("cost") or {}
    cost_rows = [[role, f"{c['flops']['prefill']:.3g}", f"{c['flops']['decode']:.3g}", f"{c['flops']['total']:.3g}"]
                 for role, c in (("policy", cost), ("reward model", cost.get("prm") or {})) if c.get("flops")]
    return render_page("search.html.j2", out, run_id=summary["run_id"], strategy=str(strat.get("name")), s=s,
                       params=", ".join(f"{k}={v!r}" for k, v in strat.items() if k not in ("name", "reward_model")),
                       verifier=summary["verifier"], rows=rows, per=per,
                       levels=[[lv, f"{acc:.3f}"] for lv, acc in s["accuracy_by_level"].items()],
                       cost_rows=cost_rows, cost_error=str(cost.get("error", "unknown")),
                       format_count=(summary.get("format") or {}).get("control_text_at_max_tokens", 0),
                       summary_json=json.dumps(summary, indent=2, default=str))
