import pytest

from testtime.spec import RunSpec, SamplingParams, SpecError, sample_seed


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.0}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ("",)}, "stop"),
    ({"logprobs": 50}, "logprobs"),
])
def test_bad_sampling_params_name_the_parameter_and_value(kwargs, name):
    with pytest.raises(SpecError) as e:
        SamplingParams(**kwargs)
    assert name in str(e.value)
    assert repr(next(iter(kwargs.values())))[:3] in str(e.value)


def test_stop_accepts_a_string_or_list_and_hashes():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert hash(SamplingParams(stop=["a"])) == hash(SamplingParams(stop=("a",)))


def spec(**over):
    base = dict(model={"engine": "toy"}, task={"name": "arithmetic", "seed": 0},
                template={"name": "plain", "sha": "x"}, sampling=SamplingParams(), seed=0)
    base.update(over)
    return RunSpec(**base)


def test_run_id_changes_with_what_changes_outputs():
    ids = {spec().run_id,
           spec(sampling=SamplingParams(temperature=0.9)).run_id,
           spec(model={"engine": "toy", "answer_range": 3}).run_id,
           spec(task={"name": "arithmetic", "seed": 1}).run_id,
           spec(template={"name": "plain", "sha": "y"}).run_id,
           spec(seed=1).run_id}
    assert len(ids) == 6


def test_run_id_round_trips_through_a_dict():
    s = spec(sampling=SamplingParams(stop=["x"], top_k=5))
    assert RunSpec.from_dict(s.to_dict()).run_id == s.run_id


def test_sample_seeds_are_distinct_and_stable():
    seeds = [sample_seed(0, "p1", i) for i in range(1000)]
    assert len(set(seeds)) == 1000
    assert sample_seed(0, "p1", 7) == seeds[7]
    assert sample_seed(0, "p2", 7) != seeds[7]
    assert sample_seed(1, "p1", 7) != seeds[7]
