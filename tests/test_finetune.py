"""The fine-tuned verifier (issue 14): the embedded model, fine-tuned with a value head
on the maze's Monte Carlo labels, learns which steps are bad from their text alone; the
split rules hold; its file round-trips to the same scores and refuses damage and another
model; it scores through the reward-model protocol and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from doubles import labelled_maze_runs
from testtime.errors import InputError
from testtime.finetune import FinetuneConfig, is_finetuned
from testtime.learned import Verifier, problem_key


def test_the_two_file_formats_are_told_apart(tmp_path):
    npz = Verifier(np.zeros(2), np.ones(2), np.ones(2), 0.0, 0.5, {"delimiter": "\n"}).save(tmp_path / "v.npz")
    assert not is_finetuned(npz)
    st = tmp_path / "v.safetensors"
    header = json.dumps({"__metadata__": {"testtime": "{}"}}).encode()
    st.write_bytes(len(header).to_bytes(8, "little") + header)
    assert is_finetuned(st)
    (tmp_path / "junk").write_bytes(b"hello")
    assert not is_finetuned(tmp_path / "junk") and not is_finetuned(tmp_path / "missing")


def test_bad_settings_are_refused_before_any_work(tmp_path):
    from testtime import api

    with pytest.raises(InputError, match="kind"):
        api.train_verifier(["r"], tmp_path / "v", kind="lora", workspace=tmp_path)
    with pytest.raises(InputError, match="fine-tuned verifier reads"):
        api.train_verifier(["r"], tmp_path / "v", layers=[3], kind="finetune", workspace=tmp_path)
    with pytest.raises(InputError, match="kind='finetune'"):
        api.train_verifier(["r"], tmp_path / "v", finetune={"epochs": 2}, workspace=tmp_path)
    for bad in ({"epochs": 0}, {"lr": 0}, {"dev": 1.0}, {"batch": 0}, {"lora": -1}):
        with pytest.raises(InputError):
            FinetuneConfig(**bad).check()


@pytest.mark.model
@pytest.mark.slow
def test_fine_tuned_on_the_maze_it_learns_bad_steps_from_their_text(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from testtime import api
    from testtime.finetune import FineTuned
    from testtime.rewards import load_reward_model
    from testtime.rewards.base import Scoring

    ws = tmp_path / "ws"
    problems, rid, other = labelled_maze_runs(ws, 16, 12, 4, 4)
    path = tmp_path / "v.safetensors"
    lines = []
    v = api.train_verifier([rid], path, holdout=0.25, exclude=[other], kind="finetune",
                           finetune={"epochs": 2, "dev": 0.25, "lr": 5e-5, "batch": 4}, workspace=ws,
                           log=lines.append)
    m = v.meta
    trained, held, dev = v.problems, set(m["heldout_problems"]), set(m["dev_problems"])
    excluded = {problem_key(p.question) for p in problems[12:]}
    assert not trained & held and not trained & excluded and len(held) == 3 and dev <= trained and len(dev) == 2
    assert trained | held | excluded == {problem_key(p.question) for p in problems}
    assert len(lines) == 2 and len(m["epochs"]) == 2 and m["chosen_epoch"] in (1, 2)
    assert m["features"]["features"] == "finetuned_value_head" and m["kind"] == "finetune"
    assert is_finetuned(path)

    # the problems it never trained on: a bad step scores below a good one
    r = api.eval_verifier(path, rid, workspace=ws)
    assert r["seen_problems_left_out"] == len(trained) and r["problems"] == 3 + 4  # held out, and excluded
    assert r["auc"] > 0.9, r

    prm = load_reward_model("trained", path=str(path))
    assert prm.identity()["features"]["features"] == "finetuned_value_head"
    items = [Scoring("maze 14", ["step 0: good", "step 1: good", "step 2: good", "The answer is 1."], 0),
             Scoring("maze 14", ["step 0: good", "step 1: bad", "step 2: good", "The answer is 0."], 1),
             Scoring("maze 14", [], 0)]
    got = prm.score(items)
    assert len(got[0]) == 4 and len(got[1]) == 3 and got[2] == []  # `known` steps are not scored again
    assert got[1][0] < got[0][1] and got[1][-1] < got[0][-1]
    assert prm.usage.prefill > 0
    prm.close()

    # the file gives the same scores when loaded again; damage and another model are refused
    again = FineTuned.load(path)
    same = again.scores([(s.question, s.steps) for s in items[:2]], "\n\n")
    assert np.allclose(same[0], got[0], atol=1e-5) and np.allclose(same[1][1:], got[1], atol=1e-5)
    again.close()
    with pytest.raises(InputError, match="another model"):
        FineTuned.load(path, model="gemma3-270m")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[: 1 << 20])
    with pytest.raises(InputError, match="not a fine-tuned verifier"):
        FineTuned.load(damaged)
    with pytest.raises(InputError, match="exists"):
        api.train_verifier([rid], path, kind="finetune", workspace=ws)


@pytest.mark.model
@pytest.mark.slow
def test_lora_adapters_learn_bad_steps_and_their_file_is_small(tmp_path):
    """With lora=r only rank-r adapters learn; the file holds them (not differences of
    the whole body) and they come back exactly when it is loaded."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import torch

    from testtime import api
    from testtime.finetune import FineTuned

    ws = tmp_path / "ws"
    _, rid, other = labelled_maze_runs(ws, 16, 12, 4, 4)
    path = tmp_path / "v.safetensors"
    v = api.train_verifier([rid], path, holdout=0.25, exclude=[other], kind="finetune",
                           finetune={"epochs": 2, "dev": 0.25, "lr": 1e-3, "batch": 4, "lora": 8}, workspace=ws)
    assert v.meta["config"]["lora"] == 8 and v.value.lora == 8
    names = list(v.value.trainable())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert path.stat().st_size < 20 << 20  # a full fine-tune's differences: about 200 MB
    r = api.eval_verifier(path, rid, workspace=ws)
    assert r["auc"] > 0.9, r

    trained = {n: p.detach().clone() for n, p in v.value.trainable().items()}
    again = FineTuned.load(path)  # the adapters come back exactly; the base weights from the GGUF file
    loaded = again.value.trainable()
    assert again.value.lora == 8 and set(loaded) == set(trained)
    assert all(torch.equal(loaded[n], trained[n]) for n in trained)
    assert torch.equal(again.value.head.weight, v.value.head.weight)
    got = again.scores([("maze 14", ["step 0: good", "step 1: good", "step 2: good", "The answer is 1."]),
                        ("maze 14", ["step 0: good", "step 1: bad", "step 2: good", "The answer is 0."])], "\n\n")
    again.close()
    assert got[1][1] < got[0][1]  # the bad step scores below the good one in its place


def test_a_verifier_is_known_by_its_weights_not_its_header(tmp_path):
    """Two trainings that end in the same weights share their stored scores: the reward
    model's identity hashes the weights and features, not the timings or provenance."""
    from testtime.rewards.trained import weights_digest

    feats = {"model": {"model": "m.gguf", "fingerprint": "ab" * 8}, "layers": None}
    npz = lambda name, meta, coef: Verifier(np.zeros(3), np.ones(3), coef, 0.5, 0.5,  # noqa: E731
                                            {"features": feats, **meta}).save(tmp_path / name)
    a = npz("a.npz", {"seconds": 12.0, "train_problems": ["x"]}, np.arange(3.0))
    b = npz("b.npz", {"seconds": 99.5, "train_problems": ["y"], "excluded_problems": 4}, np.arange(3.0))
    c = npz("c.npz", {"seconds": 12.0, "train_problems": ["x"]}, np.arange(3.0) + 1e-9)
    assert weights_digest(a) == weights_digest(b) != weights_digest(c)
    other = dict(feats, layers=[7])
    d = Verifier(np.zeros(3), np.ones(3), np.arange(3.0), 0.5, 0.5, {"features": other}).save(tmp_path / "d.npz")
    assert weights_digest(d) != weights_digest(a)  # the same weights reading other features

    def safetensors(name, meta, data):
        header = {"__metadata__": {"testtime": json.dumps({"features": feats, **meta})},
                  "delta.w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}
        raw = json.dumps(header).encode()
        path = tmp_path / name
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
        return path

    e = safetensors("e.safetensors", {"seconds": 994.9}, b"\x01\x02\x03\x04")
    f = safetensors("f.safetensors", {"seconds": 949.0, "dropped_problems": 0}, b"\x01\x02\x03\x04")
    g = safetensors("g.safetensors", {"seconds": 994.9}, b"\x01\x02\x03\x05")
    assert is_finetuned(e) and weights_digest(e) == weights_digest(f) != weights_digest(g)
    assert weights_digest(e) != weights_digest(a)


def test_a_verifier_file_tells_what_it_was_trained_on_without_loading_a_model(tmp_path):
    """`verifier_header` reads meta and threshold from either file kind's header alone:
    it works where no model file exists at all, and refuses a file that is not one."""
    from safetensors.numpy import save_file

    from testtime.learned import verifier_header

    meta = {"features": {"model": {"model": "nowhere.gguf"}}, "train_problems": ["k1", "k2"], "kind": "finetune"}
    st = tmp_path / "v.safetensors"
    save_file({"head.weight": np.ones((1, 4), np.float32)}, str(st),
              metadata={"testtime": json.dumps({"format": "testtime-finetuned-verifier/1", **meta,
                                                "threshold": 0.25})})
    assert verifier_header(st) == (meta, 0.25)
    npz = Verifier(np.zeros(2), np.ones(2), np.ones(2), 0.0, 0.5, {"train_problems": ["k3"]}).save(tmp_path / "v.npz")
    assert verifier_header(npz) == ({"train_problems": ["k3"]}, 0.5)
    wrong = tmp_path / "w.safetensors"
    save_file({"x": np.ones(2, np.float32)}, str(wrong), metadata={"testtime": json.dumps({"format": "other/9"})})
    with pytest.raises(InputError, match="format 'other/9'"):
        verifier_header(wrong)
    with pytest.raises(InputError, match="no trained verifier"):
        verifier_header(tmp_path / "missing.safetensors")
