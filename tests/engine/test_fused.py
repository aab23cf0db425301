"""One graph per layer (engine.kernels.fused) against the same layer matrix by matrix: the
forward pass with fused layers equals the per-matrix one (exact and int8-only activations,
1 to 16 rows, Gemma 3 and Gemma 4 shapes, every block layout); a graph's rows do not depend
on each other (verifying drafts == decoding them one by one)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.kernels.blocks import quantize
from engine.kernels.fused import FusedLayers, fusable
from engine.kv_cache import KVCache
from engine.model import NBITS_MAX_ROWS, Weights, forward, pack_tensors
from tests.engine.tiny import tiny_config, tiny_tensors

# per matrix, a layout with and one without a min (offsets), 4- and 8-bit, both block sizes
QUANTS = {"wq": "q8_0", "wk": "q5_0", "wv": "q4_1", "wo": "q4_0", "w_gate": "q5_1",
          "w_up": "q8_0", "w_down": "q4_1", "tok_embd": "q8_0"}


def quantized_weights(gemma4: bool = False) -> tuple[object, Weights]:
    cfg = tiny_config(d_model=64, head_dim=32, ff_dim=96, n_heads=2, n_kv_heads=1)
    t = tiny_tensors(cfg, seed=3)
    for name in list(t):
        kind = QUANTS.get(name.rsplit(".", 1)[-1])
        if kind is not None:
            t[name] = quantize(name, t[name], kind)  # type: ignore[assignment]
    if gemma4:  # Gemma 4's per-layer output scale
        for i in range(cfg.n_layers):
            t[f"layers.{i}.layer_scalar"] = np.array([0.5 + 0.25 * i], dtype=np.float32)
    w = Weights.from_packed(cfg, pack_tensors(cfg, t))
    assert w.fused is not None and not w.fused.ready
    return cfg, w


def run(cfg: object, w: Weights, ids: list[int], chunks: list[int]) -> np.ndarray:
    kv = KVCache(cfg, 128)  # type: ignore[arg-type]
    out, s = [], 0
    for n in chunks:
        logits = forward(cfg, w, ids[s:s + n], kv, logits="all")  # type: ignore[arg-type]
        assert logits is not None
        out.append(logits)
        s += n
    return np.concatenate(out)


@pytest.mark.parametrize("gemma4", [False, True])
@pytest.mark.parametrize("exact", [True, False])
def test_fused_layers_equal_the_layer_matrix_by_matrix(gemma4: bool, exact: bool) -> None:
    cfg, w = quantized_weights(gemma4)
    ids = list(np.random.default_rng(0).integers(0, 97, 30))
    chunks = [16, 1, 5, 8]  # prefill, decode, a verify step, another chunk
    ref = run(cfg, w.dequantized(), ids, chunks)  # fp32 activations, the same weight values
    scale = float(np.abs(ref).max())
    w = dataclasses.replace(w, approximate=not exact)
    assert w.fused is not None
    plain = run(cfg, dataclasses.replace(w, fused=None), ids, chunks)
    w.fused.build(2)
    fused = run(cfg, w, ids, chunks)
    # the same MatMulNBits products, norms and sums rounded by onnxruntime instead of numpy
    # (which may move an activation across an int8 rounding step): as close to fp32 as the
    # matrix-by-matrix path, and close to it. Measured (largest logit 1): exact 1.6-3.7e-4
    # from fp32 either way, 1-3e-4 apart; int8 alone 3-8e-2 from fp32, 1.6-3.3e-2 apart.
    err_plain = float(np.abs(plain - ref).max()) / scale
    err_fused = float(np.abs(fused - ref).max()) / scale
    bound = 1e-3 if exact else 0.15
    assert err_plain <= bound and err_fused <= max(1.5 * err_plain, bound / 3), (
        err_plain, err_fused)
    assert float(np.abs(fused - plain).max()) / scale <= bound / (1 if exact else 2)


def test_a_fused_layers_rows_do_not_depend_on_each_other() -> None:
    cfg, w = quantized_weights(gemma4=True)
    assert w.fused is not None
    w.fused.build(2)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    att = rng.standard_normal((16, 64)).astype(np.float32)
    tail = w.fused.tails[1]
    many_x, many_qkv = tail(x, att)
    for i in range(16):
        one_x, one_qkv = tail(x[i:i + 1], att[i:i + 1])
        np.testing.assert_array_equal(one_x, many_x[i:i + 1])
        assert one_qkv is not None and many_qkv is not None
        np.testing.assert_array_equal(one_qkv, many_qkv[i:i + 1])
    assert w.fused.tails[-1](x, att)[1] is None  # the last layer projects nothing after it
    head = w.fused.head
    assert head is not None
    np.testing.assert_array_equal(head(x[3:4]), head(x)[3:4])


def test_long_chunks_and_dense_trunks_take_the_matrix_path() -> None:
    cfg, w = quantized_weights()
    assert w.fused is not None
    w.fused.build(1)
    ids = list(np.random.default_rng(2).integers(0, 97, NBITS_MAX_ROWS + 1))
    # more rows than a fused call takes: the per-matrix path (dequantizing for sgemm) runs,
    # and gives what two fused chunks do
    long = run(cfg, w, ids, [len(ids)])
    split = run(cfg, w, ids, [NBITS_MAX_ROWS, 1])
    np.testing.assert_allclose(long, split, rtol=2e-3, atol=2e-3 * np.abs(long).max())
    # on int8 activations alone (next-edit scoring's candidate tree) every row count is fused,
    # as the matrix path takes MatMulNBits for every row count there: no per-matrix session
    # is built on the way (it would be a second packed copy of the trunk)
    rough = dataclasses.replace(w, approximate=True)
    run(cfg, rough, ids, [len(ids)])
    assert all(getattr(layer, n)._kernel is None for layer in w.layers
               for n in ("wqkv", "wo", "w_gate_up", "w_down"))
    dense = Weights.from_packed(cfg, pack_tensors(cfg, tiny_tensors(cfg)))  # type: ignore
    assert dense.fused is None and not fusable(dense.layers)
    with pytest.raises(AssertionError):
        FusedLayers(dense.layers, 1e-6)
