"""From stored rows to the numbers a report shows. Pure: reads the store, computes.

The fit of the exponentiated power law uses k <= fit_k only (a quarter of n by
default), so the measured points beyond fit_k check the extrapolation: the
report prints the forecast's error at the largest measured k.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics
from .errors import InputError
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
    selection: list["SelectionCurve"] = field(default_factory=list)
    """maj@k (and weighted best-of-N@k where steps were scored) at the table's k, beside
    pass@k: what a selector picks against what a verifier could find."""
    extraction: dict[str, Any] | None = None
    """Passes per answer-extraction rule and the chance baseline at the table's k
    (`extraction_summary`); None unless graded by `math_answer`."""


def analyse(counts: ProblemCounts, run_id: str, verifier: str, fit_k: int | None = None,
            n_boot: int = 1000) -> CoverageAnalysis:
    """Coverage curve, bootstrap intervals, power-law fit and per-level curves."""
    if len(counts.n) == 0:
        raise InputError(f"run {run_id} has no problems")
    n = int(counts.n.min())
    if n < 1:
        missing = [p for p, k in zip(counts.problem_ids, counts.n) if k == 0][:5]
        raise InputError(f"run {run_id}: some problems have no graded samples yet (e.g. {', '.join(missing)})")
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
        if not known and not store.db.execute("SELECT 1 FROM samples WHERE run_id = ? LIMIT 1", (run_id,)).fetchone():
            raise InputError(f"run {run_id} has no samples: its sampling failed or was stopped before the first "
                             "sample; run the same command again to draw them")
        if not known:
            raise InputError(f"run {run_id} has no verdicts yet: grade it first (testtime grade {run_id})")
        return known[0]
    if verifier not in known:
        raise InputError(f"run {run_id} has no verdicts from {verifier!r}; it has: {', '.join(known) or 'none'}")
    return verifier


def analyse_run(store: Store, run_id: str, verifier: str | None = None, fit_k: int | None = None,
                n: int | None = None) -> CoverageAnalysis:
    """Analyse a stored run with one of its verifiers (the only one, if it has one)."""
    verifier = pick_verifier(store, run_id, verifier)
    a = analyse(store.counts(run_id, verifier, n=n), run_id, verifier, fit_k=fit_k)
    if verifier == "math_answer":  # answers that can be compared, so voted on
        a.selection = selection_curves(store, run_id, verifier, a.table_ks)
        a.extraction = extraction_summary(store, run_id, verifier, a.table_ks, n)
    return a


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
    prm_usage = sum((Usage.from_dict(u) for u in store.usage(run_id, role="prm").values()), Usage())
    if prm_usage.sequences:  # a search run's reward model, counted apart
        prm_d = store.model_shape(run_id, "prm")
        if prm_d is None:
            out["prm"] = {"tokens": prm_usage.to_dict(), "error": "the reward model's shape is unknown: FLOPs "
                                                                    "count the policy only"}
        else:
            prm_shape = ModelShape.from_dict(prm_d)
            try:
                prm_price = table.price(prm_shape.name, prm_shape.params)
            except ValueError:
                prm_price = None
            out["prm"] = cost_summary(prm_shape, prm_usage, prm_price)
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


# -- selection without an oracle, next to coverage ---------------------------------

@dataclass
class SelectionCurve:
    """Mean over problems of an unbiased selector@k, with a 95% bootstrap interval."""

    method: str
    ks: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]


def is_strategy_run(spec: dict[str, Any]) -> bool:
    """A run of a search strategy (stored per problem), not of independent samples."""
    from .strategies import STRATEGIES

    name = (spec.get("strategy") or {}).get("name")
    return name in STRATEGIES and not getattr(STRATEGIES.get(name), "independent", False)


def graded_samples(store: Store, run_id: str, verifier: str) -> dict[str, list[tuple[int, str, bool]]]:
    """Per problem, (sample index, text, passed) of the samples with a usable verdict."""
    verdicts = {(v["problem_id"], v["sample_index"]): v["verdict"] for v in store.db.execute(
        "SELECT problem_id, sample_index, verdict FROM verdicts WHERE run_id = ? AND verifier = ?", (run_id, verifier))}
    out: dict[str, list[tuple[int, str, bool]]] = {}
    for s in store.samples(run_id):
        v = verdicts.get((s.problem_id, s.sample_index))
        if v is not None and v != "infra_error":
            out.setdefault(s.problem_id, []).append((s.sample_index, s.text, v == "pass"))
    return out


def answer_rules(store: Store, run_id: str) -> dict[str, tuple[str, ...]]:
    """Per problem of a run, the rules its final answers are read by (`problem_rules`)."""
    from .verifiers.math_answer import problem_rules

    return {p["problem_id"]: problem_rules(p["meta"]) for p in store.problems(run_id)}


_RULE_RE = re.compile(r"\((boxed|answer_is|hashes|last_number)\)$")


def chance_probability(question: str, text: str, reference: str | None) -> float:
    """The chance that an answer drawn at random from the distinct numbers in the
    problem and the sample equals the (numeric) reference; 0 for a reference that
    is not a plain number, or where no number appears."""
    from .verifiers.math_answer import as_number, numbers_in

    gold = as_number(reference) if reference is not None else None
    if gold is None:
        return 0.0
    values = {v for v in (as_number(m) for m in numbers_in(question + "\n" + text)) if v is not None}
    return (gold in values) / len(values) if values else 0.0


def extraction_summary(store: Store, run_id: str, verifier: str, ks: list[int],
                       n: int | None = None) -> dict[str, Any] | None:
    """Where a run's passes came from, and what luck alone would reach.

    `passes_by_rule`: passing samples per extraction rule (`verifiers.math_answer`;
    the rule is in each verdict's reason). `chance`: at each k, the coverage that
    guessing would reach, each sample answering with one of the distinct numbers in
    its problem and its own text, drawn at random (`chance_probability`,
    `metrics.chance_at_k`). A coverage near the chance baseline, or passes mostly
    from `last_number`, counts numbers that happen to appear rather than answers.
    `stated` (where the rules include `last_number`): coverage at each k counting
    only answers the text states.
    None for runs not graded by `math_answer`. With `n`, the first n samples of
    each problem only, as the coverage table has them."""
    if verifier != "math_answer":
        return None
    limit = n if n is not None else 2 ** 62
    reasons = {(r["problem_id"], r["sample_index"]): r["reason"] or "" for r in store.db.execute(
        "SELECT problem_id, sample_index, reason FROM verdicts WHERE run_id = ? AND verifier = ? AND verdict = 'pass' "
        "AND sample_index < ?", (run_id, verifier, limit))}
    by_rule: dict[str, int] = {}
    for reason in reasons.values():
        m = _RULE_RE.search(reason)
        rule = m.group(1) if m else "unknown"
        by_rule[rule] = by_rule.get(rule, 0) + 1
    problems = {p["problem_id"]: p for p in store.problems(run_id)}
    rules = answer_rules(store, run_id)
    rows, n_used, stated = [], [], []
    for pid, items in graded_samples(store, run_id, verifier).items():
        p = problems[pid]
        q = [chance_probability(p["question"], text, p["answer"]) for i, text, _ in items if i < limit]
        rows.append(metrics.chance_at_k(q, ks))
        n_used.append(len(q))
        stated.append(sum(1 for i, _, ok in items if ok and i < limit
                          and not reasons.get((pid, i), "").endswith("(last_number)")))
    table = np.asarray(rows).reshape(len(rows), len(ks))
    known = (~np.isnan(table)).sum(axis=0)  # problems with at least k samples
    chance = np.where(known > 0, np.nansum(table, axis=0) / np.maximum(known, 1), np.nan)
    used: dict[str, int] = {}
    for r in rules.values():
        used[",".join(r)] = used.get(",".join(r), 0) + 1
    out = {"passes": len(reasons), "passes_by_rule": dict(sorted(by_rule.items(), key=lambda kv: -kv[1])),
           "answer_rules": used, "chance": [{"k": int(k), "coverage": float(c)} for k, c in zip(ks, chance)]}
    if any("last_number" in r for r in rules.values()) and rows:
        # last_number is tried last, so without it exactly its passes would fail: the
        # coverage of stated answers needs no re-grading
        per = metrics.pass_at_k_matrix(np.asarray(n_used), np.asarray(stated), ks)
        known = (~np.isnan(per)).sum(axis=0)
        cov = np.where(known > 0, np.nansum(per, axis=0) / np.maximum(known, 1), np.nan)
        out["stated"] = [{"k": int(k), "coverage": float(c)} for k, c in zip(ks, cov)]
    return out


def extraction_columns(extraction: dict[str, Any] | None) -> dict[str, list[float]]:
    """Columns to set beside pass@k: the coverage of stated answers only (where the
    last-number rule counted) and the chance baseline (`extraction_summary`)."""
    ex = extraction or {}
    cols = {"stated only": [c["coverage"] for c in ex["stated"]]} if "stated" in ex else {}
    return cols | ({"chance": [c["coverage"] for c in ex["chance"]]} if ex else {})


FILTER_ETA = 0.1
"""DeepConf's offline filter keeps the most confident 10% of traces (DeepConf-low)."""


def selection_curves(store: Store, run_id: str, verifier: str, ks: list[int], aggregation: str = "last",
                     n_boot: int = 1000) -> list[SelectionCurve]:
    """maj@k for a sampling run, and weighted best-of-N@k where a reward model scored
    its samples' steps: each the expectation over k-subsets of a problem's samples
    (`metrics.selection_at_k`), never the first k."""
    from .select import AnswerKeys, aggregate

    graded = graded_samples(store, run_id, verifier)
    if not graded:
        return []
    keys, rules = AnswerKeys(), answer_rules(store, run_id)
    scorers = store.scorers(run_id)
    scores = store.step_scores(run_id, scorers[0]) if scorers else {}
    methods = ["vote"] + (["weighted"] if scores else [])
    if scores and scorers[0].startswith("confidence:"):  # DeepConf's selections, and the single best
        methods += ["filtered", "naive"]
    labels = {"weighted": "weighted", "filtered": f"top {FILTER_ETA:.0%} voting", "naive": "best single"}
    curves = []
    for method in methods:
        rows = []
        for pid, items in graded.items():
            ans = [keys.of_text(t, rules[pid]) for _, t, _ in items]
            ok = [p for _, _, p in items]
            sc = [max(aggregate(scores.get((pid, i), []), aggregation), 0.0) for i, _, _ in items]
            rows.append([metrics.selection_at_k(ans, ok, k, method, sc if method != "vote" else None, seed=k,
                                                eta=FILTER_ETA).mean if k <= len(ans) else np.nan for k in ks])
        per_problem = np.asarray(rows)
        lo, hi = metrics.bootstrap_ci(per_problem, n_boot=n_boot)
        label = "maj@k" if method == "vote" else f"best-of-N@k ({scorers[0].split(':')[0]}, {labels[method]})"
        curves.append(SelectionCurve(label, list(ks), [float(x) for x in np.nanmean(per_problem, axis=0)],
                                     [float(x) for x in lo], [float(x) for x in hi]))
    return curves


def selected(store: Store, run_id: str, verifier: str, aggregation: str = "last") -> dict[str, tuple[float, bool]]:
    """Per problem of a strategy run: whether the selected answer is right (ties share the
    credit) and whether any candidate is. The answer is chosen by the strategy's
    selection: votes weighted by aggregated step scores, or a plain vote where the
    strategy votes, or where nothing of the problem was scored."""
    from .select import AnswerKeys, aggregate
    from .strategies.base import trait

    graded = graded_samples(store, run_id, verifier)
    scorers = store.scorers(run_id)
    scores = store.step_scores(run_id, scorers[0]) if scorers else {}
    weighted = trait(store.run_spec(run_id).strategy["name"], "selection") == "weighted"
    keys, rules = AnswerKeys(), answer_rules(store, run_id)
    out = {}
    for pid, items in graded.items():
        ans = [keys.of_text(t, rules[pid]) for _, t, _ in items]
        ok = [p for _, _, p in items]
        sc = [max(aggregate(scores.get((pid, i), []), aggregation), 0.0) for i, _, _ in items]
        scored = weighted and any((pid, i) in scores for i, _, _ in items)
        out[pid] = (metrics.selection_at_k(ans, ok, len(ans), "weighted" if scored else "vote",
                                           sc if scored else None).mean, any(ok))
    return out


def search_summary(store: Store, run_id: str, verifier: str, aggregation: str = "last",
                   n_boot: int = 1000) -> dict[str, Any]:
    """What a search run bought, per problem: the selected answer's accuracy (`selected`),
    the oracle coverage of its candidates, candidates, tokens and FLOPs."""
    from .strategies.base import trait

    per = selected(store, run_id, verifier, aggregation)
    graded = graded_samples(store, run_id, verifier)
    scorers = store.scorers(run_id)
    weighted = trait(store.run_spec(run_id).strategy["name"], "selection") == "weighted"
    diff = {p["problem_id"]: p["difficulty"] for p in store.problems(run_id)}
    acc = [a for a, _ in per.values()]
    cov = [float(c) for _, c in per.values()]
    level = [diff.get(pid) for pid in per]
    tab = np.asarray([acc, cov]).T if acc else np.zeros((0, 2))
    lo, hi = metrics.bootstrap_ci(tab, n_boot=n_boot) if acc else (np.zeros(2), np.zeros(2))
    cost = run_cost(store, run_id)
    per_problem = store.role_usage(run_id)
    tokens = [roles.get("policy", {}).get("decode", 0) for roles in per_problem.values()]
    by_level: dict[int, list[float]] = {}
    for a, lv in zip(acc, level):
        if lv is not None and lv >= 0:
            by_level.setdefault(int(lv), []).append(a)
    return {
        "problems": len(per), "selection": "weighted best-of-N" if scorers and weighted else "vote",
        "accuracy": float(np.mean(acc)) if acc else None, "accuracy_ci": [float(lo[0]), float(hi[0])],
        "coverage": float(np.mean(cov)) if cov else None, "coverage_ci": [float(lo[1]), float(hi[1])],
        "candidates_per_problem": float(np.mean([len(v) for v in graded.values()])) if graded else 0.0,
        "tokens_per_problem": float(np.mean(tokens)) if tokens else 0.0,
        "flops_per_problem": (cost.get("flops", {}).get("total", 0.0) + cost.get("prm", {}).get("flops", {}).get("total", 0.0))
        / max(1, len(per_problem)) if "flops" in cost else None,
        "accuracy_by_level": {lv: float(np.mean(v)) for lv, v in sorted(by_level.items())},
        "scorer": scorers[0] if scorers else None,
    }
