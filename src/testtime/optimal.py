"""`testtime optimal` and `testtime run --policy`: fit a compute-optimal policy on a
training split, check it on a held-out split, and apply it to new problems.

Fitting runs every candidate (strategy, hyperparameters) at every budget on
every problem through `testtime.compare` (durable cells, so it resumes), then
`testtime.policy` chooses per difficulty bin and budget on the training split.
Applying draws the difficulty probe, bins the problems with the policy's
stored edges and runs each bin's choice on its problems.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .compare import TREE, Cell, CompareConfig, cell_cost, run_compare
from .difficulty import fit_difficulty
from .engines.base import Engine
from .flops import ModelShape, Usage
from .report.files import embed_png, save_figure, write_atomic, write_json
from .policy import AccuracyTable, Policy, budget_to_reach, config_name, evaluate_policy, parse_config, select_policy
from .rewards.base import RewardModel
from .spec import stable_hash
from .store import Store
from .tasks.base import Problem, Task
from .verifiers.base import Verifier

SEARCH_FIELDS = ("iterations", "delimiter", "aggregation", "step_tokens", "temperature", "probe")


@dataclass
class Candidates:
    """What `optimal` tries: the sampled selections up to `bon_max`, tree searches of
    each width (and lookahead) and revisions of each chain length up to `n_max`."""

    sampled: tuple[str, ...] = ("best_of_n", "majority")
    tree: tuple[str, ...] = ("beam_search", "dvts")
    widths: tuple[int, ...] = (4,)
    lookaheads: tuple[int, ...] = (0,)
    revision_sequential: tuple[int, ...] = ()
    n_max: int = 16
    bon_max: int = 16
    search: dict[str, Any] = field(default_factory=lambda: {"iterations": 4, "delimiter": "\n", "aggregation": "last",
                                                            "step_tokens": 48, "temperature": 0.7, "probe": 4})

    def configs(self) -> list[tuple[str, CompareConfig]]:
        """(label suffix, compare config) pairs, one per compare run."""
        s = {k: self.search[k] for k in SEARCH_FIELDS if k in self.search}
        out = []
        if self.sampled:
            out.append(("", CompareConfig(strategies=self.sampled, n_max=self.bon_max, width=1, seeds=(0,), **s)))
        for w in self.widths:
            for la in self.lookaheads:
                if self.tree:
                    out.append((f"width={w}" + (f",lookahead={la}" if la else ""),
                                CompareConfig(strategies=self.tree, n_max=self.n_max, width=w, lookahead=la,
                                              seeds=(0,), **s)))
        for q in self.revision_sequential:
            out.append((f"sequential={q}", CompareConfig(strategies=("revision",), n_max=self.n_max, width=1,
                                                         sequential=q, seeds=(0,), **s)))
        return out


def _label(strategy: str, cfg: CompareConfig) -> str:
    if strategy in TREE:
        params = {"width": cfg.width}
        if cfg.lookahead:
            params["lookahead"] = cfg.lookahead
        return config_name(strategy, params)
    if strategy == "revision":
        return config_name(strategy, {"sequential": cfg.sequential})
    return strategy


def split(problems: Sequence[Problem], test_fraction: float = 0.5) -> tuple[list[Problem], list[Problem]]:
    """Deterministic split, stratified by difficulty level: within each level, in order,
    problem i goes to test when floor((i + 1) * f) > floor(i * f)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train, test, seen = [], [], {}
    for p in problems:
        i = seen.get(p.difficulty, 0)
        seen[p.difficulty] = i + 1
        (test if int((i + 1) * test_fraction) > int(i * test_fraction) else train).append(p)
    return train, test


def collect(store: Store, task: Task, problems: list[Problem], engine: Engine, prm: RewardModel, verifier: Verifier,
            cands: Candidates, template: str | None = None,
            progress: Callable[[str], None] | None = None) -> list[Cell]:
    cells = []
    for _, cfg in cands.configs():
        _, got = run_compare(store, task, problems, engine, prm, verifier, cfg, template=template, progress=progress)
        for c in got:
            cells.append(replace(c, strategy=_label(c.strategy, cfg)))
    return cells


def _flops_per_problem(cells: list[Cell], shapes: dict[str, ModelShape | None], problems: int) -> dict[tuple[str, int], float]:
    """Mean FLOPs per problem of each (config, N): policy model plus reward model (where its shape is known)."""
    return {(c.strategy, c.n): cell_cost(c, shapes)[0] / max(1, problems) for c in cells}


def fit_policy(cells: list[Cell], train: list[str], test: list[str], kind: str = "oracle",
               budgets: Sequence[int] | None = None) -> dict[str, Any]:
    """Choose on train, evaluate on test. Returns the policy, its test curve, the test
    curves of every candidate and the compute ratio against best-of-N."""
    table = AccuracyTable.from_cells(cells)
    first = [c for c in cells if c.strategy in ("best_of_n", "majority") and c.n == 1]
    if not first:
        raise ValueError("difficulty needs the best-of-N (or majority) samples at N=1 among the cells")
    source = first[0].oracle if kind == "oracle" else next((c.probe for c in first if c.probe), {})
    if not source:
        raise ValueError(f"no {kind} difficulty values in the cells (predicted difficulty needs a reward model)")
    source = {p: (v if np.isfinite(v) else 0.0) for p, v in source.items()}  # an unscored sample counts as 0
    bins = fit_difficulty({p: source[p] for p in train}, kind=kind)
    budgets = sorted(budgets or table.budgets)
    policy = select_policy(table, bins.assign({p: source[p] for p in train}), budgets)
    policy.difficulty = bins
    test_bins = bins.assign({p: source[p] for p in test})
    curve = evaluate_policy(policy, table, test_bins, budgets)
    curves = {c: {n: table.mean(c, n, test) for n in table.budgets} for c in table.configs}
    top = max(budgets)
    bon = curves.get("best_of_n", {})
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
    rows = []
    for n in sorted(result["policy_curve"]):
        cells = "".join(f"<td>{'' if result['curves'][c].get(n) is None else format(result['curves'][c][n], '.3f')}</td>"
                        for c in sorted(result["curves"]))
        rows.append(f"<tr><td>{n}</td>{cells}<td><b>{result['policy_curve'][n]:.3f}</b></td></tr>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in sorted(result["curves"]))
    choice_rows = "".join(f"<tr><td>{html.escape(b)}</td>" + "".join(f"<td>{html.escape(v)}</td>" for v in d.values())
                          + "</tr>" for b, d in pol.describe().items())
    imgs = "".join(embed_png(p) for p in figures)
    ratio = result["compute_ratio"]
    ratio_txt = (f"best-of-N reaches the policy's accuracy at N = {result['top']} only at N = "
                 f"{result['bon_budget_to_match']:.2f}: compute ratio {ratio:.2f}" if ratio is not None else
                 f"best-of-N does not reach the policy's accuracy at N = {result['top']} within N = {result['bon_max']}")
    page = (f"<!doctype html><meta charset='utf-8'><title>compute-optimal {key}</title>"
            f"<h1>Compute-optimal policy</h1><p>{html.escape(ratio_txt)}.</p>{imgs}"
            f"<h2>Test accuracy by budget</h2><table border=1 cellpadding=4><tr><th>N</th>{head}<th>policy</th></tr>"
            f"{''.join(rows)}</table><h2>Choices (train accuracy)</h2><table border=1 cellpadding=4>{choice_rows}</table>"
            f"<pre>{html.escape(json.dumps(meta, indent=1, default=str))}</pre>")
    return write_atomic(out / "optimal.html", page)


def optimal(store: Store, task: Task, problems: list[Problem], engine: Engine, prm: RewardModel, verifier: Verifier,
            cands: Candidates, kind: str = "oracle", test_fraction: float = 0.5, template: str | None = None,
            policy_path: str | Path | None = None, task_args: dict[str, Any] | None = None,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Collect, fit on train, evaluate on test, write the policy and a report."""
    train, test = split(problems, test_fraction)
    cells = collect(store, task, problems, engine, prm, verifier, cands, template, progress)
    result = fit_policy(cells, [p.id for p in train], [p.id for p in test], kind=kind,
                        budgets=[n for n in (2 ** i for i in range(16)) if n <= cands.n_max])
    shapes = {"policy": engine.shape() if hasattr(engine, "shape") else None,
              "prm": prm.shape() if hasattr(prm, "shape") else None}
    flops = _flops_per_problem(cells, shapes, len(problems))
    pol: Policy = result["policy"]
    key = stable_hash({"task": task.identity, "problems": [p.id for p in problems], "cands": asdict(cands),
                       "kind": kind, "test_fraction": test_fraction, "engine": engine.identity(),
                       "prm": prm.identity()})
    pol.meta = {"created": time.time(), "task": {"name": task.name, "args": dict(task_args or {}),
                                                 "identity": task.identity},
                "template": template or task.template, "engine": engine.identity(), "prm": prm.identity(),
                "candidates": asdict(cands), "search": dict(cands.search), "difficulty_kind": kind,
                "train": [p.id for p in train], "test": [p.id for p in test],
                "test_accuracy": result["policy_curve"], "compute_ratio": result["compute_ratio"]}
    out = store.workspace / "reports" / f"optimal-{key}"
    out.mkdir(parents=True, exist_ok=True)
    pol.save(out / "policy.json")
    if policy_path:
        pol.save(policy_path)
    figures = plot(result, flops, out)
    summary = {"policy_curve": result["policy_curve"], "curves": result["curves"],
               "compute_ratio": result["compute_ratio"], "bon_budget_to_match": result["bon_budget_to_match"],
               "flops_per_problem": {f"{c}@{n}": v for (c, n), v in flops.items()}, "choices": pol.describe()}
    write_json(out / "summary.json", summary)
    page = write_report(store.workspace, key, result, figures, pol.meta)
    return {**result, "page": page, "policy_file": Path(policy_path) if policy_path else out / "policy.json",
            "flops": flops}


def _difficulty_values(store: Store, task: Task, problems: list[Problem], engine: Engine, prm: RewardModel,
                       verifier: Verifier, policy: Policy, seed: int,
                       template: str | None) -> tuple[dict[str, float], dict[str, Any]]:
    """The probe a policy's bins were fitted on, for new problems: the mean PRM score
    of `probe` samples (predicted), or their pass rate against the reference (oracle)."""
    s = policy.meta.get("search", {})
    probe = int(s.get("probe", 4))
    cfg = CompareConfig(strategies=("best_of_n",), n_max=_pow2_at_least(probe), width=1, seeds=(seed,),
                        **{k: s[k] for k in SEARCH_FIELDS if k in s})
    _, cells = run_compare(store, task, problems, engine, prm, verifier, cfg, template=template)
    first = next(c for c in cells if c.n == 1 and c.seed == seed)
    spent = next(c for c in cells if c.n == cfg.n_max and c.seed == seed).usage
    return (first.oracle if policy.difficulty.kind == "oracle" else first.probe), spent


def _pow2_at_least(k: int) -> int:
    n = 1
    while n < k:
        n *= 2
    return n


def apply_policy(store: Store, task: Task, problems: list[Problem], engine: Engine, prm: RewardModel,
                 verifier: Verifier, policy: Policy, budget: int, seed: int = 0, template: str | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Bin the problems, run each bin's choice at its N, and grade the selected answers.
    Every group's result is stored as it completes (a rerun resumes)."""
    if policy.difficulty is None:
        raise ValueError("the policy has no difficulty bins")
    values, probe_usage = _difficulty_values(store, task, problems, engine, prm, verifier, policy, seed, template)
    bins = policy.difficulty.assign(values)
    s = policy.meta.get("search", {})
    groups: dict[tuple[str, int], list[Problem]] = {}
    for p in problems:
        c = policy.choose(budget, bins[p.id])
        groups.setdefault((c.config, c.n), []).append(p)
    correct, tokens, chosen = {}, {}, {}
    # the probe is part of what the policy costs
    usage = {r: Usage.from_dict(probe_usage.get(r)) for r in ("policy", "prm")}
    for (config, n), group in sorted(groups.items()):
        strategy, params = parse_config(config)
        cfg = CompareConfig(strategies=(strategy,), n_max=n, width=int(params.get("width", 1)),
                            lookahead=int(params.get("lookahead", 0)), sequential=int(params.get("sequential", 1)),
                            seeds=(seed,), only=(n,), **{k: s[k] for k in SEARCH_FIELDS if k in s})
        t = time.perf_counter()
        _, cells = run_compare(store, task, group, engine, prm, verifier, cfg, template=template)
        cell = next(c for c in cells if c.n == n)
        for p in group:
            correct[p.id], tokens[p.id], chosen[p.id] = cell.correct[p.id], cell.tokens[p.id], f"{config} N={n}"
        for role, u in cell.usage.items():
            usage[role] += Usage.from_dict(u)
        if progress:
            progress(f"{config} N={n} on {len(group)} problems: {time.perf_counter() - t:.0f} s")
    shapes = {"policy": engine.shape() if hasattr(engine, "shape") else None,
              "prm": prm.shape() if hasattr(prm, "shape") else None}
    flops = sum(shapes[r].flops(u) for r, u in usage.items() if shapes.get(r) is not None)
    by_bin: dict[int, list[float]] = {}
    for pid, b in bins.items():
        by_bin.setdefault(b, []).append(correct[pid])
    return {"accuracy": float(np.mean(list(correct.values()))), "problems": len(problems),
            "by_bin": {b: {"problems": len(v), "accuracy": float(np.mean(v)),
                           "choice": f"{policy.choose(budget, b).config} N={policy.choose(budget, b).n}"}
                       for b, v in sorted(by_bin.items())},
            "tokens_per_problem": float(np.mean(list(tokens.values()))), "flops_per_problem": flops / len(problems),
            "per_problem": {pid: {"bin": bins[pid], "choice": chosen[pid], "correct": correct[pid]} for pid in correct},
            "difficulty": policy.difficulty.kind}
