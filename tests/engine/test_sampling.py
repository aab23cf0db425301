"""Sampling is outside the model: greedy, temperature, top-k, top-p, seeds, logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from engine.sampling import Sampler, SamplingParams, log_softmax, logprob_of, top_logprobs


def _logits() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 3


def test_greedy_picks_argmax_with_its_logprob() -> None:
    x = _logits()
    tid, lp = Sampler(SamplingParams(), 1000)(x)
    assert tid == int(np.argmax(x))
    assert lp == pytest.approx(float(log_softmax(x)[tid]), abs=1e-5)
    assert Sampler(SamplingParams(temperature=1.0, top_k=1), 1000)(x)[0] == tid


def test_seed_repeats_and_differs() -> None:
    x = _logits()
    p = SamplingParams(temperature=1.0, seed=7)
    a = [Sampler(p, 1000)(x)[0] for _ in range(3)]
    s = Sampler(p, 1000)
    b = [s(x)[0] for _ in range(50)]
    assert len(set(a)) == 1 and b[0] == a[0]
    assert len(set(b)) > 5  # temperature 1 over 1000 ids actually samples


def test_top_k_and_top_p_restrict_candidates() -> None:
    x = _logits()
    best5 = set(np.argsort(-x)[:5].tolist())
    s = Sampler(SamplingParams(temperature=2.0, top_k=5, seed=1), 1000)
    assert {s(x)[0] for _ in range(200)} <= best5
    s = Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=1), 1000)
    assert {s(x)[0] for _ in range(20)} == {int(np.argmax(x))}


def test_never_samples_beyond_vocab() -> None:
    x = np.zeros(10, dtype=np.float32)
    x[9] = 100.0  # an embedding row the tokenizer does not have
    assert Sampler(SamplingParams(), 8)(x)[0] < 8


def test_temperature_distribution() -> None:
    x = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    s = Sampler(SamplingParams(temperature=1.0, seed=3), 3)
    counts = np.bincount([s(x)[0] for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_logprob_helpers() -> None:
    x = _logits()
    lp = log_softmax(x)
    assert np.exp(lp).sum() == pytest.approx(1.0, abs=1e-4)
    top = top_logprobs(x, 3)
    assert [t for t, _ in top] == np.argsort(-x)[:3].tolist()
    assert top[0][1] == pytest.approx(logprob_of(x, top[0][0]), abs=1e-5)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}]
)
def test_bad_params_name_the_value(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)  # type: ignore[arg-type]
