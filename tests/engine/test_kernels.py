"""engine/kernels: the packed LM-head kernel equals numpy's product (two paths agree), for
every row count and an odd width; the model's logits and next-edit scores agree with and
without it; without onnxruntime numpy does the work."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

from engine.kernels.prepacked import MIN_ROWS, PrepackedMatmul
from engine.kv_cache import KVCache
from engine.model import Weights, forward
from engine.scoring import score


def test_the_packed_product_equals_numpys_for_1_to_16_rows() -> None:
    rng = np.random.default_rng(0)
    b = rng.standard_normal((64, 1037)).astype(np.float32)  # an odd width
    k = PrepackedMatmul(b, "test")
    assert not k.ready and k.build(2) and k.ready and k.packed_bytes == b.nbytes
    for rows in range(1, 17):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        np.testing.assert_allclose(k(x), x @ b, rtol=1e-5, atol=1e-4)
    view = rng.standard_normal((8, 128)).astype(np.float32)[:, ::2]  # not contiguous
    np.testing.assert_allclose(k(view), view @ b, rtol=1e-5, atol=1e-4)


def test_without_onnxruntime_numpy_does_the_work(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    b = np.ones((8, 16), dtype=np.float32)
    k = PrepackedMatmul(b, "LM head")
    assert not k.build(2) and not k.ready and "onnxruntime" in str(k.error)
    assert "numpy multiplies it" in caplog.text
    x = np.ones((MIN_ROWS + 3, 8), dtype=np.float32)
    np.testing.assert_array_equal(k(x), x @ b)


def _without_head(w: Weights) -> Weights:
    from dataclasses import replace

    return replace(w, head=None)


def test_logits_and_scores_agree_with_and_without_the_kernel(model: Any) -> None:
    cfg, w = model.config, model.weights
    assert w.head is not None
    model.build_kernels(2)
    assert w.head.ready and model.kernel_status()["packed_bytes"] == w.tok_embd_t.nbytes
    tok = model.tokenizer
    ids = tok.encode("def add(a, b):\n    return a + b\n", add_bos=True)
    fast = forward(cfg, w, ids, KVCache(cfg, 64), logits="all")
    plain = forward(cfg, _without_head(w), ids, KVCache(cfg, 64), logits="all")
    assert fast is not None and plain is not None
    assert np.abs(fast - plain).max() < 1e-3
    assert (fast.argmax(-1) == plain.argmax(-1)).all()

    prompt = tok.encode("x = 1\n", add_bos=True)
    conts = [tok.encode(c) for c in ("y = x + 1\n", "y = x - 1\n", "print(x)\n")]
    with_k = score(model, KVCache(cfg, 64), prompt, conts)

    class _Plain:
        config, weights = cfg, _without_head(w)

    without = score(_Plain(), KVCache(cfg, 64), prompt, conts)  # type: ignore[arg-type]
    for a, b in zip(with_k, without, strict=True):
        assert np.abs(a - b).max() < 1e-3
