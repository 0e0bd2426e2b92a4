"""docs/extending.md: every code block runs, in order, and the five extensions work
together as a stored, graded, resumable run, from the API and the command line."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


@pytest.fixture(scope="module")
def guide():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 6, "the guide has a task, a verifier, an engine, a reward model, a strategy and a run"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # the guide's own code, as a reader would paste it
    return namespace


def test_the_worked_example_runs_as_a_stored_graded_run(guide, tmp_path):
    import testtime
    from testtime.store import Store

    summary = guide["summary"]
    assert summary["problems"] == 6 and summary["strategy"]["name"] == "until_confident"
    # the reward model sees the slip, so the confident sample is right on every problem
    assert summary["accuracy"] == 1.0
    # easy decisions stop early: fewer candidates than the budget of 8
    assert 1 <= summary["candidates_per_problem"] < 8
    with Store(guide["workspace"]) as store:
        rid = guide["run"].run_id
        assert store.run_spec(rid).strategy["threshold"] == 0.8 and store.finished_problems(rid)
        assert store.usage(rid, role="prm")  # the reward model's cost is stored per problem
    again = testtime.sample("minutes", n=8, limit=6, engine="lookup", engine_args={"slip": 3},
                            strategy="until_confident", strategy_args={"threshold": 0.8},
                            prm="checks_arithmetic", verifier="last_number", workspace=guide["workspace"])
    assert again.run_id == guide["run"].run_id and again.drawn == 0  # resumed: nothing to do


def test_the_extensions_work_from_the_command_line(guide, tmp_path):
    from testtime.cli import app

    args = ["sample", "--task", "minutes", "--engine", "lookup", "--strategy", "until_confident", "--param",
            "threshold=0.8", "--prm", "checks_arithmetic", "--verifier", "last_number", "-n", "8", "--limit", "4",
            "-w", str(tmp_path)]
    r = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "until_confident" in r.output and "accuracy" in r.output
    r = CliRunner().invoke(app, [*args[:8], "threshold=1.5", *args[9:]], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "threshold must be in (0, 1]" in r.output
    r = CliRunner().invoke(app, ["compare", "--task", "minutes", "--engine", "lookup", "--strategy", "until_confident",
                                 "--strategy", "majority", "--prm", "checks_arithmetic", "--n-max", "4", "--seeds",
                                 "1", "--limit", "4", "-w", str(tmp_path)])
    assert r.exit_code == 0 and r.output.strip().endswith("compare.html"), r.output


def test_the_strategy_stops_each_problem_once_decided(guide):
    from testtime.prompts import get_template
    from testtime.spec import SamplingParams
    from testtime.strategies import SearchContext, load_strategy, strategy_params
    from testtime.tasks import load_task

    class Counting(guide["LookupEngine"]):
        calls: list = []

        def generate(self, requests):
            requests = list(requests)
            self.calls.append(len(requests))
            yield from super().generate(requests)

    problems = load_task("minutes").problems(5)
    engine = Counting(slip=2)  # even seeds slip
    ctx = SearchContext(engine, guide["ChecksArithmetic"](), get_template("plain"), SamplingParams(), seed=0)
    results = list(load_strategy("until_confident").run(problems, ctx, strategy_params("until_confident",
                                                                                           {"n": 6, "batch": 2})))
    assert {r.problem_id for r in results} == {p.id for p in problems}
    for r in results:
        right = [c for c in r.candidates if c.scores[-1] >= 0.8]
        assert right, "a confident sample ends every problem here"
        assert len(r.candidates) <= 6 and len(r.candidates) % 2 == 0
        assert r.usage["policy"].sequences == len(r.candidates) and r.usage["prm"].prompt > 0
    assert engine.calls[0] == 5  # every open problem in one engine call per round
