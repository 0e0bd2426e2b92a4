"""The command line, end to end, on the real embedded model with a small budget."""

import json

import pytest
from typer.testing import CliRunner

from conftest import requires_model
from testtime.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


@requires_model
@pytest.mark.model
def test_sample_runs_report_export_on_the_embedded_model(tmp_path):
    ws = tmp_path / "ws"
    out = invoke("sample", "--task", "arithmetic", "--arg", "levels=1,2", "--limit", 4, "-n", 4,
                 "--max-tokens", 64, "--slots", 8, "-w", ws)
    assert "pass@k" in out
    listing = invoke("runs", "-w", ws)
    assert "arithmetic" in listing and "complete" in listing
    page = invoke("report", "-w", ws).strip().splitlines()[-1]
    html = open(page).read()
    assert "pass@k" in html and html.count("data:image/png;base64") == 3
    summary = json.loads(open(page.replace("report.html", "summary.json")).read())
    assert summary["problems"] == 4 and summary["n"] == 4
    run_id = summary["run_id"]
    target = tmp_path / "samples.jsonl"
    invoke("export", run_id, target, "-w", ws)
    rows = [json.loads(x) for x in target.read_text().splitlines()]
    assert len(rows) == 16 and all("math_answer" in r["verdicts"] for r in rows)
    # a second call with a larger n draws only the new samples
    again = invoke("sample", "--task", "arithmetic", "--arg", "levels=1,2", "--limit", 4, "-n", 6,
                   "--max-tokens", 64, "--slots", 8, "-w", ws)
    assert f"run {run_id}: 8 new samples" in again


def test_bad_input_gets_a_clear_error(tmp_path):
    r = runner.invoke(app, ["sample", "--task", "arithmatic", "-w", str(tmp_path)])
    assert r.exit_code == 2 and "Did you mean 'arithmetic'" in r.output
    r = runner.invoke(app, ["sample", "--temperature", "-1", "-w", str(tmp_path)])
    assert r.exit_code == 2 and "temperature must be" in r.output
    r = runner.invoke(app, ["sample", "--model", str(tmp_path / "missing.gguf"), "-w", str(tmp_path)])
    assert r.exit_code == 2 and "model file not found" in r.output
    r = runner.invoke(app, ["report", "nope", "-w", str(tmp_path)])
    assert r.exit_code == 2 and "no run" in r.output


def _one_line(output):
    """The error is one line (a progress bar may stand above it), and no traceback."""
    return sum("error:" in x for x in output.splitlines()) == 1 and "Traceback" not in output


def test_unreachable_servers_are_one_line_infrastructure_errors(tmp_path):
    """A dead engine server or reward server: one line, exit 3, for every command that can search."""
    dead = "http://127.0.0.1:9/v1"
    for cmd in (["sample"], ["compare", "--n-max", "2", "--seeds", "1", "-s", "majority", "-s", "best_of_n"],
                ["optimal", "--n-max", "2", "-s", "best_of_n", "-s", "majority"]):
        r = runner.invoke(app, [*cmd, "--engine", "openai", "--engine-arg", f"base_url={dead}", "--engine-arg",
                                "max_retries=0", "--limit", "2", "-w", str(tmp_path)], env={"COLUMNS": "300"})
        assert r.exit_code == 3 and "unreachable" in r.output and _one_line(r.output), (cmd, r.output)
    r = runner.invoke(app, ["sample", "--engine", "toy", "--strategy", "best_of_n", "--prm", "served", "--prm-arg",
                            "base_url=http://127.0.0.1:9", "--prm-arg", "retries=1", "--limit", "1", "-n", "2",
                            "-w", str(tmp_path)], env={"COLUMNS": "300"})
    assert r.exit_code == 3 and "unreachable" in r.output and _one_line(r.output), r.output
    r = runner.invoke(app, ["compare", "--engine", "toy", "--prm", "judeg", "-w", str(tmp_path)])
    assert r.exit_code == 2 and "Did you mean 'judge'" in r.output


def test_a_bug_is_never_disguised_as_a_user_error(tmp_path, monkeypatch):
    from testtime import api

    def broken(*a, **k):
        return {}["a key the code forgot"]

    monkeypatch.setattr(api, "sample", broken)
    r = runner.invoke(app, ["sample", "--engine", "toy", "-w", str(tmp_path)])
    assert r.exit_code == 1 and isinstance(r.exception, KeyError)  # a traceback, not "error: ..."


@requires_model
@pytest.mark.model
def test_env_says_what_runs_here():
    info = json.loads(invoke("env", "--json"))
    assert set(info) == {"versions", "llama_cpp", "default_model", "sandbox"}
    assert info["versions"]["llama-cpp-python"] and info["versions"]["testtime"]
    llama = info["llama_cpp"]
    assert "error" not in llama, llama
    assert llama["features_in_use"] and isinstance(llama["use_extra_bufts"], bool)
    assert "CPU" in llama["system_info"]
    assert info["default_model"]["exists"] is True
    assert "error" not in info["sandbox"] and info["sandbox"]["summary"]
    text = invoke("env")
    assert "variant_loaded" in text and "features_in_use" in text


@requires_model
@pytest.mark.model
@pytest.mark.slow
def test_a_beam_search_run_on_the_embedded_model_is_a_run_like_any_other(tmp_path):
    """beam search with the judge PRM, stored as a run: then grade with another
    verifier setting, report, export DPO pairs and cost it, with nothing re-generated."""
    ws = tmp_path / "ws"
    out = invoke("sample", "--task", "arithmetic", "--arg", "levels=1", "--limit", 2, "-n", 4, "--strategy",
                 "beam_search", "--width", 2, "--max-steps", 3, "--step-tokens", 40, "--prm", "judge",
                 "--slots", 8, "-w", ws)
    assert "accuracy (weighted best-of-N)" in out and "coverage (any candidate)" in out
    from testtime.store import Store

    with Store(ws) as store:
        rid = store.latest_run()
        spec = store.run_spec(rid).to_dict()
        rows = store.samples(rid)
        assert spec["strategy"]["name"] == "beam_search" and spec["strategy"]["reward_model"]["reward_model"] == "judge"
        assert len(store.finished_problems(rid)) == 2 and rows
        assert store.scorers(rid) and store.model_shape(rid, "prm") is not None
        texts = [s.text for s in rows]
    page = invoke("report", rid, "-w", ws).strip().splitlines()[-1]
    summary = json.loads(open(page.replace("report.html", "summary.json")).read())
    assert summary["search"]["problems"] == 2 and summary["search"]["tokens_per_problem"] > 0
    assert summary["cost"]["prm"]["flops"]["total"] > 0
    cost = invoke("cost", rid, "-w", ws)
    assert "reward model" in cost and "FLOPs" in cost
    target = tmp_path / "dpo.jsonl"
    invoke("export", rid, target, "--format", "dpo", "-w", ws)  # pairs only where a problem has both kinds
    # the same command again resumes a complete run: nothing is drawn
    again = invoke("sample", "--task", "arithmetic", "--arg", "levels=1", "--limit", 2, "-n", 4, "--strategy",
                   "beam_search", "--width", 2, "--max-steps", 3, "--step-tokens", 40, "--prm", "judge",
                   "--slots", 8, "-w", ws)
    assert "accuracy" in again
    with Store(ws) as store:
        assert [s.text for s in store.samples(rid)] == texts


def test_a_bad_context_size_is_an_error_not_a_crash(tmp_path):
    """Issue 16.12: --seq-ctx -1 printed an error then segfaulted (the model freed twice);
    --seq-ctx 1 aborted on a GGML_ASSERT."""
    for value in ("-1", "0", "1", "63"):
        r = runner.invoke(app, ["sample", "--seq-ctx", value, "--limit", "1", "-n", "1", "-w", str(tmp_path)])
        assert r.exit_code == 2 and "seq_ctx must be an integer >= 64" in r.output, (value, r.output)


@requires_model
@pytest.mark.model
def test_a_context_llama_cpp_cannot_allocate_fails_cleanly(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "testtime.cli", "sample", "--seq-ctx", "50000000", "--limit", "1",
                          "-n", "1", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    # not 139 (a double free), 134 (an abort) or -9 (killed while allocating a KV cache nothing can use)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "exceed the model's training context of 8192 tokens" in " ".join(out.stderr.split())


def test_careless_input_gets_one_line_errors_not_tracebacks(tmp_path, monkeypatch):
    """Issue 16.13 and 16.14, each as a user hit it."""
    from testtime import api
    ws = tmp_path / "ws"

    def run(*args):
        r = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})
        assert "Traceback" not in r.output and not isinstance(r.exception, (TypeError, OSError)), r.output
        return r

    # a single level, and arguments a task or an engine does not take
    assert run("sample", "--engine", "toy", "--arg", "levels=2", "--limit", "2", "-n", "2", "-w", ws).exit_code == 0
    r = run("sample", "--engine", "toy", "--arg", "levles=2", "-w", ws)
    assert r.exit_code == 2 and "task 'arithmetic' takes no argument 'levles'" in r.output and "levels" in r.output
    r = run("sample", "--engine", "openai", "--engine-arg", "base_ur=http://x", "-w", ws)
    assert r.exit_code == 2 and "Did you mean 'base_url'" in r.output
    # a workspace that is a file; a mistyped workspace for commands that only read
    (tmp_path / "afile").write_text("x")
    r = run("sample", "--engine", "toy", "-w", tmp_path / "afile")
    assert r.exit_code == 2 and "is a file" in r.output
    for cmd in (["runs"], ["report"], ["cost"], ["export", "x", tmp_path / "o.jsonl"]):
        r = run(*cmd, "-w", tmp_path / "wss")
        assert r.exit_code == 2 and "no testtime workspace" in r.output, (cmd, r.output)
    assert not (tmp_path / "wss").exists()  # nothing created by a read
    # run ids are prefixes, not patterns
    r = run("report", "%", "-w", ws)
    assert r.exit_code == 2 and "no run matches '%'" in r.output
    # zero where at least one is meant
    assert run("cost", "-n", "0", "-w", ws).exit_code == 2
    assert run("report", "--fit-k", "0", "-w", ws).exit_code == 2
    assert run("serve", "--port", "-1").exit_code == 2
    # a sample that failed before its first sample leaves a run that is not "the latest"
    from testtime.engines.toy import ToyEngine
    from testtime.errors import InfrastructureError

    class DiesAtOnce(ToyEngine):
        def generate(self, requests):
            raise InfrastructureError("the server went away")
            yield

    dead = tmp_path / "dead"
    with pytest.raises(InfrastructureError):
        api.sample("arithmetic", n=1, limit=1, engine=DiesAtOnce(), workspace=dead)
    r = run("report", "-w", dead)
    assert r.exit_code == 2 and "grade it first" not in r.output and "no run with samples" in r.output
    rid = api.runs(dead)[0]["run_id"]
    r = run("report", rid, "-w", dead)
    assert r.exit_code == 2 and "has no samples" in r.output and "run the same command again" in r.output
    # a corrupt database: which file, that it is corrupt, and how to recover
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "testtime.db").write_bytes(b"\x00" * 4096)
    r = run("runs", "-w", bad)
    assert r.exit_code == 2 and "is corrupt" in r.output and ".recover" in r.output
    # a read-only workspace can still be listed (root ignores file modes, so the check is faked here)
    import testtime.store as store_module

    monkeypatch.setattr(store_module.os, "access", lambda path, mode: mode != store_module.os.W_OK)
    r = run("runs", "-w", ws)
    assert r.exit_code == 0 and "arithmetic" in r.output
    r = run("grade", "x", "-w", ws)
    assert r.exit_code == 2 and "read-only" in r.output


def test_sample_says_when_another_process_holds_the_run(tmp_path):
    from testtime.store import Store

    ws = tmp_path / "ws"
    args = ("sample", "--engine", "toy", "--arg", "levels=1", "--limit", 3, "-n", 2, "-w", ws)
    invoke(*args)
    with Store(ws) as s:
        rid = s.latest_run()
        assert s.claim(rid, [p["problem_id"] for p in s.problems(rid)], "elsewhere:4242:abc") == {}
    out = invoke(*args[:-3], 4, "-w", ws)
    assert "3 problems of this run are being sampled by another process (pid 4242 on elsewhere)" in out
    assert "pass@k" not in out and "0 new samples" in out
