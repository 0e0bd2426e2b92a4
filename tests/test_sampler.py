import numpy as np
import pytest

from testtime.engines.sampler import _nucleus, sample_row, sample_rows, top_logprobs, uniform
from testtime.spec import SamplingParams


def softmax(x, t=1.0):
    z = (x - x.max()) / t
    p = np.exp(z)
    return p / p.sum()


def frequencies(logits, params, draws=20000):
    toks = sample_rows(np.repeat(logits[None, :], draws, axis=0), params, np.arange(draws), np.zeros(draws))
    return np.bincount(toks, minlength=len(logits)) / draws


def test_uniform_is_stateless_and_spread():
    assert uniform(5, 3) == uniform(5, 3)
    u = np.array([uniform(s, 0) for s in range(20000)])
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    assert len({uniform(1, t) for t in range(1000)}) == 1000


def test_greedy_takes_the_argmax():
    x = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert sample_row(x, SamplingParams(temperature=0), seed=1, step=0) == 1


def test_temperature_sampling_matches_the_softmax():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, 300).astype(np.float32)
    for t in (0.5, 1.0):
        freq = frequencies(x, SamplingParams(temperature=t, top_k=0, top_p=1.0, min_p=0.0))
        p = softmax(x.astype(np.float64), t)
        assert np.abs(freq - p).max() < 0.015
        assert 0.5 * np.abs(freq - p).sum() < 0.03  # total variation


def test_block_boundaries_of_the_two_level_draw():
    # a vocabulary that is not a multiple of the block size, mass at the block edges
    x = np.full(1000, -50.0, np.float32)
    x[[0, 255, 256, 511, 999]] = [0.0, 1.0, 0.5, 0.2, 1.5]
    freq = frequencies(x, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0))
    p = softmax(x.astype(np.float64))
    assert np.abs(freq - p).max() < 0.015
    assert freq[[1, 2, 300, 998]].sum() == 0


def test_top_k_min_p_and_top_p_restrict_the_support():
    x = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05])).astype(np.float32)
    assert set(np.flatnonzero(frequencies(x, SamplingParams(temperature=1, top_k=2, top_p=1.0, min_p=0.0)))) == {0, 1}
    assert set(np.flatnonzero(frequencies(x, SamplingParams(temperature=1, min_p=0.3, top_k=0, top_p=1.0)))) == {0, 1, 2}
    # nucleus 0.8: 0.4 + 0.3 = 0.7 < 0.8, so the third token is needed too
    f = frequencies(x, SamplingParams(temperature=1, top_p=0.8, top_k=0, min_p=0.0))
    assert set(np.flatnonzero(f)) == {0, 1, 2}
    assert f[0] == pytest.approx(0.4 / 0.85, abs=0.015)


def test_nucleus_matches_a_full_sort_on_random_rows():
    rng = np.random.default_rng(3)
    for _ in range(100):
        x = rng.normal(0, rng.uniform(0.2, 6), size=(2, 3000)).astype(np.float32)
        top_p = rng.uniform(0.05, 0.999)
        z = x - x.max(1, keepdims=True)
        p = np.exp(z)
        keep = _nucleus(z, p, top_p)
        for r in range(2):
            order = np.lexsort((np.arange(3000), -z[r]))
            k = int(np.searchsorted(np.cumsum(p[r, order], dtype=np.float64), top_p * p[r].sum(dtype=np.float64))) + 1
            expected = np.zeros(3000, bool)
            expected[order[:k]] = True
            assert (keep[r] == expected).all()


def test_same_seed_same_token_regardless_of_batch_neighbours():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (4, 500)).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_p=0.9)
    together = sample_rows(x, p, [10, 11, 12, 13], [5, 5, 5, 5])
    alone = [sample_row(x[i], p, 10 + i, 5) for i in range(4)]
    assert list(together) == alone


def test_top_logprobs_are_sorted_log_probabilities():
    x = np.array([2.0, 1.0, 0.0, -1.0], np.float32)
    lp, top = top_logprobs(x, 1, 3)
    ref = np.log(softmax(x.astype(np.float64)))
    assert lp == pytest.approx(ref[1])
    assert [t for t, _ in top] == [0, 1, 2]
    assert [v for _, v in top] == pytest.approx(list(ref[:3]))


@pytest.mark.parametrize("top_k,top_p,min_p", [(40, 0.95, 0.05), (5, 1.0, 0.0), (40, 0.5, 0.0), (1, 0.9, 0.3),
                                               (200, 0.95, 0.2)])
def test_the_top_k_path_draws_what_the_general_path_draws(monkeypatch, top_k, top_p, min_p):
    from testtime.engines import sampler

    rng = np.random.default_rng(top_k)
    logits = (rng.standard_normal((24, 4099)) * 3).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
    seeds, steps = list(range(100, 124)), list(range(24))
    fast = sample_rows(logits, params, seeds, steps)
    monkeypatch.setattr(sampler, "_top_k_candidates", lambda z, k: None)  # force the general path
    general = sample_rows(logits, params, seeds, steps)
    assert (fast == general).all()
    many = [sample_rows(logits[:1], params, [s], [0])[0] for s in range(300)]
    assert len(set(many)) <= top_k


def test_ties_at_the_kth_value_take_the_general_path():
    from testtime.engines import sampler

    row = np.zeros((1, 100), np.float32)
    row[0, :3] = 5.0  # three tokens tied for the best: top_k=2 keeps all three
    assert sampler._top_k_candidates(row, 2) is None
    drawn = {int(sample_rows(row, SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0), [s], [0])[0])
             for s in range(200)}
    assert drawn == {0, 1, 2}
