"""The `testtime` command line. Every command is a thin layer over `testtime.api`."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import api
from .analysis import extraction_columns
from .errors import InputError, TesttimeError
from .searchspec import DEFAULT_STRATEGY
from .spec import SamplingParams, SpecError
from .strategies import CANDIDATES, COMPARED, STRATEGIES

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Scale test-time compute: sample many solutions, verify them, measure coverage.")
console = Console(stderr=True)
out = Console()

USER_ERRORS = (TesttimeError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
"""Printed as one line (exit 2, or 3 for infrastructure); anything else is a bug and keeps its traceback."""

_SP = SamplingParams()  # the sampler's defaults, defined once in SamplingParams

PricesOpt = typer.Option(None, "--prices", envvar="TESTTIME_PRICES",
                         help="Price table JSON (dollars per million tokens) \\[default: bundled]")
WorkspaceOpt = typer.Option(None, "--workspace", "-w", envvar="TESTTIME_WORKSPACE",
                            help="Workspace folder \\[default: ./testtime-runs]")


class _RateColumn(ProgressColumn):
    """samples/s and generated tokens/s since the task started."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("")
        tokens = task.fields.get("tokens", 0)
        return Text(f"{task.completed / elapsed:5.2f} samples/s  {tokens / elapsed:6.1f} tok/s", style="cyan")


@contextmanager
def _progress() -> Iterator[tuple[Callable[[int], None], api.ProgressFn]]:
    with Progress(TextColumn("[bold]sampling"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task("sampling", total=None, tokens=0)
        counts = {"tokens": 0}

        def plan(total: int) -> None:
            bar.update(task, total=total)

        def update(samples: int, tokens: int) -> None:
            counts["tokens"] += tokens
            bar.update(task, advance=samples, tokens=counts["tokens"])

        yield plan, update


def _parse_value(v: str) -> Any:
    if "," in v:
        return [_parse_value(x) for x in v.split(",") if x]
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def _task_args(args: list[str], data: Path | None) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for a in args:
        if "=" not in a:
            raise typer.BadParameter(f"--arg takes key=value, got {a!r}")
        k, v = a.split("=", 1)
        parsed[k.strip()] = _parse_value(v.strip())
    if data is not None:
        parsed["path"] = str(data)
    return parsed


def _print_table(run: api.Run, title: str) -> None:
    s = api.summary(run.run_id, run.workspace)
    if "accuracy" in s:
        _print_search(s, title)
    else:
        _print_coverage(run, title)
    fmt = api.format_check(run.run_id, run.workspace)
    if fmt["control_text_at_max_tokens"]:
        markers = ", ".join(sorted({e["marker"] for e in fmt["examples"]}))
        out.print(f"[yellow]{fmt['control_text_at_max_tokens']} of {fmt['samples']} samples ran to max tokens writing "
                  f"chat control text ({markers}): check the chat template (--chat-template)[/]", highlight=False)


def _print_search(s: dict[str, Any], title: str) -> None:
    t = Table(title=f"{title}: {s['strategy']['name']}, {s['problems']} problems")
    for col in ("", "mean", "95% CI"):
        t.add_column(col, justify="right")
    lo, hi = s["accuracy_ci"]
    t.add_row(f"accuracy ({s['selection']})", f"{s['accuracy']:.3f}", f"[{lo:.3f}, {hi:.3f}]")
    lo, hi = s["coverage_ci"]
    t.add_row("coverage (any candidate)", f"{s['coverage']:.3f}", f"[{lo:.3f}, {hi:.3f}]")
    out.print(t)
    flops = "unknown" if s["flops_per_problem"] is None else f"{s['flops_per_problem']:.3e}"
    out.print(f"per problem: {s['candidates_per_problem']:.1f} candidates, {s['tokens_per_problem']:.0f} tokens "
              f"generated, {flops} FLOPs (policy and reward model)")
    for level, acc in s["accuracy_by_level"].items():
        out.print(f"  level {level}: accuracy {acc:.3f}")


def _print_coverage(run: api.Run, title: str) -> None:
    a = run.analysis()
    t = Table(title=title)
    t.add_column("k", justify="right")
    t.add_column("pass@k", justify="right")
    t.add_column("95% CI", justify="right")
    for sel in a.selection:
        t.add_column(sel.method, justify="right")
    extra = extraction_columns(a.extraction)
    for head in extra:
        t.add_column(head, justify="right")
    for i, row in enumerate(a.table):
        t.add_row(str(row["k"]), f"{row['pass_at_k']:.3f}", f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]",
                  *[f"{sel.mean[i]:.3f}" for sel in a.selection], *[f"{col[i]:.3f}" for col in extra.values()])
    out.print(t)
    if a.extraction and a.extraction["passes"]:
        ex = a.extraction
        out.print("passes by answer rule: " + ", ".join(f"{rule} {count} ({100 * count / ex['passes']:.0f}%)"
                                                         for rule, count in ex["passes_by_rule"].items())
                  + "; chance = guessing a number from the problem and the sample", highlight=False)
    for level, curve in sorted(a.levels.items()):
        out.print(f"  level {level}: pass@1 {curve[0]:.3f} -> coverage@{a.n} {curve[-1]:.3f} ({a.level_sizes[level]} problems)")
    if a.infra_errors:
        out.print(f"[yellow]{a.infra_errors} samples had infrastructure errors and are excluded[/]")
    info = api.grading_info(run.run_id, a.verifier, run.workspace)
    if info and "sandbox" in info:
        out.print(f"sandbox: {info['sandbox']['summary']}")


def _fail(e: Exception) -> None:
    """One line and the error's exit code: 3 for infrastructure (a server, the sandbox), else 2."""
    code = getattr(e, "exit_code", 2)
    console.print(f"[red]{'infrastructure error' if code == 3 else 'error'}:[/] {e}", highlight=False)
    raise typer.Exit(code)


def _verifier_args(allow_code_execution: bool, code_timeout: Optional[float]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if allow_code_execution:
        args["allow_code_execution"] = True
    if code_timeout is not None:
        args["timeout_s"] = code_timeout
    return args


AllowCodeOpt = typer.Option(False, "--allow-code-execution",
                            help="Run generated code for a custom code task (the bundled code tasks opt in themselves)")
CodeTimeoutOpt = typer.Option(None, "--code-timeout", help="Seconds per program for the code verifier \\[default: 5]")
ChatTemplateOpt = typer.Option(None, "--chat-template",
                               help="NAME of a llama.cpp built-in chat format (chatml, llama3, gemma, ...) or FILE "
                                    "(Jinja, tokenizer_config.json, .gguf) \\[default: the model file's own]")


EngineOpt = typer.Option("llamacpp", "--engine", help="Engine: llamacpp (embedded), openai (any OpenAI-compatible "
                                                   "server), vllm (in process, GPU)")
EngineArgOpt = typer.Option([], "--engine-arg", help="Engine argument key=value (repeatable), e.g. "
                                                     "base_url=http://host:8000/v1 for openai, model=... for vllm")
ModelOpt = typer.Option(None, "--model", help="llamacpp: GGUF file, or smollm2-135m / gemma3-270m (ship on PyPI) "
                                              "\\[default: smollm2-135m]")
PrmOpt = typer.Option(None, "--prm", help="Reward model: judge (the policy's model asked about each step), "
                                          "served (a PRM behind HTTP), confidence (the policy's own token "
                                          "confidence, free; --prm-arg metric=lowest_group) or trained (a verifier "
                                          "from train-verifier; --prm-arg path=FILE) "
                                          "\\[default: judge where a strategy needs one]")
PrmArgOpt = typer.Option([], "--prm-arg", help="Reward model argument key=value (repeatable), e.g. "
                                               "base_url=http://gpu-box:8001 for served, path=verifier.npz for "
                                               "trained")
ParamOpt = typer.Option([], "--param", help="Strategy parameter key=value (repeatable), given to every strategy "
                                            "that takes it; NAME.key=value for one strategy only")
GridOpt = typer.Option([], "--grid", help="Strategy parameter to try several values of, key=v1,v2 (repeatable); "
                                          "each combination is a candidate of its own")
TemperatureOpt = typer.Option(_SP.temperature, "--temperature")
TopPOpt = typer.Option(_SP.top_p, "--top-p")
TopKOpt = typer.Option(_SP.top_k, "--top-k")
MinPOpt = typer.Option(_SP.min_p, "--min-p")
MaxTokensOpt = typer.Option(_SP.max_tokens, "--max-tokens", help="Most tokens per sample")
StopOpt = typer.Option([], "--stop", help="Stop string (repeatable)")


def _engine_args(engine: str, model: Optional[Path], chat_template: Optional[str], engine_arg: list[str],
                 **llama: Any) -> dict[str, Any]:
    """Engine arguments from the shared options (model, chat template, --engine-arg)."""
    eargs: dict[str, Any] = {}
    if engine == "llamacpp":
        eargs = {k: v for k, v in llama.items() if v is not None}
        if model:
            eargs["model"] = str(model)
    elif model:
        raise typer.BadParameter(f"--model is the embedded engine's; for {engine} use --engine-arg model=...")
    if chat_template:
        eargs["chat_template"] = chat_template
    eargs.update(_task_args(engine_arg, None))
    return eargs


def _sampling(temperature: float, top_p: float, top_k: int, min_p: float, max_tokens: int,
              stop: list[str]) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, max_tokens=max_tokens,
                          stop=tuple(stop))


def _grid(values: list[str]) -> dict[str, list[Any]]:
    return {k: (v if isinstance(v, list) else [v]) for k, v in _task_args(values, None).items()}


def _sample(task: str, n: int, limit: Optional[int], task_args: dict, engine: str, engine_args: dict,
            params: SamplingParams, template: Optional[str], seed: int, workspace: Optional[Path],
            label: Optional[str], verifier_args: Optional[dict] = None, **search: Any) -> api.Run:
    with _progress() as (plan, update):
        t = time.perf_counter()
        run = api.sample(task, n=n, limit=limit, task_args=task_args, engine=engine, engine_args=engine_args,
                         params=params, template=template, seed=seed, workspace=workspace, label=label,
                         progress=update, on_plan=plan, verifier_args=verifier_args, **search)
    console.print(f"run [bold]{run.run_id}[/]: {run.drawn} new samples, {run.completion_tokens} tokens "
                  f"in {time.perf_counter() - t:.1f} s (workspace {run.workspace})")
    _warn_partial(run)
    return run


def _warn_partial(run: api.Run) -> None:
    if run.left:
        owners = ", ".join(sorted({f"pid {o.split(':')[1]} on {o.split(':')[0]}" for o in run.left.values()}))
        console.print(f"[yellow]{len(run.left)} problems of this run are being sampled by another process ({owners}); "
                      "they were left to it. Run the same command again when it ends for the whole run's table[/]",
                      highlight=False)
    if run.engine_ended:
        console.print(f"[yellow]infrastructure: the engine ended {run.engine_ended} samples itself (abort or error); "
                      "they were not stored, and running the same command again draws them[/]")


@app.command()
def run(workspace: Optional[Path] = WorkspaceOpt,
        problems: int = typer.Option(api.QUICKSTART["limit"], help="Problems (levels 1-3, interleaved)"),
        n: int = typer.Option(api.QUICKSTART["n"], "-n", help="Samples per problem"),
        model: Optional[Path] = typer.Option(None, help="GGUF file, or smollm2-135m / gemma3-270m (ship on PyPI) \\[default: smollm2-135m]"),
        chat_template: Optional[str] = ChatTemplateOpt,
        policy: Optional[Path] = typer.Option(None, help="Apply this compute-optimal policy (from `testtime optimal`)"),
        budget: int = typer.Option(16, help="With --policy: generations per problem"),
        arg: List[str] = typer.Option([], "--arg", help="With --policy: task argument key=value overriding the "
                                                         "policy's (e.g. seed=1 for new arithmetic problems)"),
        seed: int = typer.Option(0, help="With --policy: root seed"),
        engine: str = EngineOpt, engine_arg: List[str] = EngineArgOpt,
        prm: Optional[str] = typer.Option(None, "--prm", help="With --policy: reward model \\[default: judge where "
                                                              "the policy needs one]"),
        prm_arg: List[str] = PrmArgOpt):
    """Quickstart: arithmetic word problems on the embedded model, then a coverage report.
    With --policy: run a compute-optimal policy at a budget and report its accuracy and cost."""
    try:
        if policy is not None:
            res = api.apply_policy(policy, budget, limit=problems, task_args=_task_args(arg, None), seed=seed,
                                   engine=engine, engine_args=_engine_args(engine, model, chat_template, engine_arg),
                                   prm=prm, prm_args=_task_args(prm_arg, None), workspace=workspace,
                                   progress=lambda m: console.print(m))
            t = Table(title=f"policy {policy.name} at N<={budget}, {res['problems']} problems "
                            f"({res['difficulty']} difficulty)")
            for col in ("bin", "problems", "choice", "accuracy"):
                t.add_column(col)
            for b, r in res["by_bin"].items():
                t.add_row(str(b), str(r["problems"]), r["choice"], f"{r['accuracy']:.3f}")
            out.print(t)
            out.print(f"accuracy {res['accuracy']:.3f}; per problem: {res['tokens_per_problem']:.0f} tokens generated by "
                      f"the chosen strategies, {res['flops_per_problem']:.3e} FLOPs in all (difficulty probe and "
                      "reward model included)")
            out.print(f"run {res['run_id']} (testtime report / grade / export / cost work on it)")
            return
        if engine != "llamacpp" or engine_arg or prm:
            raise typer.BadParameter("--engine, --engine-arg and --prm go with --policy; the quickstart runs the "
                                     "embedded model (use `testtime sample` for any other engine)")
        q = api.QUICKSTART
        eargs = {"model": str(model)} if model else {}
        if chat_template:
            eargs["chat_template"] = chat_template
        r = _sample(q["task"], n, problems, dict(q["task_args"]), "llamacpp", eargs, q["params"], None, 0,
                    workspace, None)
        _print_table(r, f"arithmetic levels 1-3, {problems} problems x {n} samples")
        out.print(f"report: {api.report(r.run_id, workspace=r.workspace)}")
    except USER_ERRORS as e:
        _fail(e)


@app.command()
def optimal(task: str = typer.Option("arithmetic", "--task", "-t"),
            data: Optional[Path] = typer.Option(None, "--data", help="Data file for file-based tasks"),
            arg: List[str] = typer.Option([], "--arg", help="Task argument key=value (repeatable)"),
            limit: Optional[int] = typer.Option(30, "--limit", "-l", help="Problems, split into train and test"),
            test_fraction: float = typer.Option(0.5, help="Share of each difficulty level held out for testing"),
            difficulty: str = typer.Option("oracle", help="oracle (pass@1 of the samples) or predicted (PRM score)"),
            strategy: List[str] = typer.Option([], "--strategy", "-s", help="Candidate strategy (repeatable) "
                                               f"\\[default: {', '.join(CANDIDATES)}]; known: {', '.join(STRATEGIES.names())}"),
            param: List[str] = ParamOpt, grid: List[str] = GridOpt,
            n_max: int = typer.Option(16, help="Largest budget N (a power of two)"),
            bon_max: Optional[int] = typer.Option(None, help="Independent samples per problem \\[default: n-max]; "
                                                            "more lets the compute ratio be read past n-max"),
            probe: int = typer.Option(4, help="Samples whose reward-model score predicts difficulty"),
            out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the policy here too"),
            engine: str = EngineOpt, model: Optional[Path] = ModelOpt, chat_template: Optional[str] = ChatTemplateOpt,
            engine_arg: List[str] = EngineArgOpt, prm: Optional[str] = PrmOpt, prm_arg: List[str] = PrmArgOpt,
            temperature: float = TemperatureOpt, top_p: float = TopPOpt, top_k: int = TopKOpt, min_p: float = MinPOpt,
            max_tokens: int = MaxTokensOpt, stop: List[str] = StopOpt,
            template: Optional[str] = typer.Option(None, help="Prompt template \\[default: the task's]"),
            workspace: Optional[Path] = WorkspaceOpt):
    """Fit a compute-optimal policy (strategy and N per difficulty bin and budget) on a
    training split, evaluate it on held-out problems against fixed strategies, and write it.
    Every point it measures is a stored run."""
    try:
        res = api.optimal(task, limit, task_args=_task_args(arg, data), kind=difficulty, test_fraction=test_fraction,
                          n_max=n_max, bon_max=bon_max, strategies=tuple(strategy) or None,
                          params=_task_args(param, None), grid=_grid(grid), probe=probe,
                          sampling=_sampling(temperature, top_p, top_k, min_p, max_tokens, stop),
                          template=template, out=out_path, engine=engine,
                          engine_args=_engine_args(engine, model, chat_template, engine_arg), prm=prm,
                          prm_args=_task_args(prm_arg, None), workspace=workspace, progress=lambda m: console.print(m))
    except USER_ERRORS as e:
        _fail(e)
    t = Table(title="test accuracy by budget")
    configs = sorted(res["curves"])
    for col in ["N", *configs, "policy"]:
        t.add_column(col, justify="right")
    for n_ in sorted(res["policy_curve"]):
        t.add_row(str(n_), *[("" if res["curves"][c].get(n_) is None else f"{res['curves'][c][n_]:.3f}") for c in configs],
                  f"[bold]{res['policy_curve'][n_]:.3f}[/]")
    out.print(t)
    ratio = res["compute_ratio"]
    out.print(f"compute ratio (best-of-N budget to match the policy at N={res['top']}, / {res['top']}): "
              + (f"{ratio:.2f}" if ratio is not None else f"best-of-N never matches it within N={res['bon_max']}"))
    out.print(f"policy: {res['policy_file']}\nreport: {res['page']}")


@app.command()
def sample(task: str = typer.Option("arithmetic", "--task", "-t", help="Task name (arithmetic, gsm8k, math, humaneval, mbpp, jsonl)"),
           data: Optional[Path] = typer.Option(None, "--data", help="Data file for gsm8k, math, humaneval, mbpp or jsonl"),
           arg: List[str] = typer.Option([], "--arg", help="Task argument key=value (repeatable), e.g. levels=1,2"),
           n: int = typer.Option(16, "-n", help="Samples per problem"),
           limit: Optional[int] = typer.Option(None, "--limit", "-l", help="First N problems \\[default: all]"),
           engine: str = typer.Option("llamacpp", help="Engine name"),
           model: Optional[Path] = typer.Option(None, help="GGUF file, or smollm2-135m / gemma3-270m (ship on PyPI) \\[default: smollm2-135m]"),
           chat_template: Optional[str] = ChatTemplateOpt,
           slots: int = typer.Option(16, help="Sequences decoded together"),
           threads: Optional[int] = typer.Option(None, help="CPU threads \\[default: all]"),
           seq_ctx: int = typer.Option(1024, help="KV cells per sequence (prompt + max tokens)"),
           engine_arg: List[str] = typer.Option([], "--engine-arg", help="Engine argument key=value (repeatable), "
                                                "e.g. base_url=http://host:8000/v1 for openai, model=... for vllm"),
           temperature: float = typer.Option(_SP.temperature), top_p: float = typer.Option(_SP.top_p),
           top_k: int = typer.Option(_SP.top_k), min_p: float = typer.Option(_SP.min_p),
           max_tokens: int = typer.Option(_SP.max_tokens), stop: List[str] = typer.Option([], help="Stop string (repeatable)"),
           strategy: str = typer.Option(DEFAULT_STRATEGY, help="Strategy: " + ", ".join(STRATEGIES.names())),
           param: List[str] = typer.Option([], "--param", help="Strategy parameter key=value (repeatable)"),
           width: Optional[int] = typer.Option(None, help="Tree search: children per expanded path (M)"),
           max_steps: Optional[int] = typer.Option(None, help="Step-wise search: most steps"),
           step_tokens: Optional[int] = typer.Option(None, help="Step-wise search: most tokens per step"),
           delimiter: Optional[str] = typer.Option(None, help="What ends a step (escapes allowed: \\n\\n)"),
           lookahead: Optional[int] = typer.Option(None, help="Lookahead search: greedy rollout steps"),
           sequential: Optional[int] = typer.Option(None, help="Revision: attempts per chain"),
           aggregation: Optional[str] = typer.Option(None, help="Step scores to one: last, min, prod, mean"),
           prm: Optional[str] = PrmOpt, prm_arg: List[str] = PrmArgOpt,
           template: Optional[str] = typer.Option(None, help="Prompt template \\[default: the task's]"),
           verifier: Optional[str] = typer.Option(None, help="Verifier \\[default: the task's]"),
           seed: int = typer.Option(0, help="Root seed of the run"),
           label: Optional[str] = typer.Option(None, help="A name for the run"),
           allow_code_execution: bool = AllowCodeOpt, code_timeout: Optional[float] = CodeTimeoutOpt,
           ray_actors: Optional[int] = typer.Option(None, help="Shard problems across this many Ray actors, "
                                                                "each with its own engine"),
           ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (e.g. auto) \\[default: a local one]"),
           actor_cpus: float = typer.Option(1.0, help="CPUs per Ray actor (also its engine's threads)"),
           actor_gpus: float = typer.Option(0.0, help="GPUs per Ray actor (one vLLM replica per GPU)"),
           workspace: Optional[Path] = WorkspaceOpt):
    """Run a strategy on a task and store its candidates, graded. By default n independent
    samples per problem (only the missing ones are drawn); --strategy beam_search, dvts,
    lookahead, particle_filtering or revision search with a reward model (--prm) instead."""
    # Long because typer declares every option in the signature; the body only maps them
    # onto api.sample.
    try:
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                max_tokens=max_tokens, stop=tuple(stop))
        eargs = _engine_args(engine, model, chat_template, engine_arg, slots=slots, n_threads=threads, seq_ctx=seq_ctx)
        sargs = _strategy_args(param, width=width, max_steps=max_steps, step_tokens=step_tokens, delimiter=delimiter,
                               lookahead=lookahead, sequential=sequential, aggregation=aggregation)
        search = dict(strategy=strategy, strategy_args=sargs, prm=prm, prm_args=_task_args(prm_arg, None),
                      verifier=verifier)
        if ray_actors:
            if engine == "llamacpp" and threads is None:
                eargs["n_threads"] = max(1, int(actor_cpus))
            r = api.sample(task, n, limit, task_args=_task_args(arg, data), engine=engine, engine_args=eargs,
                           params=params, template=template, seed=seed, workspace=workspace, label=label,
                           verifier_args=_verifier_args(allow_code_execution, code_timeout), ray_actors=ray_actors,
                           ray_address=ray_address, actor_cpus=actor_cpus, actor_gpus=actor_gpus, **search)
            _warn_partial(r)
        else:
            r = _sample(task, n, limit, _task_args(arg, data), engine, eargs, params, template, seed, workspace, label,
                        _verifier_args(allow_code_execution, code_timeout), **search)
        if not r.left:
            _print_table(r, f"{task}: run {r.run_id}")
        if r.engine_ended:
            raise typer.Exit(3)
    except USER_ERRORS as e:
        _fail(e)


def _strategy_args(params: list[str], **flags: Any) -> dict[str, Any]:
    """Strategy parameters from --param key=value and the named flags that were given."""
    out = _task_args(params, None)
    for k, v in flags.items():
        if v is not None:
            out[k] = v.encode().decode("unicode_escape") if k == "delimiter" else v
    return out


@app.command()
def compare(task: str = typer.Option("arithmetic", "--task", "-t"),
            data: Optional[Path] = typer.Option(None, "--data", help="Data file for the task"),
            arg: List[str] = typer.Option([], "--arg", help="Task argument key=value (repeatable)"),
            limit: int = typer.Option(10, "--limit", "-l", help="First N problems"),
            strategy: List[str] = typer.Option([], "--strategy", "-s", help="Strategy (repeatable) "
                                               f"\\[default: {', '.join(COMPARED)}]; known: {', '.join(STRATEGIES.names())}"),
            param: List[str] = ParamOpt, grid: List[str] = GridOpt,
            n_max: int = typer.Option(8, help="Largest budget N (a power of two); N = 1, 2, 4, ... n_max"),
            seeds: int = typer.Option(2, help="Seeds per point (bands over seeds)"),
            engine: str = EngineOpt,
            model: List[Path] = typer.Option([], "--model", help="llamacpp: GGUF file \\[default: smollm2-135m]; repeat "
                                                                 "it to compare models at matched FLOPs and dollars"),
            model_n_max: List[int] = typer.Option([], help="With several --model: each one's largest N, in order "
                                                           "(e.g. many samples for the small model, few for the large)"),
            chat_template: Optional[str] = ChatTemplateOpt, engine_arg: List[str] = EngineArgOpt,
            prm: Optional[str] = PrmOpt, prm_arg: List[str] = PrmArgOpt,
            temperature: float = TemperatureOpt, top_p: float = TopPOpt, top_k: int = TopKOpt, min_p: float = MinPOpt,
            max_tokens: int = MaxTokensOpt, stop: List[str] = StopOpt,
            template: Optional[str] = typer.Option(None, help="Prompt template \\[default: the task's]"),
            prices: Optional[Path] = PricesOpt,
            workspace: Optional[Path] = WorkspaceOpt):
    """Compare strategies at equal budgets: accuracy against N, tokens and FLOPs, per level;
    every point is a stored run. With several --model: selections over each model's
    independent samples against FLOPs and dollars."""
    sampling = _sampling(temperature, top_p, top_k, min_p, max_tokens, stop)
    try:
        if len(model) > 1:
            if model_n_max and len(model_n_max) != len(model):
                raise SpecError(f"--model-n-max was given {len(model_n_max)} times for {len(model)} models")
            caps = {str(m): c for m, c in zip(model, model_n_max)} if model_n_max else n_max
            page = api.compare_models([str(m) for m in model], task, limit, task_args=_task_args(arg, data),
                                      n_max=caps, strategies=tuple(strategy), seeds=tuple(range(seeds)),
                                      sampling=sampling, template=template, prices=str(prices) if prices else None,
                                      engine=engine, engine_args=_engine_args(engine, None, chat_template, engine_arg),
                                      workspace=workspace, progress=lambda msg: console.print(msg))
        else:
            page = api.compare(task, limit, task_args=_task_args(arg, data), strategies=tuple(strategy) or None,
                               n_max=n_max, seeds=tuple(range(seeds)), params=_task_args(param, None),
                               grid=_grid(grid), sampling=sampling, engine=engine,
                               engine_args=_engine_args(engine, model[0] if model else None, chat_template, engine_arg),
                               prm=prm, prm_args=_task_args(prm_arg, None), template=template, workspace=workspace,
                               progress=lambda msg: console.print(msg))
        out.print(str(page))
    except USER_ERRORS as e:
        _fail(e)


@app.command()
def report(run_id: Optional[str] = typer.Argument(None, help="Run id, unique prefix or label \\[default: latest]"),
           verifier: Optional[str] = typer.Option(None), fit_k: Optional[int] = typer.Option(
               None, help="Fit the power law on k <= this \\[default: n/4]; forecasts at 4x and 16x"),
           prices: Optional[Path] = PricesOpt, workspace: Optional[Path] = WorkspaceOpt):
    """Write PNG plots and a self-contained HTML page for a run."""
    try:
        out.print(str(api.report(run_id, workspace=workspace, verifier=verifier, fit_k=fit_k,
                                 prices=str(prices) if prices else None)))
    except USER_ERRORS as e:
        _fail(e)


@app.command()
def adaptive(run_id: Optional[str] = typer.Argument(None, help="Run id, unique prefix or label \\[default: latest]"),
             rule: str = typer.Option("beta", help="beta (Adaptive-Consistency) or window (early-stopping "
                                                   "self-consistency)"),
             threshold: float = typer.Option(0.95, help="beta: the leader's posterior probability that stops"),
             window: int = typer.Option(4, help="window: samples per window"),
             min_samples: int = typer.Option(2, help="never stop before this many samples"),
             futility: float = typer.Option(0.0, help="also stop once the leading answer's share is surely below "
                                                      "this (0: off)"),
             futility_prob: float = typer.Option(0.1, help="futility: the posterior probability left above the "
                                                           "share that counts as sure"),
             n: Optional[int] = typer.Option(None, "-n", help="Budget per problem \\[default: all stored]"),
             workspace: Optional[Path] = WorkspaceOpt):
    """What adaptive stopping would have cost on a stored sampling run: each problem's
    samples read in their (random) seed order until its vote is decided."""
    try:
        r = api.adaptive(run_id, rule, threshold, window, min_samples, n, workspace, futility, futility_prob)
    except USER_ERRORS as e:
        _fail(e)
    shown = rule + (f" with futility {futility}" if futility else "")
    out.print(f"run {r['run_id']}, {r['problems']} problems, rule {shown}: {r['samples']:.1f} samples per problem "
              f"instead of {r['samples_all']:.1f}; {r['tokens']:,} tokens instead of {r['tokens_all']:,} "
              f"({r['tokens_all'] / max(1, r['tokens']):.2f}x fewer); accuracy {r['accuracy']:.3f} vs majority "
              f"{r['accuracy_all']:.3f} ({r['accuracy'] - r['accuracy_all']:+.3f})", highlight=False)


@app.command("adaptive-cv")
def adaptive_cv(run_ids: List[str] = typer.Argument(..., help="Two or more sampling runs (ids, prefixes or labels), "
                                                              "of different problems"),
                n: Optional[int] = typer.Option(None, "-n", help="Budget per problem \\[default: all stored]"),
                tolerance: float = typer.Option(0.005, help="choose the cheapest setting whose accuracy is at most "
                                                            "this far below majority's"),
                min_ratio: Optional[float] = typer.Option(None, help="instead, the most accurate setting that spends "
                                                                     "at least this many times fewer tokens"),
                threshold: List[float] = typer.Option([], help="Beta threshold to try (repeatable) "
                                                               "\\[default: a grid of rules]"),
                futility: List[float] = typer.Option([], help="futility share to try with each threshold "
                                                              "(repeatable; 0: none)"),
                window: List[int] = typer.Option([], help="window rule's window to try (repeatable)"),
                workspace: Optional[Path] = WorkspaceOpt):
    """Choose an adaptive stopping rule on some stored runs and check it on another:
    each run held out in turn, the rule chosen on the others replayed on it."""
    from .adaptive import outcome

    try:
        r = api.adaptive_cv(run_ids, n, tolerance, min_ratio, threshold, futility, window, workspace)
    except USER_ERRORS as e:
        _fail(e)

    def rule_text(rule) -> str:
        if rule is None:
            return "none qualified"
        if rule.rule == "window":
            return f"window {rule.window}" + (f", futility {rule.futility}" if rule.futility else "")
        return f"beta {rule.threshold}" + (f", futility {rule.futility}" if rule.futility else "")

    t = Table(title=f"chosen on the other runs ({r['criterion']}, among {r['rules']} settings), "
                    "checked on the held-out run")
    for col in ("held out", "problems", "rule", "others: ratio", "delta", "held out: ratio", "delta", "won", "lost"):
        t.add_column(col, justify="right", overflow="fold")
    for f in r["folds"]:
        h = outcome(f.held) if f.held else None
        t.add_row(f.held_out, str(h.problems if h else "-"), rule_text(f.rule),
                  f"{f.fit.ratio:.2f}" if f.fit else "-", f"{f.fit.delta:+.3f}" if f.fit else "-",
                  f"{h.ratio:.2f}" if h else "-", f"{h.delta:+.3f}" if h else "-",
                  str(h.won) if h else "-", str(h.lost) if h else "-")
    out.print(t)
    p = r["pooled"]
    if p:
        lo, hi = r["interval"]
        out.print(f"held out, pooled over {p.problems} problems: token_ratio {p.ratio:.2f}, accuracy "
                  f"{p.correct / p.problems:.3f} vs majority {p.correct_all / p.problems:.3f} "
                  f"(delta {p.delta:+.3f} [{lo:+.3f}, {hi:+.3f}], {p.won} won, {p.lost} lost)", highlight=False)
    c = r["chosen_outcome"]
    out.print(f"chosen on all runs: {rule_text(r['chosen'])}"
              + (f" (token_ratio {c.ratio:.2f}, delta {c.delta:+.3f} there; not yet checked on other problems)"
                 if c else ""), highlight=False)
    if r["shared_problems"]:
        out.print(f"[yellow]{r['shared_problems']} problems appear in more than one run: for them the held-out "
                  "check is not held out[/yellow]")


@app.command()
def cost(run_id: Optional[str] = typer.Argument(None, help="Run id, unique prefix or label \\[default: latest]"),
         n: Optional[int] = typer.Option(None, "-n", help="Count only the first n samples of each problem"),
         shape_from: Optional[Path] = typer.Option(None, help="The model's .gguf file or Hugging Face config.json "
                                                              "\\[default: the shape recorded with the run]"),
         prices: Optional[Path] = PricesOpt, workspace: Optional[Path] = WorkspaceOpt):
    """FLOPs and dollars of a run: prefill and decode, and as if no prompt prefix were shared."""
    try:
        c = api.cost(run_id, workspace=workspace, prices=str(prices) if prices else None, n=n,
                     shape_from=str(shape_from) if shape_from else None)
    except USER_ERRORS as e:
        _fail(e)
    if "error" in c:
        _fail(InputError(c["error"]))
    t = Table(title=f"run {c['run_id']}: {c['model']} ({c['params'] / 1e6:.1f}M parameters, {c['shape_source']})")
    for col in ("", "prefill", "decode", "total", "if nothing were shared", "saved"):
        t.add_column(col, justify="right")
    fl, tok = c["flops"], c["tokens"]
    t.add_row("tokens", f"{tok['prefill']:,} of {tok['prompt']:,}", f"{tok['decode']:,}", "", "",
              f"{100 * (1 - tok['prefill'] / tok['prompt']) if tok['prompt'] else 0:.1f}% of prompt")
    t.add_row("FLOPs", f"{fl['prefill']:.3e}", f"{fl['decode']:.3e}", f"{fl['total']:.3e}",
              f"{fl['total_unshared']:.3e}", f"{100 * fl['saved_fraction']:.1f}%")
    if "dollars" in c:
        d = c["dollars"]
        t.add_row("US$", "", "", f"{d['total']:.6f}", f"{d['total_unshared']:.6f}",
                  f"{100 * (1 - d['total'] / d['total_unshared']) if d['total_unshared'] else 0:.1f}%")
    out.print(t)
    out.print(f"{tok['sequences']:,} samples; {fl['total'] / max(1, tok['sequences']):.3e} FLOPs per sample"
              + (f"; prices: {c['dollars']['rule']} ({c['price_table']})" if "dollars" in c
                 else f"; no dollars: {c.get('dollars_error')}"))
    prm = c.get("prm")
    if prm and "flops" in prm:
        pf = prm["flops"]
        out.print(f"reward model ({prm['model']}): {prm['tokens']['prompt']:,.0f} prompt tokens scored, "
                  f"{pf['total']:.3e} FLOPs ({pf['total'] / max(1e-300, fl['total'] + pf['total']):.0%} of the run's "
                  f"{fl['total'] + pf['total']:.3e})")
    elif prm:
        out.print(f"reward model: {prm['tokens']['prompt']:,.0f} prompt tokens scored; {prm['error']}")
    if tok.get("cache_unknown"):
        out.print(f"[yellow]cached prompt tokens: unknown for {tok['cache_unknown']:,} samples[/] (the server did not "
                  "report them; a vLLM server does with --enable-prompt-tokens-details); their prompts are counted "
                  "as computed, so prefill and the saving are upper and lower bounds")


@app.command()
def runs(workspace: Optional[Path] = WorkspaceOpt):
    """List the runs in a workspace."""
    try:
        listed = api.runs(workspace)
    except USER_ERRORS as e:
        _fail(e)
    t = Table()
    for col in ("run", "label", "task", "model", "strategy", "problems", "samples", "n", "tokens", "status"):
        t.add_column(col, overflow="fold")
    for r in listed:
        spec = r["spec"]
        t.add_row(r["run_id"], r["label"] or "", spec["task"]["name"], spec["model"].get("model", spec["model"]["engine"]).removesuffix(".gguf"),
                  spec["strategy"]["name"],
                  str(r["problems"]), str(r["samples"]), str(r["n_target"]), str(r["completion_tokens"]),
                  "complete" if r["complete"] else "[yellow]incomplete[/]")
    out.print(t)


@app.command()
def grade(run_id: str, verifier: Optional[str] = typer.Option(None, help="\\[default: code for code tasks, else math_answer]"),
          allow_code_execution: bool = AllowCodeOpt, code_timeout: Optional[float] = CodeTimeoutOpt,
          workspace: Optional[Path] = WorkspaceOpt):
    """Grade a run's samples that this verifier has not judged yet (never re-generates)."""
    try:
        graded = api.regrade(run_id, verifier, workspace, _verifier_args(allow_code_execution, code_timeout))
        out.print(f"graded {graded} samples")
    except USER_ERRORS as e:
        _fail(e)


@app.command()
def label(run_id: Optional[str] = typer.Argument(None, help="Run id, unique prefix or label \\[default: latest]"),
          m: int = typer.Option(4, "-m", help="Rollouts from each step's prefix"),
          delimiter: str = typer.Option("\\n", help="What ends a step (escapes allowed: \\n\\n)"),
          select: str = typer.Option("all", help="Samples to label: all, or balanced (as many verified as failed)"),
          max_samples: Optional[int] = typer.Option(None, help="At most this many samples"),
          max_tokens: Optional[int] = typer.Option(None, help="Most tokens per rollout \\[default: the run's]"),
          seed: int = typer.Option(0, help="Seed of the rollouts and of the selection"),
          engine: str = EngineOpt, model: Optional[Path] = ModelOpt, chat_template: Optional[str] = ChatTemplateOpt,
          engine_arg: List[str] = EngineArgOpt,
          verifier: Optional[str] = typer.Option(None, help="\\[default: code for code tasks, else math_answer]"),
          allow_code_execution: bool = AllowCodeOpt, code_timeout: Optional[float] = CodeTimeoutOpt,
          workspace: Optional[Path] = WorkspaceOpt):
    """Label each step of a run's samples by Monte Carlo rollouts (Math-Shepherd): the
    fraction of m completions from the step's prefix that the verifier passes. The
    engine should be the run's policy. Resumable; export with --format prm."""
    try:
        delim = delimiter.encode().decode("unicode_escape")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task_id = bar.add_task("labelling samples", total=None)
            res = api.label(run_id, m, delimiter=delim, select=select, max_samples=max_samples, max_tokens=max_tokens,
                            seed=seed, engine=engine, engine_args=_engine_args(engine, model, chat_template, engine_arg),
                            verifier=verifier, verifier_args=_verifier_args(allow_code_execution, code_timeout),
                            workspace=workspace, progress=lambda k, r: bar.advance(task_id, k))
        u = res.usage
        out.print(f"run {res.run_id}, labeler {res.labeler}: {res.labelled} samples labelled now ({res.total} in all), "
                  f"{res.rollouts} rollouts, {u.prefill:,} prompt tokens computed and {u.decode:,} generated "
                  f"in {res.seconds:.1f} s")
    except USER_ERRORS as e:
        _fail(e)


@app.command("train-verifier")
def train_verifier(runs: List[str] = typer.Argument(..., help="Labelled runs to learn from (ids, prefixes or labels)"),
                   out_path: Path = typer.Option(..., "--out", "-o", help="Where to save the verifier (.npz for a "
                                                                          "probe, .safetensors for a fine-tune)"),
                   labeler: Optional[str] = typer.Option(None, help="Which step labels \\[default: each run's only ones]"),
                   holdout: float = typer.Option(0.0, help="Fraction of the problems kept out of training, for "
                                                           "eval-verifier"),
                   exclude: List[str] = typer.Option([], "--exclude", help="A run whose problems must never be "
                                                                         "trained on (repeatable)"),
                   seed: int = typer.Option(0, help="Seed of the held-out split"),
                   outcomes: str = typer.Option("all", help="Also learn from the last step of graded samples "
                                                           "without step labels (their verdicts): all, mixed (only "
                                                           "on problems with both verified and failed samples) or "
                                                           "none"),
                   outcomes_per_problem: int = typer.Option(0, help="At most this many such samples per problem "
                                                                    "and run (0: all)"),
                   target: str = typer.Option("soft", help="soft (fraction of rollouts verified) or hard (any)"),
                   model: Optional[Path] = typer.Option(None, help="Feature model: GGUF file or smollm2-135m / "
                                                                   "gemma3-270m \\[default: smollm2-135m]"),
                   layer: List[str] = typer.Option([], "--layer", help="Features from this block's residual "
                                                   "stream (0-based; repeatable), or auto: the block that "
                                                   "cross-validates best \\[default: the final hidden state]"),
                   kind: str = typer.Option("probe", help="probe: logistic regression on the frozen model's "
                                                          "states; finetune: the model itself fine-tuned with a "
                                                          "value head (needs torch: testtime[finetune])"),
                   epochs: int = typer.Option(3, help="finetune: epochs (the one whose predictions rank the dev "
                                                      "problems' solutions best is kept)"),
                   lr: float = typer.Option(2e-5, help="finetune: learning rate of the model's weights"),
                   dev: float = typer.Option(0.2, help="finetune: fraction of the training problems kept out of "
                                                       "the gradient to choose the epoch and threshold"),
                   device: Optional[str] = typer.Option(None, help="finetune: torch device \\[default: cuda if "
                                                                   "available, else cpu]"),
                   lora: int = typer.Option(0, help="finetune: train LoRA adapters of this rank (peft) instead of "
                                                    "the weights; a file of about 20 MB at 16 instead of 200"),
                   threads: Optional[int] = typer.Option(None, help="CPU threads \\[default: all]"),
                   force: bool = typer.Option(False, "--force", help="Replace the file if it exists"),
                   workspace: Optional[Path] = WorkspaceOpt):
    """Train a step verifier from Monte Carlo step labels (testtime label): a logistic
    regression on the frozen model's hidden states at each step's end (--kind probe,
    minutes on a CPU), or the model fine-tuned with a value head (--kind finetune, a
    process reward model; tens of minutes on a CPU). Use it with --prm trained
    --prm-arg path=FILE."""
    try:
        if kind == "finetune":
            v = api.train_verifier(runs, out_path, labeler=labeler, target=target, holdout=holdout, seed=seed,
                                   model=model, n_threads=threads, exclude=exclude, outcomes=outcomes,
                                   outcomes_per_problem=outcomes_per_problem, force=force,
                                   layers=_layers(layer), kind=kind,
                                   finetune={"epochs": epochs, "lr": lr, "dev": dev, "lora": lora}, device=device,
                                   workspace=workspace, log=lambda line: console.print(line))
            m = v.meta
            out.print(f"{out_path}: {m['features']['model'].get('model')} fine-tuned on {m['train_steps']} steps of "
                      f"{m['train_solutions'] + m['dev_solutions']} solutions on {len(m['train_problems'])} problems "
                      f"({m['good_steps']} good); epoch {m['chosen_epoch']} kept, threshold {v.threshold:.3f}"
                      + (f"; on the {len(m['dev_problems'])} dev problems: within-problem AUC "
                         f"{m['dev_within_auc']:.3f}, step accuracy {m['dev_step_accuracy']:.3f}, macro F1 "
                         f"{m['dev_step_f1']:.3f}" if m["dev_problems"] else "")
                      + f"; {len(m['heldout_problems'])} problems held out")
            return
        if (epochs, lr, dev, device, lora) != (3, 2e-5, 0.2, None, 0):
            raise InputError("--epochs, --lr, --dev, --device and --lora are fine-tuning settings: add --kind "
                             "finetune")
        with Progress(TextColumn("reading solutions"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task_id = bar.add_task("features", total=None)
            v = api.train_verifier(runs, out_path, labeler=labeler, target=target, holdout=holdout, seed=seed,
                                   model=model, n_threads=threads, exclude=exclude, outcomes=outcomes,
                                   outcomes_per_problem=outcomes_per_problem, force=force,
                                   layers=_layers(layer), kind=kind, workspace=workspace,
                                   progress=lambda k: bar.advance(task_id, k))
        m = v.meta
        auc = "n/a" if m["cv_auc"] is None else f"{m['cv_auc']:.3f}"
        out.print(f"{out_path}: {m['train_steps']} steps of {m['train_solutions']} solutions on "
                  f"{len(m['train_problems'])} problems ({m['good_steps']} good); {m['fit']} fit, C={m['c']}, "
                  f"threshold {v.threshold:.3f}; cross-validated by problem: step accuracy {m['cv_step_accuracy']:.3f}, "
                  f"macro F1 {m['cv_step_f1']:.3f}, AUC {auc}; {len(m['heldout_problems'])} problems held out")
        if "layer_cv" in m:
            out.print(f"features from block {m['features']['layers'][0]}, chosen by cross-validated within-problem "
                      "AUC: " + ", ".join(f"{k}: {f['within_auc']:.3f}" if f["within_auc"] is not None else f"{k}: n/a"
                                          for k, f in m["layer_cv"].items()))
    except USER_ERRORS as e:
        _fail(e)


def _layers(values: list[str]) -> tuple[int, ...] | str:
    if values == ["auto"]:
        return "auto"
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise InputError(f"--layer takes block numbers or auto (alone), got {' '.join(values)}") from None


@app.command("eval-verifier")
def eval_verifier(path: Path = typer.Argument(..., help="A verifier file from train-verifier"),
                  run_id: str = typer.Argument(..., help="A labelled run (its problems the verifier saw are left out)"),
                  labeler: Optional[str] = typer.Option(None, help="Which step labels \\[default: the run's only ones]"),
                  model: Optional[Path] = typer.Option(None, help="Feature model \\[default: as trained]"),
                  as_json: bool = typer.Option(False, "--json", help="Print JSON"),
                  workspace: Optional[Path] = WorkspaceOpt):
    """Step accuracy, F1 and first-error accuracy (ProcessBench's measure) of a trained
    verifier against Monte Carlo labels of problems it never saw."""
    try:
        r = api.eval_verifier(path, run_id, labeler=labeler, model=model, workspace=workspace)
        if as_json:
            out.print_json(json.dumps(r))
            return
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        out.print(f"run {r['run_id']} ({r['labeler']}): {r['steps']} steps of {r['solutions']} solutions on "
                  f"{r['problems']} unseen problems ({r['seen_problems_left_out']} seen in training left out)")
        out.print(f"step accuracy {fmt(r['step_accuracy'])}, macro F1 {fmt(r['step_f1'])} (good {fmt(r['step_f1_good'])}, "
                  f"bad {fmt(r['step_f1_bad'])}), AUC {fmt(r['auc'])} (within problems {fmt(r['within_auc'])}), "
                  f"log loss {fmt(r['log_loss'])}")
        out.print(f"first error: accuracy {fmt(r['first_error_acc_erroneous'])} on solutions with one, "
                  f"{fmt(r['first_error_acc_correct'])} on those without, F1 {fmt(r['first_error_f1'])}")
    except USER_ERRORS as e:
        _fail(e)


@app.command("judge-responses")
def judge_responses(run_id: Optional[str] = typer.Argument(None, help="A run of the instructions task (thought "
                                                                      "format) \\[default: latest]"),
                    engine: str = EngineOpt, model: Optional[Path] = ModelOpt,
                    chat_template: Optional[str] = ChatTemplateOpt, engine_arg: List[str] = EngineArgOpt,
                    workspace: Optional[Path] = WorkspaceOpt):
    """Rate each output's response (never its thought) from 1 to 9 with an LLM judge, for
    thought preference pairs (export --format tpo)."""
    try:
        r = api.judge_responses(run_id, engine=engine, engine_args=_engine_args(engine, model, chat_template, engine_arg),
                                workspace=workspace)
        out.print(f"run {r['run_id']}: {r['rated']} responses rated now by {r['scorer']}, {r['without_response']} "
                  f"outputs have no response; {int(r['usage']['prefill']):,} prompt tokens computed")
    except USER_ERRORS as e:
        _fail(e)


@app.command()
def export(run_id: str, path: Path,
           fmt: Optional[str] = typer.Option(None, "--format", help="jsonl, parquet, sft, dpo, prm, orm or tpo "
                                                                    "\\[default: from suffix]"),
           verifier: Optional[str] = typer.Option(None, help="sft/dpo/orm: whose verdicts decide "
                                                             "\\[default: the run's only one]"),
           drop_shots: bool = typer.Option(False, help="sft/dpo: leave the few-shot turns out of the prompt"),
           pairs_per_problem: int = typer.Option(4, help="dpo: most (chosen, rejected) pairs per problem"),
           labeler: Optional[str] = typer.Option(None, help="prm: which step labels \\[default: the run's only ones]"),
           threshold: Optional[float] = typer.Option(None, help="prm: a step is good when at least this fraction of "
                                                                "its rollouts passed \\[default: any]"),
           rho: float = typer.Option(0.5, help="tpo: length penalty on the judge's rating, per standard deviation "
                                               "of response length"),
           force: bool = typer.Option(False, "--force", help="Replace the file if it exists (never the workspace's "
                                                           "database)"),
           workspace: Optional[Path] = WorkspaceOpt):
    """Export a run's samples and verdicts (JSONL, Parquet), or training data for TRL:
    sft (prompt-completion), dpo (chosen/rejected pairs), prm (step labels from
    `testtime label`, stepwise supervision), orm (outcome labels, one step each) or tpo
    (thought preference pairs from judge-responses)."""
    try:
        out.print(str(api.export(run_id, path, fmt, workspace, verifier=verifier, drop_shots=drop_shots,
                                 pairs_per_problem=pairs_per_problem, labeler=labeler, threshold=threshold,
                                 rho=rho, force=force)))
    except USER_ERRORS as e:
        _fail(e)


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback unless told otherwise)"),
          port: int = typer.Option(8000, min=0, max=65535),
          engine: str = EngineOpt, model: Optional[Path] = ModelOpt, chat_template: Optional[str] = ChatTemplateOpt,
          engine_arg: List[str] = EngineArgOpt,
          upstream: Optional[str] = typer.Option(None, help="Shorthand for --engine openai --engine-arg base_url=URL: "
                                                           "an OpenAI-compatible server to draw samples from"),
          upstream_model: Optional[str] = typer.Option(None, help="The upstream's model name \\[default: its only one]"),
          prm: str = typer.Option("judge", "--prm", help="Reward model for the strategies that need one: judge (a "
                                                         "judge made from the same engine), served, confidence, trained, or none"),
          prm_arg: List[str] = PrmArgOpt,
          policy: Optional[Path] = typer.Option(None, help="Offer policy@B: a compute-optimal policy file "
                                                           "(fitted with --difficulty predicted)"),
          api_key: Optional[str] = typer.Option(None, envvar="TESTTIME_API_KEY",
                                                help="Require Authorization: Bearer KEY on every route but /health"),
          max_n: int = typer.Option(64, min=1, help="Most samples (the budget N) one request may ask for"),
          max_tokens: int = typer.Option(4096, min=1, help="Largest max_tokens a request may ask for"),
          max_budget: int = typer.Option(65536, min=1, help="Most tokens one request may ask to generate (n x max_tokens)"),
          max_queue: int = typer.Option(64, min=1, help="Requests in the server at once; more get 429 with Retry-After"),
          max_body: int = typer.Option(1 << 20, min=1024, help="Largest request body, bytes (413 beyond)"),
          max_connections: int = typer.Option(512, min=1, help="Open connections at once (503 beyond)"),
          timeout: float = typer.Option(600.0, min=1, help="Seconds a request may take; then it is cancelled (504)"),
          max_batch: Optional[int] = typer.Option(None, min=1, help="Most samples decoded together (the engine's "
                                                                     "slots by default); fewer makes each request "
                                                                     "faster, more raises throughput while it grows"),
          max_wait: float = typer.Option(120.0, min=0, help="Seconds a request's waiting samples may be passed over "
                                                            "by smaller requests before they go first"),
          seq_ctx: Optional[int] = typer.Option(None, help="The embedded engine's KV cells per sequence: the "
                                                           "longest prompt plus max_tokens it can take \\[default: 1024]"),
          access_log: bool = typer.Option(True, help="One JSON line per request on stderr")):
    """An OpenAI-compatible server that applies a test-time strategy per request: model
    "sample", "NAME@N" for any registered strategy, or "policy@B". Requests are batched
    together in the engine as they arrive (continuous batching)."""
    import logging

    import uvicorn

    from .engines import load_engine
    from .searchspec import RewardModelSpec
    from .serve import Limits, ServeConfig, SharedEngine, bind, make_app, uvicorn_config

    if upstream:
        engine = "openai"
        engine_arg = [f"base_url={upstream}", *engine_arg] + ([f"model={upstream_model}"] if upstream_model else [])
    shared: Any = None
    try:
        # the embedded engine: 16 slots, and room to keep many requests' prompts cached
        eargs = _engine_args(engine, model, chat_template, engine_arg, slots=16, max_prefixes=64, seq_ctx=seq_ctx)
        shared = SharedEngine(load_engine(engine, **eargs), capacity=max_batch, max_wait_s=max_wait)
        judge, _ = RewardModelSpec(None if prm == "none" else prm, _task_args(prm_arg, None)).build(shared)
        from .policy import Policy

        config = ServeConfig(Limits(max_n, max_tokens, max_budget), max_queue, timeout, max_body, api_key)
        app_ = make_app(shared, judge=judge, policy=Policy.load(policy) if policy else None, config=config)
        sock = bind(host, port)
    except (*USER_ERRORS, OSError) as e:
        if shared is not None:
            shared.close()
        _fail(e)
    if access_log:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("testtime.serve.access").addHandler(handler)
        logging.getLogger("testtime.serve.access").setLevel(logging.INFO)
    console.print(f"serving on http://{host}:{sock.getsockname()[1]}/v1 (models: sample, NAME@N for "
                  f"{', '.join(STRATEGIES.names())}" + (", policy@B" if policy else "") + ")"
                  + ("; an API key is required" if api_key else ""))
    try:
        uvicorn.Server(uvicorn_config(app_, max_connections)).run(sockets=[sock])
    finally:
        shared.close()


@app.command()
def env(as_json: bool = typer.Option(False, "--json", help="Print JSON (for bug reports)")):
    """What this installation runs on: versions, llama.cpp's build and the CPU variant
    it chose, the default model, and the sandbox's isolation."""
    import json

    from .environment import collect

    info = collect()
    if as_json:
        out.print_json(json.dumps(info))
        return
    for section, values in info.items():
        out.print(f"[bold]{section}[/]")
        for k, v in values.items():
            if isinstance(v, list):
                v = ", ".join(map(str, v)) or "none"
            if isinstance(v, str) and "\n" in v:
                v = v.replace("\n", "\n    ")
            out.print(f"  {k}: {v}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    app()
