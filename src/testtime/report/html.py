"""One self-contained HTML page: figures embedded as base64, tables inline."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..analysis import CoverageAnalysis
from .files import embed_png, write_atomic

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; } img { max-width: 100%; }
.figs { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; } code, pre { background: #f6f6f6; }
pre { padding: 8px; overflow-x: auto; font-size: 12px; }
"""


def _img(path: Path) -> str:
    return embed_png(path)


def _rows(rows: list[list[Any]], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render(a: CoverageAnalysis, summary: dict[str, Any], figures: list[Path], out: Path) -> Path:
    pass_rows = [[t["k"], f"{t['pass_at_k']:.3f}", f"[{t['ci_low']:.3f}, {t['ci_high']:.3f}]"]
                 + [f"{sel.mean[i]:.3f} [{sel.low[i]:.3f}, {sel.high[i]:.3f}]" for sel in a.selection]
                 for i, t in enumerate(a.table)]
    level_rows = [[lv, a.level_sizes[lv], f"{curve[0]:.3f}", f"{curve[-1]:.3f}"]
                  for lv, curve in sorted(a.levels.items())]
    fit = "no fit (too few values of k, or coverage 0)"
    if a.fit is not None:
        fit = (f"coverage(k) = exp({a.fit.a:.4f} &middot; k<sup>{a.fit.b:.4f}</sup>), fitted on k &le; {a.fit.k_max_fit}; "
               f"a = {a.fit.a:.4f} &plusmn; {a.fit.a_se:.4f}, b = {a.fit.b:.4f} &plusmn; {a.fit.b_se:.4f}, "
               f"RMSE on the fitted range {a.fit.rmse:.4f}")
        if a.fit_error_at_n is not None:
            fit += f"; forecast error at k = {a.n}: {a.fit_error_at_n:+.4f}"
    fc_rows = [[f.k, f"{f.predicted:.3f}", f"[{f.low:.3f}, {f.high:.3f}]",
                "not measured (n too small)" if f.measured is None else f"{f.measured:.3f}",
                "" if f.error is None else f"{f.error:+.3f}"] for f in a.forecast]
    forecast = _rows(fc_rows, ["k", "forecast", "95% interval", "measured", "error"]) if fc_rows else ""
    cost = summary.get("cost") or {}
    cost_html = ""
    if cost.get("flops"):
        fl, dl = cost["flops"], cost.get("dollars") or {}
        cost_html = ("<h2>Compute</h2>" + _rows(
            [["FLOPs", f"{fl['prefill']:.3g}", f"{fl['decode']:.3g}", f"{fl['total']:.3g}", f"{fl['total_unshared']:.3g}",
              f"{100 * fl['saved_fraction']:.1f}%"]]
            + ([["US$", "", "", f"{dl['total']:.4g}", f"{dl['total_unshared']:.4g}",
                 f"{100 * (1 - dl['total'] / dl['total_unshared']) if dl['total_unshared'] else 0:.1f}%"]] if dl else []),
            ["", "prefill", "decode", "total", "if no prefix were shared", "saved"])
            + f"<p>Model {html.escape(str(cost.get('model')))} ({html.escape(str(cost.get('shape_source')))}); "
            f"per sample {fl['total'] / max(1, cost['tokens']['sequences']):.3g} FLOPs. Prices: "
            f"{html.escape(str(dl.get('rule', 'none')))} from {html.escape(str(cost.get('price_table')))}.</p>")
        if cost["tokens"].get("cache_unknown"):
            cost_html += (f"<p>Cached prompt tokens are <b>unknown</b> for {cost['tokens']['cache_unknown']} samples "
                          "(the server did not report them); their prompts are counted as computed.</p>")
    elif cost.get("error"):
        cost_html = f"<h2>Compute</h2><p>{html.escape(cost['error'])}</p>"
    infra = (f"<p><b>{a.infra_errors} samples had infrastructure errors</b> and are left out of every "
             "figure (a broken harness is not a wrong answer).</p>") if a.infra_errors else ""
    fmt = summary.get("format") or {}
    if fmt.get("control_text_at_max_tokens"):
        markers = ", ".join(sorted({e["marker"] for e in fmt["examples"]}))
        infra += (f"<p><b>Chat format warning: {fmt['control_text_at_max_tokens']} of {fmt['samples']} samples ran "
                  f"to max tokens while writing chat control text as plain text</b> ({html.escape(markers)}). The "
                  "model was probably prompted in a chat format it does not know; check the chat template "
                  "(<code>--chat-template</code>).</p>")
    grading = summary.get("grading") or {}
    sandbox = ""
    if "sandbox" in grading:
        sandbox = (f"<h2>Code execution</h2><p>Sandbox in force: {html.escape(grading['sandbox']['summary'])}.</p>"
                   f"<p>Golden canaries passed before grading: {html.escape(', '.join(grading['canaries']))}.</p>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>testtime report {a.run_id}</title>
<style>{_STYLE}</style></head><body>
<h1>Run {html.escape(a.run_id)}</h1>
<p>{a.problems} problems &times; {a.n} samples, verifier <code>{html.escape(a.verifier)}</code>.
pass@1 = {a.coverage[0]:.3f}, coverage at k = {a.n}: {a.coverage[-1]:.3f}.</p>{infra}
<div class="figs">{''.join(_img(f) for f in figures)}</div>
<h2>pass@k (unbiased estimator, 95% bootstrap interval over problems)</h2>
<p>Beside it, what a selector without an oracle picks from k samples (the expectation over k-subsets):
the gap is what a better verifier could still buy.</p>
{_rows(pass_rows, ["k", "pass@k", "95% CI"] + [f"{sel.method} [95% CI]" for sel in a.selection])}
<h2>By difficulty level</h2>
{_rows(level_rows, ["level", "problems", "pass@1", f"pass@{a.n}"]) if level_rows else "<p>No difficulty levels.</p>"}
<h2>Power-law fit and forecast</h2><p>{fit}</p>{forecast}{cost_html}{sandbox}
<h2>Run</h2><pre>{html.escape(json.dumps(summary, indent=2, default=str))}</pre>
</body></html>"""
    return write_atomic(out, page)


def render_search(summary: dict[str, Any], out: Path) -> Path:
    """The page of a search run (beam search, DVTS, lookahead, revision)."""
    s, spec = summary["search"], summary["spec"]
    strat = spec.get("strategy") or {}
    params = ", ".join(f"{k}={v!r}" for k, v in strat.items() if k not in ("name", "reward_model"))
    ci = lambda v: f"[{v[0]:.3f}, {v[1]:.3f}]"  # noqa: E731
    rows = [["accuracy of the selected answer", f"{s['accuracy']:.3f}" if s["accuracy"] is not None else "-",
             ci(s["accuracy_ci"])],
            ["coverage (any candidate correct)", f"{s['coverage']:.3f}" if s["coverage"] is not None else "-",
             ci(s["coverage_ci"])]]
    per = [["candidates", f"{s['candidates_per_problem']:.1f}"], ["tokens generated", f"{s['tokens_per_problem']:.0f}"],
           ["FLOPs (policy and reward model)",
            "unknown" if s["flops_per_problem"] is None else f"{s['flops_per_problem']:.3g}"]]
    levels = [[lv, f"{acc:.3f}"] for lv, acc in s["accuracy_by_level"].items()]
    cost = summary.get("cost") or {}
    prm = cost.get("prm") or {}
    cost_rows = []
    if cost.get("flops"):
        cost_rows.append(["policy", f"{cost['flops']['prefill']:.3g}", f"{cost['flops']['decode']:.3g}",
                          f"{cost['flops']['total']:.3g}"])
    if prm.get("flops"):
        cost_rows.append(["reward model", f"{prm['flops']['prefill']:.3g}", f"{prm['flops']['decode']:.3g}",
                          f"{prm['flops']['total']:.3g}"])
    fmt = summary.get("format") or {}
    warn = (f"<p><b>Chat format warning: {fmt['control_text_at_max_tokens']} candidates ran to max tokens writing "
            "chat control text.</b></p>") if fmt.get("control_text_at_max_tokens") else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>testtime report {summary['run_id']}</title>
<style>{_STYLE}</style></head><body>
<h1>Run {html.escape(summary['run_id'])}: {html.escape(str(strat.get('name')))}</h1>
<p>{s['problems']} problems; {html.escape(params)}; reward model {html.escape(str(s['scorer'] or 'none'))};
verifier <code>{html.escape(summary['verifier'])}</code>. The answer is selected by {html.escape(s['selection'])}
over each problem's final candidates.</p>{warn}
{_rows(rows, ["", "mean over problems", "95% bootstrap CI"])}
<h2>Per problem</h2>{_rows(per, ["", "mean"])}
<h2>By difficulty level</h2>{_rows(levels, ["level", "accuracy"]) if levels else "<p>No difficulty levels.</p>"}
<h2>Compute (FLOPs, all problems)</h2>{_rows(cost_rows, ["", "prefill", "decode", "total"]) if cost_rows else
    "<p>" + html.escape(str(cost.get("error", "unknown"))) + "</p>"}
<h2>Run</h2><pre>{html.escape(json.dumps(summary, indent=2, default=str))}</pre>
</body></html>"""
    return write_atomic(out, page)
