"""Difficulty bins and compute-optimal policy selection on synthetic data where the answer is known."""

import json
import math

import numpy as np
import pytest

from testtime.difficulty import DifficultyBins, fit_difficulty
from testtime.policy import (AccuracyTable, Choice, Policy, budget_to_reach, config_name, evaluate_policy,
                             parse_config, select_policy)


# -- difficulty ---------------------------------------------------------------

def test_quintiles_of_distinct_pass_rates_are_equal_fifths_easiest_first():
    values = {f"p{i}": i / 100 for i in range(100)}
    bins = fit_difficulty(values)
    got = bins.assign(values)
    assert bins.counts == {1: 20, 2: 20, 3: 20, 4: 20, 5: 20}
    assert {got[f"p{i}"] for i in range(80, 100)} == {1}  # highest pass@1: easiest
    assert {got[f"p{i}"] for i in range(0, 20)} == {5}
    assert got["p79"] == 2 and got["p20"] == 4


def test_tied_problems_share_a_bin_even_when_it_leaves_one_empty():
    # half the problems are never solved: they must all be in the hardest bin
    values = {f"z{i}": 0.0 for i in range(50)} | {f"s{i}": (i + 1) / 50 for i in range(50)}
    bins = fit_difficulty(values)
    got = bins.assign(values)
    assert {got[f"z{i}"] for i in range(50)} == {5}
    assert sum(bins.counts.values()) == 100
    assert bins.counts[5] == 50 and bins.counts[4] == 0


def test_new_problems_use_the_fitted_edges():
    bins = fit_difficulty({f"p{i}": float(i) for i in range(10)}, kind="predicted")
    assert bins.kind == "predicted"
    assert bins.bin_of(1000.0) == 1 and bins.bin_of(-5.0) == 5
    again = DifficultyBins.from_dict(json.loads(json.dumps(bins.to_dict())))
    assert again == bins


def test_difficulty_rejects_bad_input():
    with pytest.raises(ValueError, match="no problems"):
        fit_difficulty({})
    with pytest.raises(ValueError, match=r"\['b'\]"):
        fit_difficulty({"a": 0.5, "b": math.nan})
    with pytest.raises(ValueError, match="kind"):
        fit_difficulty({"a": 1.0}, kind="vibes")
    with pytest.raises(ValueError, match="descending"):
        DifficultyBins("oracle", [0.1, 0.5])


# -- policy selection ---------------------------------------------------------

def _synthetic():
    """Easy problems: majority wins at every budget. Hard problems: beam search wins
    from N=4 on, but is unavailable below 4. Accuracies are deterministic."""
    easy = [f"e{i}" for i in range(10)]
    hard = [f"h{i}" for i in range(10)]
    acc = {"best_of_n": {}, "majority": {}, "beam_search(width=4)": {}}
    for n in (1, 2, 4, 8, 16):
        acc["best_of_n"][n] = {p: 0.50 + 0.01 * n for p in easy} | {p: 0.02 * n for p in hard}
        acc["majority"][n] = {p: 0.60 + 0.01 * n for p in easy} | {p: 0.01 * n for p in hard}
        if n >= 4:
            acc["beam_search(width=4)"][n] = {p: 0.40 for p in easy} | {p: 0.05 * n for p in hard}
    return AccuracyTable(acc), easy, hard


def test_policy_picks_the_known_winner_per_bin_and_budget():
    table, easy, hard = _synthetic()
    bins = {p: 1 for p in easy} | {p: 5 for p in hard}
    policy = select_policy(table, bins, [1, 2, 4, 8, 16])
    for b in (1, 2, 4, 8, 16):
        assert policy.choose(b, 1).config == "majority" and policy.choose(b, 1).n == b
    assert policy.choose(2, 5).config == "best_of_n"  # beam search needs N >= 4
    assert policy.choose(4, 5).config == "beam_search(width=4)"
    assert policy.choose(16, 5).config == "beam_search(width=4)" and policy.choose(16, 5).n == 16
    assert policy.choose(16, 5).train_accuracy == pytest.approx(0.8)
    # an unseen bin falls back to the best choice over every training problem
    assert policy.choose(16, 3) == policy.fallback[16]
    # the policy beats every single strategy on the same problems
    test_acc = evaluate_policy(policy, table, bins, [16])[16]
    singles = [table.mean(c, 16, easy + hard) for c in table.configs]
    assert test_acc == pytest.approx((0.76 + 0.8) / 2)
    assert test_acc > max(singles)


def test_equal_accuracy_goes_to_the_smaller_budget_then_the_earlier_candidate():
    acc = {"a": {1: {"p": 0.5}, 4: {"p": 0.5}}, "b": {1: {"p": 0.5}, 4: {"p": 0.5}}}
    policy = select_policy(AccuracyTable(acc), {"p": 1}, [4])
    assert (policy.choose(4, 1).config, policy.choose(4, 1).n) == ("a", 1)


def test_budget_between_measured_ones_uses_the_largest_below():
    table, easy, hard = _synthetic()
    policy = select_policy(table, {p: 1 for p in easy}, [4, 16])
    assert policy.choose(10, 1).n == 4
    with pytest.raises(ValueError, match="no budget <= 2"):
        policy.choose(2, 1)


def test_policy_file_round_trip_and_bad_files(tmp_path):
    table, easy, hard = _synthetic()
    values = {p: 0.9 for p in easy} | {p: 0.1 for p in hard}
    diff = fit_difficulty(values)
    policy = select_policy(table, diff.assign(values), [1, 4, 16])
    policy.difficulty = diff
    policy.meta = {"task": "synthetic"}
    path = policy.save(tmp_path / "p.json")
    again = Policy.load(path)
    assert again.to_dict() == policy.to_dict()
    assert again.choose(16, 5).params == {"width": 4}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        Policy.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="version"):
        Policy.load(tmp_path / "old.json")
    broken = policy.to_dict()
    first = next(iter(broken["choices"]["4"]))
    broken["choices"]["4"][first]["config"] = "beam search!"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="malformed"):
        Policy.load(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="cannot read"):
        Policy.load(tmp_path / "missing.json")


def test_config_names_round_trip():
    assert config_name("beam_search", {"width": 4, "lookahead": 1}) == "beam_search(lookahead=1,width=4)"
    assert parse_config("beam_search(lookahead=1,width=4)") == ("beam_search", {"lookahead": 1, "width": 4})
    assert parse_config("revision(sequential=2)") == ("revision", {"sequential": 2})
    assert parse_config("majority") == ("majority", {})
    with pytest.raises(ValueError):
        parse_config("beam(width)")


def test_budget_to_reach_interpolates_in_log2_n():
    curve = {1: 0.1, 2: 0.2, 4: 0.3, 8: 0.4}
    assert budget_to_reach(curve, 0.3) == pytest.approx(4.0)
    assert budget_to_reach(curve, 0.35) == pytest.approx(2 ** 2.5)
    assert budget_to_reach(curve, 0.05) == 1.0
    assert budget_to_reach(curve, 0.5) is None
    # the same accuracy summed in another order reaches itself (the policy tying best-of-N)
    assert budget_to_reach({8: 0.05, 16: sum([0.1] * 3) / 3, 32: 0.0}, (0.1 + 0.1 + 0.1) / 3 + 1e-17) == 16.0
    assert budget_to_reach({8: 0.05, 16: 0.0888888888888}, 0.0888888888889) == 16.0


def test_accuracy_table_from_cells_averages_seeds():
    from testtime.compare import Cell

    cells = [Cell("best_of_n", 2, 0, {"p": 1.0, "q": 0.0}, {"p": 10.0, "q": 10.0}),
             Cell("best_of_n", 2, 1, {"p": 0.0, "q": 0.0}, {"p": 30.0, "q": 10.0})]
    t = AccuracyTable.from_cells(cells)
    assert t.acc["best_of_n"][2] == {"p": 0.5, "q": 0.0}
    assert t.tokens["best_of_n"][2]["p"] == 20.0
    assert t.mean("best_of_n", 2, ["p", "q"]) == 0.25
    assert t.mean("best_of_n", 4, ["p"]) is None and t.mean("best_of_n", 2, ["r"]) is None
