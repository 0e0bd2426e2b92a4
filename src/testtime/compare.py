"""`testtime compare`: strategies at equal budgets, on one task, over seeds.

For each strategy, budget N in {1, 2, 4, ..., n_max} and seed, the accuracy of
the answer the strategy selects (weighted best-of-N by aggregated PRM score over
its final candidates) and the tokens it generated.

Revision runs N / `sequential` chains of `sequential` attempts each.
Best-of-N is drawn once per seed at n_max and every smaller N is the unbiased
expectation over N-subsets of those samples (`metrics.selection_at_k`), never
"the first N"; its oracle coverage (pass@N, any candidate correct) is the upper
line in every figure. Beam search and DVTS run once per (N, seed), for N that
the width divides.

Every finished (strategy, N, seed) cell is stored in the workspace's database
the moment it completes, so an interrupted comparison resumes where it stopped.
Figures: accuracy against N and against generated tokens, one panel per
difficulty level, a band over seeds (min to max), written with a JSON summary
and an HTML page under <workspace>/reports/compare-<id>/.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .engines.base import Engine
from .flops import Usage
from .metrics import pass_at_k, selection_at_k
from .prompts import get_template
from .report.files import embed_png, save_figure, write_atomic, write_json
from .rewards.base import RewardModel
from .select import AnswerKeys
from .spec import SamplingParams, stable_hash
from .store import Store
from .strategies.search import SearchConfig, best_of_n, revision, tree_search
from .tasks.base import Problem, Task
from .verifiers.base import Verifier

TREE = {"beam_search": "beam", "dvts": "dvts"}
SAMPLED = ("best_of_n", "majority")
"""Selections from one set of independent samples: PRM-weighted best-of-N and majority vote."""
STRATEGY_NAMES = (*SAMPLED, *TREE, "revision")


@dataclass
class CompareConfig:
    strategies: tuple[str, ...] = ("best_of_n", "beam_search", "dvts")
    n_max: int = 8
    width: int = 2
    seeds: tuple[int, ...] = (0, 1)
    iterations: int = 6
    delimiter: str = "\n"
    aggregation: str = "last"
    step_tokens: int = 64
    temperature: float = 0.7
    lookahead: int = 0
    sequential: int = 2
    """Revision: attempts per chain (N / sequential chains in parallel)."""
    probe: int = 4
    """Predicted difficulty: the mean PRM score of this many best-of-N samples per problem."""
    only: tuple[int, ...] | None = None
    """Run searches at these budgets only (default: every power of two up to n_max)."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGY_NAMES]
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; known: {', '.join(STRATEGY_NAMES)}")
        if self.n_max < 1 or self.n_max & (self.n_max - 1):
            raise ValueError(f"n_max must be a power of two, got {self.n_max}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")

    @property
    def every_budget(self) -> list[int]:
        return [2 ** i for i in range(int(np.log2(self.n_max)) + 1)]

    @property
    def budgets(self) -> list[int]:
        """The budgets searches run at (`only`, if given, restricts them)."""
        return self.every_budget if self.only is None else [n for n in self.every_budget if n in self.only]

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        if d["only"] is None:
            del d["only"]  # the ids of comparisons made before the field existed stay the same
        return d


@dataclass
class Cell:
    """One (strategy, N, seed): per problem, correct or not and tokens generated."""

    strategy: str
    n: int
    seed: int
    correct: dict[str, float]
    tokens: dict[str, float]
    oracle: dict[str, float] = field(default_factory=dict)
    usage: dict[str, dict[str, float]] = field(default_factory=dict)
    """What the cell computed, over all its problems: `flops.Usage` fields of the
    policy model ("policy") and of the reward model ("prm"). Best-of-N at N < n_max
    is the expectation over N-subsets (N / n_max of the draw)."""
    probe: dict[str, float] = field(default_factory=dict)
    """Best-of-N, N = 1 cell: per problem, the mean PRM score of its first `probe`
    samples (the predicted difficulty; no ground truth involved)."""


_SCHEMA = """CREATE TABLE IF NOT EXISTS compare_cells (
    compare_id TEXT NOT NULL, strategy TEXT NOT NULL, n INTEGER NOT NULL, seed INTEGER NOT NULL,
    cell TEXT NOT NULL, PRIMARY KEY (compare_id, strategy, n, seed)) WITHOUT ROWID"""


def _load_cells(store: Store, compare_id: str) -> dict[tuple[str, int, int], Cell]:
    store.db.execute(_SCHEMA)
    rows = store.db.execute("SELECT cell FROM compare_cells WHERE compare_id = ?", (compare_id,)).fetchall()
    cells = [Cell(**json.loads(r[0])) for r in rows]
    return {(c.strategy, c.n, c.seed): c for c in cells}


def _save_cell(store: Store, compare_id: str, cell: Cell) -> None:
    with store.db:
        store.db.execute("INSERT OR REPLACE INTO compare_cells VALUES (?,?,?,?,?)",
                         (compare_id, cell.strategy, cell.n, cell.seed, json.dumps(asdict(cell))))


def run_compare(store: Store, task: Task, problems: list[Problem], engine: Engine, prm: RewardModel | None,
                verifier: Verifier, cfg: CompareConfig, template: str | None = None,
                progress: Callable[[str], None] | None = None) -> tuple[str, list[Cell]]:
    if prm is None and set(cfg.strategies) - {"majority"}:
        raise ValueError(f"strategies {sorted(set(cfg.strategies) - {'majority'})} need a reward model; "
                         "without one only 'majority' can run")
    tmpl = get_template(template or task.template)
    compare_id = stable_hash({"task": task.identity, "problems": [p.id for p in problems], "cfg": cfg.identity(),
                              "engine": engine.identity(), "prm": prm.identity() if prm is not None else None, "template": tmpl.identity(),
                              "verifier": verifier.name})
    cells = _load_cells(store, compare_id)
    keys = AnswerKeys()
    by_id = {p.id: p for p in problems}
    step = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.step_tokens)
    full = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.step_tokens * cfg.iterations)

    def judge(pid: str, text: str) -> bool:
        return verifier.verify(by_id[pid], text).passed

    def prm_usage() -> Usage:
        return Usage.from_dict(getattr(prm, "usage", Usage()).to_dict()) if prm is not None else Usage()

    for seed in cfg.seeds:
        drawn = None  # best-of-N samples of this seed, shared by best_of_n and majority
        for strategy in cfg.strategies:
            step_of = cfg.sequential if strategy == "revision" else cfg.width
            # every N of a sampled strategy is a subset of one draw, so all of them come at no cost
            budgets = cfg.every_budget if strategy in SAMPLED else [n for n in cfg.budgets if n % step_of == 0]
            if all((strategy, n, seed) in cells for n in budgets):
                continue
            t = time.perf_counter()
            if strategy in SAMPLED:
                if drawn is None:
                    sc = SearchConfig(n=cfg.n_max, width=1, delimiter=cfg.delimiter, aggregation=cfg.aggregation)
                    before = prm_usage()
                    res = best_of_n(problems, engine, prm, tmpl, full, sc, seed=seed)
                    spent = {"policy": res.stats.usage, "prm": prm_usage() + before.scaled(-1)}
                    graded = {}  # per problem, once: every budget is a subset of the same samples
                    for pid, paths in res.paths.items():
                        texts = [p.text(cfg.delimiter) for p in paths]
                        graded[pid] = ([judge(pid, x) for x in texts], [keys.of_text(x) for x in texts],
                                       [max(p.rank, 0.0) for p in paths])
                    probe = {pid: float(np.mean([max(p.rank, 0.0) for p in paths[:cfg.probe]]))
                             for pid, paths in res.paths.items() if prm is not None}
                    drawn = (res, graded, spent, probe)
                res, graded, spent, probe = drawn
                for n in budgets:
                    correct, tokens, oracle = {}, {}, {}
                    for pid, paths in res.paths.items():
                        ok, ks, ranks = graded[pid]
                        if strategy == "majority":
                            correct[pid] = selection_at_k(ks, ok, n, "majority", seed=seed).mean
                        else:
                            correct[pid] = selection_at_k(ks, ok, n, "weighted", ranks, seed=seed).mean
                        tokens[pid] = float(np.mean([p.tokens for p in paths])) * n
                        oracle[pid] = float(pass_at_k([len(ok)], [sum(ok)], n)[0])
                    usage = {"policy": spent["policy"].scaled(n / cfg.n_max).to_dict()}
                    if strategy == "best_of_n":
                        usage["prm"] = spent["prm"].scaled(n / cfg.n_max).to_dict()
                    cells[(strategy, n, seed)] = cell = Cell(strategy, n, seed, correct, tokens, oracle, usage,
                                                             probe if n == 1 else {})
                    _save_cell(store, compare_id, cell)
            else:
                for n in budgets:
                    if (strategy, n, seed) in cells:
                        continue
                    before = prm_usage()
                    if strategy == "revision":
                        sc = SearchConfig(n=n, width=1, delimiter=cfg.delimiter, aggregation=cfg.aggregation,
                                          sequential=cfg.sequential)
                        res = revision(problems, engine, prm, tmpl, full, sc, seed=seed)
                    else:
                        sc = SearchConfig(n=n, width=cfg.width, max_iterations=cfg.iterations,
                                          delimiter=cfg.delimiter, aggregation=cfg.aggregation,
                                          lookahead=cfg.lookahead)
                        res = tree_search(problems, engine, prm, tmpl, step, sc, mode=TREE[strategy], seed=seed)
                    correct, tokens = {}, {}
                    for pid, paths in res.paths.items():
                        texts = [p.text(cfg.delimiter) for p in paths]
                        ks = [keys.of_text(x) for x in texts]
                        ok = [judge(pid, x) for x in texts]
                        correct[pid] = selection_at_k(ks, ok, len(ks), "weighted",
                                                      [max(p.rank, 0.0) for p in paths]).mean if ks else 0.0
                        # everything generated for the problem: pruned paths and rollouts included
                        tokens[pid] = float(res.stats.by_problem.get(pid, {}).get("policy", Usage()).decode)
                    usage = {"policy": res.stats.usage.to_dict(), "prm": (prm_usage() + before.scaled(-1)).to_dict()}
                    cells[(strategy, n, seed)] = cell = Cell(strategy, n, seed, correct, tokens, {}, usage)
                    _save_cell(store, compare_id, cell)
            if progress:
                progress(f"{strategy} seed {seed}: {time.perf_counter() - t:.0f} s")
    return compare_id, list(cells.values())


def cell_cost(c: Cell, shapes: dict[str, Any] | None, prices: dict[str, Any] | None = None
              ) -> tuple[float, float, list[str]]:
    """FLOPs and dollars a cell computed over all its problems, summed over the roles
    ("policy", "prm") whose model shape (and price) is known; and the roles that
    computed something with no shape known, which the FLOPs leave out."""
    flops = dollars = 0.0
    unknown = []
    for role, u in c.usage.items():
        if not any(u.values()):
            continue
        usage = Usage.from_dict(u)
        shape = (shapes or {}).get(role)
        if shape is None:
            unknown.append(role)
        else:
            flops += shape.flops(usage)
        if (prices or {}).get(role) is not None:
            dollars += prices[role].dollars(usage)
    return flops, dollars, unknown


def summarise(cells: list[Cell], problems: list[Problem], shapes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mean accuracy and tokens per (strategy, N), over problems, with min/max over
    seeds; per difficulty level too (key 'all' for every problem). With the model
    shapes ("policy", "prm"), FLOPs per problem too (policy and reward model; the
    cell's total over its problems, divided evenly)."""
    groups: dict[str, list[str]] = {"all": [p.id for p in problems]}
    for p in problems:
        if p.difficulty is not None:
            groups.setdefault(f"level {p.difficulty}", []).append(p.id)
    out: dict[str, Any] = {}
    for g, ids in groups.items():
        table: dict[str, dict[int, dict[str, float]]] = {}
        for c in cells:
            if not all(pid in c.correct for pid in ids):
                continue
            row = table.setdefault(c.strategy, {}).setdefault(c.n, {"acc": [], "tok": [], "oracle": [], "flops": []})
            row["acc"].append(float(np.mean([c.correct[i] for i in ids])))
            row["tok"].append(float(np.mean([c.tokens[i] for i in ids])))
            fl, _, unknown = cell_cost(c, shapes)
            if shapes and c.usage and not unknown:  # FLOPs only when every role's are known
                row["flops"].append(fl / max(1, len(c.correct)))
            if c.oracle:
                row["oracle"].append(float(np.mean([c.oracle[i] for i in ids])))
        out[g] = {s: {n: {"accuracy": float(np.mean(r["acc"])), "acc_min": min(r["acc"]), "acc_max": max(r["acc"]),
                          "tokens": float(np.mean(r["tok"])),
                          "oracle": float(np.mean(r["oracle"])) if r["oracle"] else None, "seeds": len(r["acc"]),
                          "flops": float(np.mean(r["flops"])) if r["flops"] else None}
                      for n, r in sorted(rows.items())}
                  for s, rows in table.items()}
    return out


def plot(summary: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    axes_spec = [("n", "budget N (candidates per problem)", "accuracy_vs_n.png"),
                 ("tokens", "generated tokens per problem", "accuracy_vs_tokens.png")]
    if any(r.get("flops") for rows in summary["all"].values() for r in rows.values()):
        axes_spec.append(("flops", "FLOPs per problem (policy + reward model)", "accuracy_vs_flops.png"))
    for xkey, xlabel, name in axes_spec:
        groups = list(summary) if xkey != "flops" else ["all"]
        fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
        for ax, g in zip(axes[0], groups):
            for i, (strategy, rows) in enumerate(sorted(summary[g].items())):
                ns = [n for n in sorted(rows, key=int) if xkey != "flops" or rows[n].get("flops")]
                x = [int(n) if xkey == "n" else rows[n]["tokens" if xkey == "tokens" else "flops"] for n in ns]
                ax.plot(x, [rows[n]["accuracy"] for n in ns], "o-", ms=3, color=f"C{i}", label=strategy)
                ax.fill_between(x, [rows[n]["acc_min"] for n in ns], [rows[n]["acc_max"] for n in ns],
                                color=f"C{i}", alpha=0.15)
                if strategy == "best_of_n":
                    ax.plot(x, [rows[n]["oracle"] for n in ns], "--", color="k", lw=1, label="oracle coverage")
            ax.set_xscale("log", base=2 if xkey != "flops" else 10)
            ax.set_ylim(0, 1)
            ax.set_title(g, fontsize=10)
            ax.set_xlabel(xlabel, fontsize=9)
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("accuracy of the selected answer")
        axes[0][0].legend(fontsize=7)
        paths.append(save_figure(fig, out / name))
    return paths


def write_report(workspace: Path, compare_id: str, summary: dict[str, Any], meta: dict[str, Any]) -> Path:
    out = workspace / "reports" / f"compare-{compare_id}"
    out.mkdir(parents=True, exist_ok=True)
    figures = plot(summary, out)
    write_json(out / "summary.json", {"meta": meta, "summary": summary})
    rows = []
    for strategy, by_n in sorted(summary["all"].items()):
        for n, r in sorted(by_n.items(), key=lambda t: int(t[0])):
            oracle = "" if r["oracle"] is None else f"{r['oracle']:.3f}"
            flops = "" if not r.get("flops") else f"{r['flops']:.3g}"
            rows.append(f"<tr><td>{html.escape(strategy)}</td><td>{n}</td><td>{r['accuracy']:.3f}</td>"
                        f"<td>[{r['acc_min']:.3f}, {r['acc_max']:.3f}]</td><td>{r['tokens']:.0f}</td><td>{flops}</td>"
                        f"<td>{oracle}</td></tr>")
    imgs = "".join(embed_png(p) for p in figures)
    page = (f"<!doctype html><meta charset='utf-8'><title>compare {compare_id}</title>"
            f"<h1>Strategies at equal budgets</h1><p>{html.escape(json.dumps(meta))}</p>{imgs}"
            "<table border=1 cellpadding=4><tr><th>strategy</th><th>N</th><th>accuracy</th><th>over seeds</th>"
            f"<th>tokens/problem</th><th>FLOPs/problem</th><th>oracle coverage</th></tr>{''.join(rows)}</table>")
    return write_atomic(out / "compare.html", page)


# -- matched comparisons across models ----------------------------------------

def cost_curves(cells: list[Cell], problems: int, shapes: dict[str, Any], prices: dict[str, Any]) -> dict[str, Any]:
    """Per strategy and N: mean accuracy (over seeds), oracle coverage, and FLOPs and
    dollars per problem (policy model plus reward model, from each cell's usage)."""
    out: dict[str, dict[int, dict[str, list[float]]]] = {}
    for c in cells:
        flops, dollars, _ = cell_cost(c, shapes, prices)
        row = out.setdefault(c.strategy, {}).setdefault(c.n, {"accuracy": [], "oracle": [], "flops": [], "dollars": []})
        row["accuracy"].append(float(np.mean(list(c.correct.values()))))
        if c.oracle:
            row["oracle"].append(float(np.mean(list(c.oracle.values()))))
        row["flops"].append(flops / max(1, problems))
        row["dollars"].append(dollars / max(1, problems))
    return {s: {n: {k: (float(np.mean(v)) if v else None) for k, v in r.items()} for n, r in sorted(by.items())}
            for s, by in out.items()}


def plot_models(curves: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """Accuracy against FLOPs and against dollars per problem, one line per (model, strategy),
    oracle coverage dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for xkey, xlabel, name in (("flops", "FLOPs per problem", "models_vs_flops.png"),
                               ("dollars", "US$ per problem", "models_vs_dollars.png")):
        fig, ax = plt.subplots(figsize=(6.6, 4.3))
        i = 0
        for model, by_strategy in curves.items():
            for strategy, rows in by_strategy.items():
                pts = [(r[xkey], r["accuracy"], r["oracle"]) for r in rows.values() if r[xkey]]
                if not pts:
                    continue
                xs, acc, orc = zip(*pts)
                ax.plot(xs, acc, "o-", ms=3, color=f"C{i}", label=f"{model}: {strategy}")
                if all(o is not None for o in orc) and strategy in SAMPLED:
                    ax.plot(xs, orc, "--", color=f"C{i}", lw=1, label=f"{model}: coverage (oracle)")
                i += 1
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, out / name))
    return paths


def write_models_report(workspace: Path, key: str, curves: dict[str, Any], meta: dict[str, Any]) -> Path:
    out = workspace / "reports" / f"models-{key}"
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_models(curves, out)
    write_json(out / "summary.json", {"meta": meta, "curves": curves})
    rows = []
    for model, by_strategy in curves.items():
        for strategy, by_n in by_strategy.items():
            for n, r in by_n.items():
                fmt = lambda v, f: "" if v is None else format(v, f)
                rows.append(f"<tr><td>{html.escape(model)}</td><td>{html.escape(strategy)}</td><td>{n}</td>"
                            f"<td>{r['accuracy']:.3f}</td><td>{fmt(r['oracle'], '.3f')}</td>"
                            f"<td>{fmt(r['flops'], '.3g')}</td><td>{fmt(r['dollars'], '.3g')}</td></tr>")
    imgs = "".join(embed_png(p, "max-width:49%") for p in figures)
    page = (f"<!doctype html><meta charset='utf-8'><title>models {key}</title>"
            f"<h1>Models at matched compute</h1><p>{html.escape(json.dumps(meta, default=str))}</p>{imgs}"
            "<table border=1 cellpadding=4><tr><th>model</th><th>strategy</th><th>N</th><th>accuracy</th>"
            f"<th>oracle coverage</th><th>FLOPs/problem</th><th>US$/problem</th></tr>{''.join(rows)}</table>")
    return write_atomic(out / "models.html", page)
