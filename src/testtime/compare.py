"""`testtime compare`: strategies at equal budgets, on one task, over seeds, as
sweeps of stored runs.

A comparison is a list of arms (a registered strategy with its parameters, all
but the budget N), budgets N in {1, 2, 4, ..., n_max} and seeds. Every point is
an ordinary stored run, so `testtime report`, `grade`, `export` and `cost` work
on each, and a rerun finds them in the store and draws nothing:

- an arm whose candidates are independent samples (best-of-N, majority, repeated
  sampling) reads one sampling run per seed, drawn once at n_max; every smaller N
  is the unbiased expectation over N-subsets of its samples
  (`metrics.selection_at_k`), never "the first N", and its oracle coverage
  (pass@N: any candidate correct) is the upper line in every figure;
- any other arm (beam search, DVTS, lookahead, revision, and whatever is
  registered next) is one strategy run per (N, seed), at the N its parameters
  accept (the width must divide N).

The answer a point selects follows its strategy's `selection`: votes weighted by
aggregated step scores, or a plain vote. Figures: accuracy against N, generated
tokens and FLOPs, one panel per difficulty level, a band over seeds (min to
max), with a JSON summary and an HTML page under <workspace>/reports/compare-<key>/.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .analysis import answer_rules, graded_samples, selected
from .engines.base import Engine
from .flops import Usage
from .metrics import pass_at_k, selection_at_k
from .policy import config_name, parse_config
from .report.files import png_uri, render_page, save_figure, write_json
from .rewards.base import RewardModel
from .runner import draw_samples, grade, run_strategy, score_samples, scorer_name
from .select import AnswerKeys, aggregate
from .spec import SamplingParams, SpecError, stable_hash
from .store import Store
from .strategies.base import STRATEGIES, StepParams, StrategyParams, strategy_params, trait
from .tasks.base import Problem, Task
from .verifiers.base import Verifier

PROBE_DELIMITER = StepParams.__dataclass_fields__["delimiter"].default
"""How probe samples are split into steps for the reward model (the strategies' default)."""


@dataclass(frozen=True)
class Arm:
    """One line of a comparison: a registered strategy and its parameters, all but N."""

    strategy: str
    params: tuple[tuple[str, Any], ...] = ()
    """(name, value) pairs, sorted by name."""
    shown: tuple[str, ...] = ()
    """The parameters its label shows (those a grid varies)."""

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> str:
        return config_name(self.strategy, {k: v for k, v in self.params if k in self.shown})

    @property
    def independent(self) -> bool:
        return bool(trait(self.strategy, "independent"))

    @property
    def needs_prm(self) -> bool:
        return bool(STRATEGIES.get(self.strategy).needs_prm)

    @property
    def weighted(self) -> bool:
        return trait(self.strategy, "selection") == "weighted"

    def at(self, n: int) -> StrategyParams | None:
        """Its parameters at budget n, or None where they do not hold (the width must divide n)."""
        try:
            return strategy_params(self.strategy, {**self.values, "n": n})
        except SpecError:
            return None


def make_arms(strategies: Sequence[str], params: Mapping[str, Any] | None = None,
              grid: Mapping[str, Sequence[Any]] | None = None) -> list[Arm]:
    """Arms from strategy names, parameters and a grid of parameters to try.

    A parameter goes to every strategy that takes it (`width=4` to beam search and
    DVTS, not to majority); `name.param=value` goes to one strategy only. Every grid
    combination of the parameters a strategy takes is an arm of its own, labelled by
    them (`beam_search(width=4)`). A parameter no chosen strategy takes is an error.
    """
    params, grid = dict(params or {}), {k: list(v) for k, v in (grid or {}).items()}
    for name in strategies:
        STRATEGIES.get(name)
    fields = {s: {f.name for f in dataclasses.fields(STRATEGIES.get(s).Params)} - {"n"} for s in strategies}
    for key in list(params) + list(grid):
        owner, _, bare = key.rpartition(".")
        if owner and owner not in fields:
            raise SpecError(f"parameter {key!r} names strategy {owner!r}, which is not among {', '.join(strategies)}")
        takers = [owner] if owner else list(fields)
        if not any(bare in fields[s] for s in takers):
            raise SpecError(f"no chosen strategy takes parameter {bare!r} (the budget is n_max, not a parameter)"
                            if bare == "n" else f"no chosen strategy takes parameter {key!r}; they take: "
                            f"{', '.join(sorted(set().union(*fields.values())))}")
    arms = []
    for s in strategies:
        own = {k: v for k, v in params.items() if "." not in k and k in fields[s]}
        own.update({k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(s + ".")})
        axes = {k.rpartition(".")[2]: v for k, v in grid.items()
                if k.rpartition(".")[2] in fields[s] and k.rpartition(".")[0] in ("", s)}
        for combo in itertools.product(*axes.values()):
            values = {**own, **dict(zip(axes, combo))}
            arms.append(Arm(s, tuple(sorted(values.items())), tuple(sorted(axes))))
    return arms


def arm_from_config(config: str, params: Mapping[str, Any] | None = None) -> Arm:
    """The arm a policy names (`beam_search(width=4)`), with the shared parameters the
    policy was fitted with that its strategy takes."""
    strategy, shown = parse_config(config)
    fields = {f.name for f in dataclasses.fields(STRATEGIES.get(strategy).Params)} - {"n"}
    values = {k: v for k, v in (params or {}).items() if "." not in k and k in fields}
    values.update({k.split(".", 1)[1]: v for k, v in (params or {}).items() if k.startswith(strategy + ".")})
    values.update(shown)
    return Arm(strategy, tuple(sorted(values.items())), tuple(sorted(shown)))


@dataclass(frozen=True)
class CompareConfig:
    arms: tuple[Arm, ...]
    n_max: int = 8
    seeds: tuple[int, ...] = (0, 1)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """How every token is drawn (a step-wise strategy caps tokens per step itself)."""
    probe: int = 4
    """Predicted difficulty: the mean reward-model score of this many samples per problem."""
    only: tuple[int, ...] | None = None
    """Run step-wise strategies at these budgets only (default: every power of two up to n_max)."""

    def __post_init__(self) -> None:
        if not self.arms:
            raise SpecError("a comparison needs at least one strategy")
        if not isinstance(self.n_max, int) or self.n_max < 1 or self.n_max & (self.n_max - 1):
            raise SpecError(f"n_max must be a power of two, got {self.n_max}")
        if not self.seeds:
            raise SpecError("at least one seed is needed")
        for arm in self.arms:
            if not arm.independent and not self.budgets(arm):
                raise SpecError(f"{arm.label} runs at no budget up to n_max={self.n_max} "
                                f"(its parameters {arm.values} must hold at some N)")

    @property
    def every_budget(self) -> list[int]:
        return [2 ** i for i in range(int(np.log2(self.n_max)) + 1)]

    def budgets(self, arm: Arm) -> list[int]:
        """The budgets an arm is measured at."""
        if arm.independent:
            return self.every_budget
        return [n for n in self.every_budget if (self.only is None or n in self.only) and arm.at(n) is not None]

    def identity(self) -> dict[str, Any]:
        return {"arms": [[a.strategy, [list(p) for p in a.params], list(a.shown)] for a in self.arms],
                "n_max": self.n_max, "seeds": list(self.seeds), "sampling": self.sampling.to_dict(),
                "probe": self.probe, "only": None if self.only is None else list(self.only)}


@dataclass
class Cell:
    """One (arm, N, seed): per problem, correct or not and tokens generated."""

    strategy: str
    """The arm's label (its strategy, with the parameters a grid varies)."""
    n: int
    seed: int
    correct: dict[str, float]
    tokens: dict[str, float]
    oracle: dict[str, float] = field(default_factory=dict)
    """Independent samples only: per problem, pass@N (any of N candidates correct)."""
    usage: dict[str, dict[str, float]] = field(default_factory=dict)
    """What the cell computed, over all its problems: `flops.Usage` fields of the
    policy model ("policy") and of the reward model ("prm"). Independent samples at
    N < n_max are the expectation over N-subsets (N / n_max of the draw)."""
    probe: dict[str, float] = field(default_factory=dict)
    """Independent samples, N = 1: per problem, the mean reward-model score of its
    first `probe` samples (the predicted difficulty; no ground truth involved)."""
    run_id: str = ""
    """The stored run the cell was read from."""


@dataclass
class Comparison:
    key: str
    cells: list[Cell]
    runs: list[dict[str, Any]]
    """Every run the comparison read: arm, seed, N (None for a sampling draw) and run id."""


def _sum_usage(per_problem: Mapping[str, Mapping[str, float]], ids: Sequence[str]) -> Usage:
    total = Usage()
    for pid in ids:
        if pid in per_problem:
            total += Usage.from_dict(per_problem[pid])
    return total


def _independent_cells(store: Store, run_id: str, arm: Arm, ids: list[str], cfg: CompareConfig, seed: int,
                       scorer: str | None, probe_scorer: str | None, verifier: str, keys: AnswerKeys) -> list[Cell]:
    """An independent arm's cell at every budget, from the first n_max samples of one sampling run."""
    graded = {pid: [x for x in items if x[0] < cfg.n_max]
              for pid, items in graded_samples(store, run_id, verifier).items() if pid in ids}
    missing = [pid for pid in ids if not graded.get(pid)]
    if missing:
        raise SpecError(f"run {run_id} has no graded samples for problems {', '.join(missing[:3])}")
    scores = store.step_scores(run_id, scorer) if scorer else {}
    probe_scores = store.step_scores(run_id, probe_scorer) if probe_scorer else {}
    policy = _sum_usage(store.usage(run_id, n=cfg.n_max), ids)
    prm = _sum_usage(store.score_usage(run_id, cfg.n_max, scorer), ids) if scorer else Usage()
    per, rules = {}, answer_rules(store, run_id)
    for pid in ids:
        items = graded[pid]
        agg = arm.values.get("aggregation", "last")
        per[pid] = ([keys.of_text(t, rules[pid]) for _, t, _ in items], [ok for _, _, ok in items],
                    [max(aggregate(scores.get((pid, i), []), agg), 0.0) for i, _, _ in items])
    tokens: dict[str, list[int]] = {}
    for s in store.samples(run_id):
        if s.problem_id in per and s.sample_index < cfg.n_max:
            tokens.setdefault(s.problem_id, []).append(s.completion_tokens)
    cells = []
    for n in cfg.budgets(arm):
        correct, tok, oracle = {}, {}, {}
        for pid, (ks, ok, ranks) in per.items():
            method = "weighted" if arm.weighted and scorer else "vote"
            correct[pid] = selection_at_k(ks, ok, min(n, len(ks)), method, ranks if method == "weighted" else None,
                                          seed=seed).mean
            tok[pid] = float(np.mean(tokens[pid])) * n
            oracle[pid] = float(pass_at_k([len(ok)], [sum(ok)], min(n, len(ok)))[0])
        usage = {"policy": policy.scaled(n / cfg.n_max).to_dict()}
        if scorer:
            usage["prm"] = prm.scaled(n / cfg.n_max).to_dict()
        probe = {}
        if n == 1 and probe_scores:
            for pid in ids:
                first = [i for i, _, _ in graded[pid]][:cfg.probe]
                probe[pid] = float(np.mean([max(aggregate(probe_scores.get((pid, i), []), "last"), 0.0)
                                            for i in first]))
        cells.append(Cell(arm.label, n, seed, correct, tok, oracle, usage, probe, run_id))
    return cells


def _strategy_cell(store: Store, run_id: str, arm: Arm, n: int, ids: list[str], seed: int, verifier: str) -> Cell:
    """A step-wise arm's cell: per problem, the answer its candidates select (`analysis.selected`)."""
    chosen = selected(store, run_id, verifier, arm.values.get("aggregation", "last"))
    recorded = store.role_usage(run_id)
    correct = {pid: chosen[pid][0] if pid in chosen else 0.0 for pid in ids}
    # everything generated for the problem: pruned paths and rollouts included
    tokens = {pid: float(recorded.get(pid, {}).get("policy", {}).get("decode", 0.0)) for pid in ids}
    usage = {role: _sum_usage({pid: r[role] for pid, r in recorded.items() if role in r}, ids).to_dict()
             for role in ("policy", "prm")}
    return Cell(arm.label, n, seed, correct, tokens, {}, usage, {}, run_id)


def run_compare(store: Store, task: Task, problems: list[Problem], engine: Engine, prm: RewardModel | None,
                verifier: Verifier, cfg: CompareConfig, template: str | None = None,
                progress: Callable[[str], None] | None = None) -> Comparison:
    """Run (or find in the store) every run the comparison needs and read its cells. Each
    run is labelled by the comparison that last used it (`compare-<key>/<arm>/N=<n>/seed=<s>`),
    so `testtime report LABEL` finds a point by name."""
    needs = sorted({a.strategy for a in cfg.arms if a.needs_prm})
    if prm is None and needs:
        raise SpecError(f"strategies {', '.join(needs)} need a reward model (--prm judge, or --prm served "
                        "with its base_url)")
    ids = [p.id for p in problems]
    key = stable_hash({"task": task.identity, "problems": ids, "cfg": cfg.identity(), "engine": engine.identity(),
                       "prm": prm.identity() if prm is not None else None, "template": template,
                       "verifier": verifier.name})
    keys = AnswerKeys()
    cells: list[Cell] = []
    runs: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        draw = None  # the sampling run every independent arm of this seed reads
        for arm in cfg.arms:
            t = time.perf_counter()
            if arm.independent:
                if draw is None:
                    draw = draw_samples(store, task, engine, cfg.n_max, cfg.sampling, template=template, seed=seed,
                                        problems=problems, label=f"compare-{key}/samples/seed={seed}").run_id
                    grade(store, draw, verifier)
                    runs.append({"arm": "independent samples", "seed": seed, "n": cfg.n_max, "run_id": draw})
                probe_scorer = scorer = None
                if prm is not None:  # the probe: the reward model's score of the first samples
                    score_samples(store, draw, prm, PROBE_DELIMITER, limit=cfg.probe)
                    probe_scorer = scorer_name(prm, PROBE_DELIMITER)
                if prm is not None and arm.weighted:
                    delimiter = arm.values.get("delimiter", PROBE_DELIMITER)
                    score_samples(store, draw, prm, delimiter, limit=cfg.n_max)
                    scorer = scorer_name(prm, delimiter)
                cells += _independent_cells(store, draw, arm, ids, cfg, seed, scorer, probe_scorer,
                                            verifier.name, keys)
            else:
                for n in cfg.budgets(arm):
                    res = run_strategy(store, task, engine, arm.strategy, arm.at(n), cfg.sampling, prm,
                                       template=template, seed=seed, problems=problems,
                                       label=f"compare-{key}/{arm.label}/N={n}/seed={seed}")
                    grade(store, res.run_id, verifier)
                    runs.append({"arm": arm.label, "seed": seed, "n": n, "run_id": res.run_id})
                    cells.append(_strategy_cell(store, res.run_id, arm, n, ids, seed, verifier.name))
            if progress:
                progress(f"{arm.label} seed {seed}: {time.perf_counter() - t:.0f} s")
    return Comparison(key, cells, runs)


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
            oracle_drawn = False
            for i, (strategy, rows) in enumerate(sorted(summary[g].items())):
                ns = [n for n in sorted(rows, key=int) if xkey != "flops" or rows[n].get("flops")]
                x = [int(n) if xkey == "n" else rows[n]["tokens" if xkey == "tokens" else "flops"] for n in ns]
                ax.plot(x, [rows[n]["accuracy"] for n in ns], "o-", ms=3, color=f"C{i}", label=strategy)
                ax.fill_between(x, [rows[n]["acc_min"] for n in ns], [rows[n]["acc_max"] for n in ns],
                                color=f"C{i}", alpha=0.15)
                if all(rows[n]["oracle"] is not None for n in ns) and not oracle_drawn:
                    oracle_drawn = True  # every independent arm reads the same samples: one line
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
            rows.append([strategy, n, f"{r['accuracy']:.3f}", f"[{r['acc_min']:.3f}, {r['acc_max']:.3f}]",
                         f"{r['tokens']:.0f}", "" if not r.get("flops") else f"{r['flops']:.3g}",
                         "" if r["oracle"] is None else f"{r['oracle']:.3f}"])
    runs = [[r["arm"], r["seed"], r["n"], r["run_id"]] for r in meta.get("runs", [])]
    return render_page("compare.html.j2", out / "compare.html", key=compare_id, images=[png_uri(p) for p in figures],
                       rows=rows, runs=runs, meta_json=json.dumps({k: v for k, v in meta.items() if k != "runs"},
                                                                  indent=1, default=str))


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
                if all(o is not None for o in orc):
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
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    rows = [[model, strategy, n, f"{r['accuracy']:.3f}", fmt(r["oracle"], ".3f"), fmt(r["flops"], ".3g"),
             fmt(r["dollars"], ".3g")]
            for model, by_strategy in curves.items() for strategy, by_n in by_strategy.items() for n, r in by_n.items()]
    return render_page("models.html.j2", out / "models.html", key=key, images=[png_uri(p) for p in figures],
                       rows=rows, meta_json=json.dumps(meta, indent=1, default=str))
