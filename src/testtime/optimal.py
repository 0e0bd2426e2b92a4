"""`testtime optimal` and `testtime run --policy`: fit a compute-optimal policy on a
training split, check it on a held-out split, and apply it to new problems.

Fitting runs every candidate (strategy, hyperparameters) at every budget on
every problem through `testtime.compare` (durable cells, so it resumes), then
`testtime.policy` chooses per difficulty bin and budget on the training split.
Applying a policy is the `policy` strategy (`strategies/policy.py`): the
difficulty probe, the policy's stored edges, and each bin's choice, as one run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError
from .compare import Cell, CompareConfig, cell_cost, make_arms, run_compare
from .difficulty import fit_difficulty
from .engines.base import Engine
from .flops import ModelShape
from .report.files import png_uri, render_page, save_figure, write_json
from .policy import AccuracyTable, Policy, budget_to_reach, evaluate_policy, select_policy
from .rewards.base import RewardModel
from .spec import SamplingParams, SpecError, stable_hash
from .store import Store
from .strategies import BASELINE
from .tasks.base import Problem, Task
from .verifiers.base import Verifier


@dataclass
class Candidates:
    """What `optimal` tries: every strategy, over a grid of its parameters, at every
    budget up to `n_max` (independent samples up to `bon_max`: one draw gives every
    smaller N, so the baseline is measured past the policy's largest budget)."""

    strategies: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    """Parameters every strategy that takes them gets (`name.param` for one strategy)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Parameters to try several values of; each combination is a candidate."""
    n_max: int = 16
    bon_max: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    probe: int = 4

    def __post_init__(self) -> None:
        if BASELINE not in self.strategies:
            raise SpecError(f"{BASELINE} must be among the strategies: it is the baseline the policy is measured "
                            "against")

    def configs(self) -> list[CompareConfig]:
        """One comparison for the independent arms (to bon_max), one for the others (to n_max)."""
        arms = make_arms(self.strategies, self.params, self.grid)
        common = {"seeds": (0,), "sampling": self.sampling, "probe": self.probe}
        out = []
        independent = tuple(a for a in arms if a.independent)
        others = tuple(a for a in arms if not a.independent)
        if independent:
            out.append(CompareConfig(independent, n_max=self.bon_max, **common))
        if others:
            out.append(CompareConfig(others, n_max=self.n_max, **common))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"strategies": list(self.strategies), "params": dict(self.params),
                "grid": {k: list(v) for k, v in self.grid.items()}, "n_max": self.n_max, "bon_max": self.bon_max,
                "sampling": self.sampling.to_dict(), "probe": self.probe}


def split(problems: Sequence[Problem], test_fraction: float = 0.5) -> tuple[list[Problem], list[Problem]]:
    """Deterministic split, stratified by difficulty level: within each level, in order,
    problem i goes to test when floor((i + 1) * f) > floor(i * f)."""
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train, test, seen = [], [], {}
    for p in problems:
        i = seen.get(p.difficulty, 0)
        seen[p.difficulty] = i + 1
        (test if int((i + 1) * test_fraction) > int(i * test_fraction) else train).append(p)
    return train, test


def collect(store: Store, task: Task, problems: list[Problem], engine: Engine, prm: RewardModel | None,
            verifier: Verifier, cands: Candidates, template: str | None = None,
            progress: Callable[[str], None] | None = None) -> tuple[list[Cell], list[dict[str, Any]]]:
    """Every candidate's cells, and the stored runs they were read from."""
    cells, runs = [], []
    for cfg in cands.configs():
        got = run_compare(store, task, problems, engine, prm, verifier, cfg, template=template, progress=progress)
        cells += got.cells
        runs += got.runs
    return cells, runs


def _flops_per_problem(cells: list[Cell], shapes: dict[str, ModelShape | None], problems: int) -> dict[tuple[str, int], float]:
    """Mean FLOPs per problem of each (config, N): policy model plus reward model (where its shape is known)."""
    return {(c.strategy, c.n): cell_cost(c, shapes)[0] / max(1, problems) for c in cells}


def fit_policy(cells: list[Cell], train: list[str], test: list[str], kind: str = "oracle",
               budgets: Sequence[int] | None = None) -> dict[str, Any]:
    """Choose on train, evaluate on test. Returns the policy, its test curve, the test
    curves of every candidate and the compute ratio against best-of-N."""
    table = AccuracyTable.from_cells(cells)
    first = [c for c in cells if c.oracle and c.n == 1]  # independent samples at N = 1
    if not first:
        raise SpecError("difficulty needs independent samples (best-of-N or majority) among the candidates")
    source = first[0].oracle if kind == "oracle" else next((c.probe for c in first if c.probe), {})
    if not source:
        raise SpecError(f"no {kind} difficulty values in the cells (predicted difficulty needs a reward model)")
    source = {p: (v if np.isfinite(v) else 0.0) for p, v in source.items()}  # an unscored sample counts as 0
    bins = fit_difficulty({p: source[p] for p in train}, kind=kind)
    budgets = sorted(budgets or table.budgets)
    policy = select_policy(table, bins.assign({p: source[p] for p in train}), budgets)
    policy.difficulty = bins
    test_bins = bins.assign({p: source[p] for p in test})
    curve = evaluate_policy(policy, table, test_bins, budgets)
    curves = {c: {n: table.mean(c, n, test) for n in table.budgets} for c in table.configs}
    top = max(budgets)
    bon = curves.get(BASELINE, {})
    need = budget_to_reach(bon, curve[top]) if bon else None
    return {"policy": policy, "policy_curve": curve, "curves": curves, "test_bins": test_bins, "table": table,
            "bon_budget_to_match": need, "bon_max": max(bon) if bon else None,
            "compute_ratio": None if need is None else need / top, "top": top}


def plot(result: dict[str, Any], flops: dict[tuple[str, int], float] | None, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    axes_spec = [("n", "budget N (generations per problem)", "optimal_vs_n.png")]
    if flops:
        axes_spec.append(("flops", "FLOPs per problem (policy + reward model)", "optimal_vs_flops.png"))
    pol = result["policy"]
    for xkey, xlabel, name in axes_spec:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, (c, curve) in enumerate(sorted(result["curves"].items())):
            pts = [(n, a) for n, a in sorted(curve.items()) if a is not None]
            if xkey == "flops":
                pts = [(flops.get((c, n)), a) for n, a in pts if flops.get((c, n))]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, color=f"C{i}", label=c, alpha=0.8)
        pts = sorted(result["policy_curve"].items())
        if xkey == "flops":
            # the policy's FLOPs: its choice per test problem, averaged
            xs = []
            for b, _ in pts:
                fl = [flops.get((pol.choose(b, k).config, pol.choose(b, k).n), np.nan)
                      for k in result["test_bins"].values()]
                xs.append(float(np.nanmean(fl)) if fl else np.nan)
            pts = [(x, a) for x, (_, a) in zip(xs, pts)]
        ax.plot(*zip(*pts), "D-", color="k", lw=2, ms=5, label=f"compute-optimal ({pol.difficulty.kind} bins)")
        ax.set_xscale("log", base=2 if xkey == "n" else 10)
        ax.set_ylim(0, 1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (selected answer)")
        ratio = result["compute_ratio"]
        ax.set_title("compute-optimal vs fixed strategies, held-out problems" +
                     (f"\nbest-of-N needs {ratio:.2f}x the budget to match" if ratio else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, out / name))
    return paths


def write_report(workspace: Path, key: str, result: dict[str, Any], figures: list[Path], meta: dict[str, Any]) -> Path:
    out = workspace / "reports" / f"optimal-{key}"
    pol: Policy = result["policy"]
    configs = sorted(result["curves"])
    rows = [[n] + ["" if result["curves"][c].get(n) is None else f"{result['curves'][c][n]:.3f}" for c in configs]
            + [f"{result['policy_curve'][n]:.3f}"] for n in sorted(result["policy_curve"])]
    described = pol.describe()
    choice_head = list(next(iter(described.values()), {}))
    choice_rows = [[b] + [str(v) for v in d.values()] for b, d in described.items()]
    ratio = result["compute_ratio"]
    ratio_txt = (f"best-of-N reaches the policy's accuracy at N = {result['top']} only at N = "
                 f"{result['bon_budget_to_match']:.2f}: compute ratio {ratio:.2f}" if ratio is not None else
                 f"best-of-N does not reach the policy's accuracy at N = {result['top']} within N = {result['bon_max']}")
    return render_page("optimal.html.j2", out / "optimal.html", key=key, ratio_text=ratio_txt,
                       images=[png_uri(p) for p in figures], configs=configs, rows=rows, choice_head=choice_head,
                       choice_rows=choice_rows, meta_json=json.dumps(meta, indent=1, default=str))


def _shapes(engine: Engine, prm: RewardModel | None) -> dict[str, ModelShape | None]:
    return {role: (m.shape() if m is not None and hasattr(m, "shape") else None)
            for role, m in (("policy", engine), ("prm", prm))}


def optimal(store: Store, task: Task, problems: list[Problem], engine: Engine, prm: RewardModel | None,
            verifier: Verifier, cands: Candidates, kind: str = "oracle", test_fraction: float = 0.5,
            template: str | None = None, policy_path: str | Path | None = None,
            task_args: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Collect, fit on train, evaluate on test, write the policy and a report."""
    train, test = split(problems, test_fraction)
    cells, runs = collect(store, task, problems, engine, prm, verifier, cands, template, progress)
    result = fit_policy(cells, [p.id for p in train], [p.id for p in test], kind=kind,
                        budgets=[n for n in (2 ** i for i in range(16)) if n <= cands.n_max])
    flops = _flops_per_problem(cells, _shapes(engine, prm), len(problems))
    pol: Policy = result["policy"]
    prm_id = prm.identity() if prm is not None else None
    key = stable_hash({"task": task.identity, "problems": [p.id for p in problems], "cands": cands.to_dict(),
                       "kind": kind, "test_fraction": test_fraction, "engine": engine.identity(), "prm": prm_id})
    pol.meta = {"created": time.time(), "task": {"name": task.name, "args": dict(task_args or {}),
                                                 "identity": task.identity},
                "template": template or task.template, "engine": engine.identity(), "prm": prm_id,
                "candidates": cands.to_dict(), "difficulty_kind": kind,
                "train": [p.id for p in train], "test": [p.id for p in test], "runs": runs,
                "test_accuracy": result["policy_curve"], "compute_ratio": result["compute_ratio"]}
    out = store.workspace / "reports" / f"optimal-{key}"
    out.mkdir(parents=True, exist_ok=True)
    pol.save(out / "policy.json")
    if policy_path:
        pol.save(policy_path)
    figures = plot(result, flops, out)
    summary = {"policy_curve": result["policy_curve"], "curves": result["curves"],
               "compute_ratio": result["compute_ratio"], "bon_budget_to_match": result["bon_budget_to_match"],
               "flops_per_problem": {f"{c}@{n}": v for (c, n), v in flops.items()}, "choices": pol.describe(),
               "runs": runs}
    write_json(out / "summary.json", summary)
    page = write_report(store.workspace, key, result, figures, pol.meta)
    return {**result, "page": page, "policy_file": Path(policy_path) if policy_path else out / "policy.json",
            "flops": flops, "runs": runs}


def policy_candidates(policy: Policy) -> Candidates:
    """The candidates a policy was fitted with (its sampling, shared parameters and probe)."""
    c = policy.meta.get("candidates")
    if not isinstance(c, dict) or "sampling" not in c:
        raise SpecError("this policy was written by an earlier testtime (it does not record its sampling and "
                        "strategy parameters); fit it again with `testtime optimal`")
    sampling = dict(c["sampling"])
    sampling["stop"] = tuple(sampling.get("stop") or ())
    return Candidates(tuple(c["strategies"]), dict(c.get("params") or {}), dict(c.get("grid") or {}),
                      int(c["n_max"]), int(c["bon_max"]), SamplingParams(**sampling), int(c.get("probe", 4)))
