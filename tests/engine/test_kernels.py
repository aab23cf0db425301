"""engine/kernels: each packed kernel equals numpy's product (two paths agree) for 1 to 16
rows, both layouts, an odd width; the model's logits and next-edit scores agree with and
without them; without onnxruntime numpy does the work."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from engine.kernels.prepacked import Kernels, PrepackedMatmul
from engine.kv_cache import KVCache
from engine.model import forward
from engine.scoring import score


@pytest.mark.parametrize("transposed", [True, False])
def test_a_packed_product_equals_numpys_for_1_to_16_rows(transposed: bool) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1037, 64) if transposed else (64, 1037)).astype(np.float32)
    k = PrepackedMatmul(w, "test", transposed=transposed)
    k.build(2)
    for rows in range(1, 17):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        np.testing.assert_allclose(k(x), x @ (w.T if transposed else w), rtol=1e-5, atol=1e-4)


def test_linear_uses_a_kernel_within_its_rows_only() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    ks = Kernels()
    ks.add(w, "w", transposed=True, max_rows=4)
    x = rng.standard_normal((6, 24)).astype(np.float32)
    assert not ks.ready
    np.testing.assert_array_equal(ks.linear(x, w), x @ w.T)  # numpy until built
    ks.build(2)
    assert ks.ready and ks.stats.matrices == 1 and ks.stats.packed_bytes == w.nbytes
    np.testing.assert_allclose(ks.linear(x[:3], w), x[:3] @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ks.linear(x, w), x @ w.T)  # 6 rows: past max_rows
    other = w.copy()  # not registered: numpy
    np.testing.assert_array_equal(ks.linear(x[:3], other), x[:3] @ other.T)
    view = rng.standard_normal((3, 48)).astype(np.float32)[:, ::2]  # not contiguous
    np.testing.assert_allclose(ks.linear(view, w), view @ w.T, rtol=1e-5, atol=1e-5)


def test_without_onnxruntime_numpy_does_the_work(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    w = np.ones((16, 8), dtype=np.float32)
    ks = Kernels()
    ks.add(w, "w", transposed=True, max_rows=8)
    ks.build(2)
    assert not ks.ready and ks.stats.state.startswith("off:") and "onnxruntime" in ks.stats.state
    assert "numpy multiplies everything" in caplog.text
    x = np.ones((5, 8), dtype=np.float32)
    np.testing.assert_array_equal(ks.linear(x, w), x @ w.T)


def test_logits_and_scores_agree_with_and_without_the_kernels(model: Any) -> None:
    # the packed kernels serve dense fp32 matrices: the shipped model's values in fp32
    cfg, w = model.config, model.weights.dequantized()
    assert w.kernels is not None
    w.kernels.build(2)
    assert w.kernels.ready and w.kernels.stats.matrices == 4 * cfg.n_layers + 1
    plain_w = replace(w, kernels=None)
    tok = model.tokenizer
    ids = tok.encode("def add(a, b):\n    return a + b\n", add_bos=True)
    for rows in (2, 5, len(ids)):
        fast = forward(cfg, w, ids[:rows], KVCache(cfg, 64), logits="all")
        plain = forward(cfg, plain_w, ids[:rows], KVCache(cfg, 64), logits="all")
        assert fast is not None and plain is not None
        assert np.abs(fast - plain).max() < 1e-3
        assert (fast.argmax(-1) == plain.argmax(-1)).all()

    prompt = tok.encode("x = 1\n", add_bos=True)
    conts = [tok.encode(c) for c in ("y = x + 1\n", "y = x - 1\n", "print(x)\n")]
    class _Dense:
        config, weights = cfg, w

    class _Plain:
        config, weights = cfg, plain_w

    with_k = score(_Dense(), KVCache(cfg, 64), prompt, conts)  # type: ignore[arg-type]
    without = score(_Plain(), KVCache(cfg, 64), prompt, conts)  # type: ignore[arg-type]
    for a, b in zip(with_k, without, strict=True):
        assert np.abs(a - b).max() < 1e-3
