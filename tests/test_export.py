"""Training-data export (TRL SFT and DPO formats), run cost and forecasts in the report, on the toy engine."""

import json

import pytest
from typer.testing import CliRunner

from testtime import api
from testtime.cli import app
from testtime.flops import ModelShape, Usage
from testtime.prompts import get_template
from testtime.store import Store

TOY = {"engine": "toy", "task_args": {"levels": [1]}}


@pytest.fixture
def run(tmp_path):
    r = api.sample("arithmetic", n=12, limit=6, workspace=tmp_path, **TOY)
    return r, tmp_path


def _samples(ws, run_id):
    with Store(ws) as store:
        return {(s["problem_id"], s["sample_index"]): s for s in store.iter_export(run_id)}


def test_sft_rows_are_the_verified_samples_in_trl_prompt_completion_form(run, tmp_path):
    r, ws = run
    path = api.export(r.run_id, tmp_path / "sft.jsonl", "sft", ws)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    samples = _samples(ws, r.run_id)
    passed = {k for k, s in samples.items() if s["verdicts"]["math_answer"]["verdict"] == "pass"}
    distinct = {(k[0], samples[k]["text"]) for k in passed}
    assert 0 < len(rows) == len(distinct)  # every distinct verified sample, once
    tmpl = get_template("arithmetic_fewshot")
    for row in rows:
        assert set(row) == {"prompt", "completion", "metadata"}
        meta = row["metadata"]
        s = samples[(meta["problem_id"], meta["sample_index"])]
        assert s["verdicts"]["math_answer"]["verdict"] == "pass"
        assert row["prompt"] == tmpl.messages(s["question"])  # what the model saw, few-shot turns included
        assert row["completion"] == [{"role": "assistant", "content": tmpl.continuation(s["question"]) + s["text"]}]
        assert meta["reference"] == s["reference"] and meta["run_id"] == r.run_id
        for m in row["prompt"]:
            assert set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")

    short = api.export(r.run_id, tmp_path / "sft0.jsonl", "sft", ws, drop_shots=True)
    for row in map(json.loads, short.read_text().splitlines()):
        assert [m["role"] for m in row["prompt"]][-1] == "user"
        assert "assistant" not in [m["role"] for m in row["prompt"]]


def test_dpo_pairs_join_a_verified_and_a_failed_sample_of_one_problem(run, tmp_path):
    r, ws = run
    path = api.export(r.run_id, tmp_path / "dpo.jsonl", "dpo", ws, pairs_per_problem=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    samples = _samples(ws, r.run_id)
    assert rows
    per_problem = {}
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "metadata"}
        meta = row["metadata"]
        c = samples[(meta["problem_id"], meta["chosen_index"])]
        rj = samples[(meta["problem_id"], meta["rejected_index"])]
        assert c["verdicts"]["math_answer"]["verdict"] == "pass"
        assert rj["verdicts"]["math_answer"]["verdict"] == meta["rejected_verdict"] != "pass"
        assert row["chosen"][0]["content"].endswith(c["text"]) and row["rejected"][0]["content"].endswith(rj["text"])
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert row["prompt"][-1]["content"].endswith(c["question"]) or c["question"] in row["prompt"][-1]["content"]
        per_problem.setdefault(meta["problem_id"], []).append((meta["chosen_index"], meta["rejected_index"]))
    for pid, pairs in per_problem.items():
        assert len(pairs) <= 3 and len(set(pairs)) == len(pairs)
        kinds = {s["verdicts"]["math_answer"]["verdict"] == "pass" for (p, _), s in samples.items() if p == pid}
        assert kinds == {True, False}
    # every problem with both kinds of sample gets pairs
    both = {p for p, _ in samples if {samples[k]["verdicts"]["math_answer"]["verdict"] == "pass"
                                         for k in samples if k[0] == p} == {True, False}}
    assert set(per_problem) == both
    again = api.export(r.run_id, tmp_path / "dpo2.jsonl", "dpo", ws, pairs_per_problem=3)
    assert again.read_text() == path.read_text()  # deterministic


def test_export_refuses_what_it_cannot_do_right(run, tmp_path):
    r, ws = run
    with pytest.raises(ValueError, match="no verdicts from 'code'"):
        api.export(r.run_id, tmp_path / "x.jsonl", "sft", ws, verifier="code")
    with pytest.raises(ValueError, match="pairs_per_problem"):
        api.export(r.run_id, tmp_path / "x.jsonl", "dpo", ws, pairs_per_problem=0)
    with Store(ws) as store:  # a run whose template text changed since it was sampled
        spec = json.loads(store.db.execute("SELECT spec FROM runs").fetchone()[0])
        spec["template"]["sha"] = "000000000000"
        store.db.execute("UPDATE runs SET spec = ?", (json.dumps(spec),))
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        api.export(r.run_id, tmp_path / "x.jsonl", "sft", ws)
    assert not (tmp_path / "x.jsonl").exists()


def test_run_cost_from_stored_samples_and_cli(run):
    r, ws = run
    c = api.cost(r.run_id, workspace=ws)
    with Store(ws) as store:
        rows = store.samples(r.run_id)
        shape = ModelShape.from_dict(store.model_shape(r.run_id))
    usage = sum((Usage.of(s.prompt_tokens, s.cached_tokens, s.completion_tokens) for s in rows), Usage())
    assert shape.name == "toy"
    assert c["flops"]["total"] == pytest.approx(shape.flops(usage))
    assert c["flops"]["total_unshared"] == pytest.approx(shape.flops(usage, shared=False))
    assert c["dollars"]["total"] > 0 and c["tokens"]["sequences"] == 72
    per_sample = _samples(ws, r.run_id)  # the export carries each sample's FLOPs
    assert sum(s["flops"] for s in per_sample.values()) == pytest.approx(c["flops"]["total"])
    assert all(s["flops_unshared"] >= s["flops"] > 0 for s in per_sample.values())
    # a shape given for the run (an old run, or another model's price of the same tokens)
    from test_flops import SMOLLM2_135M_CONFIG

    (ws / "config.json").write_text(json.dumps(SMOLLM2_135M_CONFIG))
    other = api.cost(r.run_id, workspace=ws, shape_from=str(ws / "config.json"))
    assert other["flops"]["total"] == pytest.approx(ModelShape.from_hf_config(SMOLLM2_135M_CONFIG).flops(usage))
    res = CliRunner().invoke(app, ["cost", r.run_id, "-w", str(ws)])
    assert res.exit_code == 0, res.output
    assert "FLOPs" in res.output and "US$" in res.output
    res = CliRunner().invoke(app, ["cost", r.run_id, "-w", str(ws), "--prices", str(ws / "missing.json")])
    assert res.exit_code == 2 and "cannot read price table" in res.output


def test_report_shows_forecast_and_cost(tmp_path):
    r = api.sample("arithmetic", n=16, limit=8, workspace=tmp_path, engine="toy",
                   task_args={"levels": [1, 2, 3]})
    page = api.report(r.run_id, workspace=tmp_path, fit_k=4)
    summary = json.loads((page.parent / "summary.json").read_text())
    fc = summary["forecast"]
    assert [f["k"] for f in fc] == [16, 64]
    assert fc[0]["measured"] is not None and fc[1]["measured"] is None  # n = 16 measures 4K only
    assert fc[0]["error"] == pytest.approx(fc[0]["predicted"] - fc[0]["measured"])
    assert fc[0]["low"] <= fc[0]["predicted"] <= fc[0]["high"]
    assert summary["cost"]["flops"]["total"] > 0
    text = page.read_text()
    assert "forecast" in text and "if no prefix were shared" in text


def test_export_never_writes_over_the_store_or_an_existing_file(run, tmp_path):
    """Issue 16.5: `export RUN WORKSPACE/testtime.db` replaced the database with JSONL (exit 0)."""
    r0, ws = run
    db = ws / "testtime.db"
    before = db.read_bytes()[:16]
    for target in (db, ws / "testtime.db-wal", ws / "." / "testtime.db"):
        for force in ([], ["--force"]):
            r = CliRunner().invoke(app, ["export", r0.run_id, str(target), *force, "-w", str(ws)])
            assert r.exit_code == 2 and "database" in r.output, (target, force, r.output)
    assert db.read_bytes()[:16] == before == b"SQLite format 3\x00" and api.runs(ws)
    out_dir = tmp_path / "out"
    other = out_dir / "other-ws"
    Store(other).close()
    r = CliRunner().invoke(app, ["export", r0.run_id, str(other / "testtime.db"), "--force", "-w", str(ws)])
    assert r.exit_code == 2 and "SQLite database" in r.output
    out = out_dir / "samples.jsonl"
    out.write_text("keep me\n")
    r = CliRunner().invoke(app, ["export", r0.run_id, str(out), "-w", str(ws)])
    assert r.exit_code == 2 and "--force" in r.output and out.read_text() == "keep me\n"
    assert CliRunner().invoke(app, ["export", r0.run_id, str(out), "--force", "-w", str(ws)]).exit_code == 0
    assert out.read_text() != "keep me\n"
    r = CliRunner().invoke(app, ["export", r0.run_id, str(out_dir), "-w", str(ws)])
    assert r.exit_code == 2 and "directory" in r.output


def test_a_failed_export_leaves_no_temporary_file(run, tmp_path, monkeypatch):
    r0, ws = run

    def broken(self, run_id):
        yield {"problem_id": "p", "verdicts": {}}
        raise RuntimeError("the disk filled up")

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.setattr(Store, "iter_export", broken)
    for name in ("out.jsonl", "out.parquet"):
        with pytest.raises(RuntimeError, match="disk filled"):
            api.export(r0.run_id, out_dir / name, workspace=ws)
    assert list(out_dir.iterdir()) == []  # neither the file nor a temporary one
