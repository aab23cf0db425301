"""Quantized weights and their kernels (engine.kernels.blocks, .quantized) against gguf's own
dequantize + a numpy matmul, on random blocks of every supported type; the 1..16-row GEMM
against 16 GEMVs; malformed tensors named in the error."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import GGML_QUANT_SIZES, dequantize

from engine.kernels.blocks import LAYOUTS, from_gguf, quantize
from engine.kernels.quantized import QWeight, stack

TYPES = sorted(LAYOUTS)
# byte offsets of each type's fp16 scale fields (random bytes elsewhere are valid blocks)
_F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2),
               "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF data (rows, row_bytes) of random valid blocks: random bits, sane fp16 scales."""
    rng = np.random.default_rng(seed)
    per_block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    assert cols % per_block == 0
    data = rng.integers(0, 256, (rows, cols // per_block, size), dtype=np.uint8)
    for off in _F16_FIELDS[kind]:
        d = (rng.random((rows, cols // per_block)) * 0.02 + 1e-4).astype(np.float16)
        data[..., off:off + 2] = d.view(np.uint8).reshape(rows, -1, 2)
    return data.reshape(rows, -1)


def activation_bound(x: np.ndarray, w: np.ndarray, block: int) -> np.ndarray:
    """Worst case of int8 activations: each block of x rounded to amax/127 steps (error at most
    half a step per element), times the weights' absolute sum over the block. (n, N)"""
    n, K = x.shape
    step = np.abs(x.reshape(n, K // block, block)).max(-1) / 127.0  # (n, nb)
    wabs = np.abs(w).reshape(w.shape[0], K // block, block).sum(-1)  # (N, nb)
    return 0.5 * step @ wabs.T + 1e-5 * (np.abs(x) @ np.abs(w).T) + 1e-6


@pytest.mark.parametrize("kind", TYPES)
def test_repack_is_exact(kind: str) -> None:
    raw = random_blocks(kind, 37, 512)
    bq = from_gguf("t", kind, raw)
    want = dequantize(raw, GGMLQuantizationType[kind])
    got = bq.dequantize()
    if LAYOUTS[kind][3]:  # scale*q - min: gguf's fp32 rounds once, ours is the exact value
        np.testing.assert_allclose(got, want, rtol=2**-23, atol=0)
    else:
        np.testing.assert_array_equal(got, want)
    rows = np.array([36, 0, 5, 5])
    np.testing.assert_array_equal(QWeight("t", (bq,)).dequantize(rows), got[rows])


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("rows", [1, 37, 203])
def test_linear_matches_dequantize_matmul(kind: str, rows: int) -> None:
    K = 512
    raw = random_blocks(kind, rows, K, seed=rows)
    w = dequantize(raw, GGMLQuantizationType[kind]).astype(np.float64)
    qw = QWeight("t", (from_gguf("t", kind, raw),))
    rng = np.random.default_rng(1)
    for n in range(1, 17):
        x = rng.standard_normal((n, K)).astype(np.float32)
        y = qw(x)
        assert y.shape == (n, rows) and y.dtype == np.float32
        err = np.abs(y - x.astype(np.float64) @ w.T)
        assert np.all(err <= activation_bound(x, w, LAYOUTS[kind][0])), (kind, n)


def test_gemm_of_16_rows_equals_16_gemvs() -> None:
    parts = [from_gguf(k, k, random_blocks(k, 61, 256, seed=i)) for i, k in enumerate(TYPES)]
    qw = stack("mix", parts)
    x = np.random.default_rng(2).standard_normal((16, 256)).astype(np.float32)
    many = qw(x)
    one_by_one = np.concatenate([qw(x[i:i + 1]) for i in range(16)])
    np.testing.assert_allclose(many, one_by_one, rtol=1e-6, atol=1e-6)
    # the stack equals its parts side by side
    sides = np.concatenate([QWeight(p.name, (p,))(x) for p in parts], axis=1)
    np.testing.assert_allclose(many, sides, rtol=1e-5, atol=1e-5)  # merged nodes sum in
    # another order


def test_stacking_merges_same_layout_neighbours() -> None:
    a = from_gguf("a", "Q8_0", random_blocks("Q8_0", 8, 64))
    b = from_gguf("b", "Q5_0", random_blocks("Q5_0", 8, 64))
    qw = stack("ab", [a, b])
    assert len(qw.parts) == 1 and qw.shape == (16, 64)
    np.testing.assert_array_equal(qw.dequantize(), np.concatenate([a.dequantize(),
                                                                   b.dequantize()]))


def test_malformed_tensor_is_a_clear_error_naming_it() -> None:
    raw = random_blocks("Q4_K", 4, 256)
    with pytest.raises(ValueError, match=r"blk\.3\.ffn_down"):
        from_gguf("blk.3.ffn_down.weight", "Q4_K", raw[:, :-7])  # truncated rows
    with pytest.raises(ValueError, match="blk.0.attn_q"):
        from_gguf("blk.0.attn_q.weight", "Q4_K", raw.astype(np.float32))
    bad = random_blocks("Q8_0", 2, 64)
    bad[0, 0:2] = np.array([np.inf], dtype=np.float16).view(np.uint8)  # inf scale
    with pytest.raises(ValueError, match="tok_embd"):
        from_gguf("tok_embd", "Q8_0", bad)
    with pytest.raises(ValueError, match="IQ2_XS"):
        from_gguf("w", "IQ2_XS", raw)


@pytest.mark.parametrize("quant", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_quantize_for_checkpoints_round_trips_through_gguf(quant: str) -> None:
    w = np.random.default_rng(3).standard_normal((24, 96)).astype(np.float32)
    bq = quantize("w", w, quant)
    assert not isinstance(bq, np.ndarray) and bq.ggml_type == quant.upper()
    err = np.abs(bq.dequantize() - w).max()
    # at most one quantization step of the block's range
    assert err <= np.abs(w).max() * {"q8": 1 / 127, "q5": 2 / 31, "q4": 2 / 15}[quant[:2]]
    dense = quantize("w", w, "bf16")
    assert isinstance(dense, np.ndarray) and np.abs(dense - w).max() <= np.abs(w).max() / 128
    with pytest.raises(ValueError, match="q3_x"):
        quantize("w", w, "q3_x")


@pytest.mark.parametrize("kind", TYPES)
def test_long_chunks_dequantize_tile_by_tile_exactly(kind: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """dense_matmul (prefill) equals x @ dequantize(W).T: fp32 activations, tiles of 5 rows
    over 37 rows (the last tile short), stacked parts of two types side by side."""
    from engine.kernels import quantized

    monkeypatch.setattr(quantized, "TILE_ELEMENTS", 5 * 512)
    monkeypatch.setattr(quantized, "_tiles", __import__("threading").local())
    parts = [from_gguf("a", kind, random_blocks(kind, 37, 512, seed=4)),
             from_gguf("b", "Q8_0", random_blocks("Q8_0", 11, 512, seed=5))]
    qw = QWeight("t", tuple(parts))
    x = np.random.default_rng(6).standard_normal((130, 512)).astype(np.float32)
    want = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T
    np.testing.assert_allclose(qw.dense_matmul(x), want, rtol=1e-4, atol=1e-4)


def test_the_residual_makes_the_product_close_and_without_it_half_the_work() -> None:
    raw = random_blocks("Q5_0", 203, 512, seed=7)
    w = dequantize(raw, GGMLQuantizationType.Q5_0).astype(np.float64)
    qw = QWeight("t", (from_gguf("t", "Q5_0", raw),))
    x = np.random.default_rng(8).standard_normal((9, 512)).astype(np.float32)
    want = x.astype(np.float64) @ w.T
    scale = np.abs(want).max()
    exact = float(np.abs(qw(x) - want).max() / scale)
    rough = float(np.abs(qw(x, residual=False) - want).max() / scale)
    assert exact <= 1e-4 < rough <= 2e-2, (exact, rough)  # measured ~2e-5 and ~4e-3
    assert np.all(np.abs(qw(x, residual=False) - want) <= activation_bound(x, w, 32))
