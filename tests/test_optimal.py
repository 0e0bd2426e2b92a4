"""`optimal` and `run --policy` end to end on the toy engine with a scripted reward model."""

import json

import pytest
from typer.testing import CliRunner

from testtime import api
from testtime.cli import app
from testtime.flops import Usage
from testtime.optimal import split
from testtime.policy import Policy
from testtime.tasks import load_task
from testtime.tasks.base import Problem


class AnswerPRM:
    """Knows the answers: a step stating the right one scores 0.9, others 0.3. Counts usage."""

    name = "answer"

    def __init__(self, problems):
        self.answers = {p.question: p.answer for p in problems}
        self.usage = Usage()
        self.calls = 0

    def identity(self):
        return {"reward_model": "answer"}

    def score(self, items):
        self.calls += 1
        out = []
        for it in items:
            out.append([0.9 if f"answer is {self.answers.get(it.question)}." in s else 0.3
                        for s in it.steps[it.known:]])
            self.usage += Usage.of(10 * len(it.steps), 0, 1)
        return out


def _stack(task_args):
    from testtime.engines.toy import ToyEngine

    task = load_task("arithmetic", **task_args)
    return ToyEngine(), AnswerPRM(task.problems(200))


def test_split_is_stratified_and_deterministic():
    probs = [Problem(f"L{lv}-{i}", "q", "1", difficulty=lv) for i in range(6) for lv in (1, 2)]
    train, test = split(probs, 0.5)
    assert len(train) == len(test) == 6
    for lv in (1, 2):
        assert sum(p.difficulty == lv for p in test) == 3
    assert split(probs, 0.5) == (train, test)
    with pytest.raises(ValueError, match="test_fraction"):
        split(probs, 1.0)


def test_optimal_writes_a_policy_that_run_applies(tmp_path):
    args = {"levels": [1, 2]}
    engine, prm = _stack(args)
    res = api.optimal("arithmetic", 12, task_args=args, n_max=4, bon_max=8, grid={"width": [2]},
                      params={"max_steps": 3}, strategies=("best_of_n", "majority", "beam_search"),
                      out=tmp_path / "p.json", engine=engine, prm=prm, workspace=tmp_path / "ws")
    pol = Policy.load(tmp_path / "p.json")
    assert pol.budgets == [1, 2, 4] and pol.difficulty.kind == "oracle"
    assert set(res["curves"]) == {"best_of_n", "majority", "beam_search(width=2)"}
    assert res["curves"]["best_of_n"][8] is not None  # best-of-N measured past n_max
    assert set(res["policy_curve"]) == {1, 2, 4}
    assert pol.meta["task"]["args"] == args and len(pol.meta["train"]) == len(pol.meta["test"]) == 6
    summary = json.loads((res["page"].parent / "summary.json").read_text())
    assert summary["flops_per_problem"]["best_of_n@4"] > 0
    assert (res["page"].parent / "optimal_vs_flops.png").is_file()
    # the policy's test accuracy at each budget is exactly its choices' accuracies on the test problems
    table = res["table"]
    for b, acc in res["policy_curve"].items():
        per = [table.acc[pol.choose(b, res["test_bins"][pid]).config][pol.choose(b, res["test_bins"][pid]).n][pid]
               for pid in pol.meta["test"]]
        assert acc == pytest.approx(sum(per) / len(per))

    # every point is a stored run that the run commands see: one sampling draw, beam search at N = 2 and 4
    runs = {r["run_id"]: r for r in api.runs(tmp_path / "ws")}
    assert {r["run_id"] for r in res["runs"]} == set(runs) and len(runs) == 3
    names = sorted(r["spec"]["strategy"]["name"] for r in runs.values())
    assert names == ["beam_search", "beam_search", "repeated_sampling"]
    beam = next(r for r in res["runs"] if r["arm"] == "beam_search(width=2)" and r["n"] == 4)
    s = api.summary(beam["run_id"], tmp_path / "ws")
    assert s["strategy"]["width"] == 2 and s["strategy"]["max_steps"] == 3 and s["problems"] == 12
    assert s["accuracy"] == pytest.approx(sum(res["table"].acc["beam_search(width=2)"][4].values()) / 12)
    assert api.cost(beam["run_id"], tmp_path / "ws")["prm"]["tokens"]["prompt"] > 0  # the PRM's share is counted
    calls = prm.calls
    again = api.optimal("arithmetic", 12, task_args=args, n_max=4, bon_max=8, grid={"width": [2]},
                        params={"max_steps": 3}, strategies=("best_of_n", "majority", "beam_search"), engine=engine,
                        prm=prm, workspace=tmp_path / "ws")
    assert prm.calls == calls  # every cell came from the store: nothing ran again
    assert again["policy_curve"] == res["policy_curve"]

    applied = api.apply_policy(tmp_path / "p.json", 4, limit=10, task_args={"seed": 7}, engine=engine, prm=prm,
                               workspace=tmp_path / "ws")
    assert applied["task"]["seed"] == 7 and applied["problems"] == 10
    assert sum(b["problems"] for b in applied["by_bin"].values()) == 10
    assert 0 <= applied["accuracy"] <= 1 and applied["flops_per_problem"] > 0
    for pid, r in applied["per_problem"].items():
        c = pol.choose(4, r["bin"])
        assert r["choice"] == f"{c.config} N={c.n}"
    # the applied policy is one stored run of the `policy` strategy, like any other
    summary = api.summary(applied["run_id"], tmp_path / "ws")
    assert summary["strategy"]["name"] == "policy" and summary["strategy"]["policy_sha"]
    assert summary["accuracy"] == pytest.approx(applied["accuracy"]) and summary["problems"] == 10
    assert api.report(applied["run_id"], tmp_path / "ws").is_file()
    r = CliRunner().invoke(app, ["sample", "--engine", "toy", "--strategy", "policy", "--param",
                                 f"path={tmp_path / 'p.json'}", "-n", "4", "--arg", "levels=1,2", "--arg", "seed=7",
                                 "--limit", "3", "-w", str(tmp_path / "cli")], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "policy, 3 problems" in r.output, r.output
    # the probe's cost is charged to each problem beside its choice's: more than the choices alone
    assert applied["tokens_per_problem"] > 0 and api.cost(applied["run_id"], tmp_path / "ws")["tokens"]["decode"] > 0
    # the policy runs on any engine from the command line; a dead one is a one-line infrastructure error
    r = CliRunner().invoke(app, ["run", "--policy", str(tmp_path / "p.json"), "--budget", "4", "--engine", "openai",
                                 "--engine-arg", "base_url=http://127.0.0.1:9/v1", "--engine-arg", "max_retries=0",
                                 "--problems", "2", "-w", str(tmp_path / "ws")])
    assert r.exit_code == 3 and "unreachable" in r.output and "Traceback" not in r.output, r.output
    calls = prm.calls
    assert api.apply_policy(tmp_path / "p.json", 4, limit=10, task_args={"seed": 7}, engine=engine, prm=prm,
                            workspace=tmp_path / "ws")["accuracy"] == applied["accuracy"]
    assert prm.calls == calls  # resumed from the store


def test_cli_reports_bad_policy_files(tmp_path):
    (tmp_path / "p.json").write_text("{}")
    res = CliRunner().invoke(app, ["run", "--policy", str(tmp_path / "p.json"), "-w", str(tmp_path)])
    assert res.exit_code == 2 and "not a testtime policy" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["optimal", "--strategy", "beam_search", "-w", str(tmp_path)])
    assert res.exit_code == 2 and "best_of_n must be among" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["optimal", "--param", "widht=2", "-w", str(tmp_path)])
    assert res.exit_code == 2 and "no chosen strategy takes parameter 'widht'" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["compare", "--strategy", "beam_search", "--grid", "width=3", "--n-max", "2",
                                   "-w", str(tmp_path)])
    assert res.exit_code == 2 and "runs at no budget" in " ".join(res.output.split())


def test_models_compared_at_matched_flops_and_dollars(tmp_path):
    from testtime.engines.toy import ToyEngine
    from testtime.flops import ModelShape

    class Sized(ToyEngine):
        def __init__(self, params, answer_range):
            super().__init__(answer_range=answer_range)
            self.params = params

        def identity(self):
            return {"engine": "toy", "answer_range": self.answer_range, "params": self.params}

        def shape(self):
            d = 64
            return ModelShape(f"toy-{self.params}", params=self.params, n_layers=4, d_model=d, n_heads=4, n_kv_heads=4,
                              head_dim=16, vocab=1000, tied_embeddings=True)

    small, large = Sized(2_000_000, 10), Sized(20_000_000, 4)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"prices": [{"model": "toy-2000000", "input": 1, "output": 2},
                                             {"model": "toy-20000000", "input": 10, "output": 20}]}))
    page = api.compare_models(["small", "large"], "arithmetic", 6, task_args={"levels": [1]},
                              n_max={"small": 8, "large": 2}, engines={"small": small, "large": large},
                              prices=str(prices), workspace=tmp_path)
    summary = json.loads((page.parent / "summary.json").read_text())
    curves = summary["curves"]
    assert set(curves) == {"small", "large"}
    assert sorted(map(int, curves["small"]["majority"])) == [1, 2, 4, 8]
    assert sorted(map(int, curves["large"]["majority"])) == [1, 2]
    s1, l1 = curves["small"]["majority"]["1"], curves["large"]["majority"]["1"]
    # same prompts and about the same tokens: FLOPs scale with parameters, dollars with the price table
    assert 5 < l1["flops"] / s1["flops"] < 11
    assert l1["dollars"] / s1["dollars"] == pytest.approx(10, rel=0.3)
    assert curves["small"]["majority"]["8"]["flops"] == pytest.approx(8 * s1["flops"], rel=1e-6)
    assert (page.parent / "models_vs_flops.png").is_file() and (page.parent / "models_vs_dollars.png").is_file()
