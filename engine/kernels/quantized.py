"""Matmuls on block-quantized weights: `QWeight` (one matrix, or several stacked on the output
axis, in engine.kernels.blocks' exact layout) by onnxruntime's MatMulNBits for a few rows, by
tile-by-tile dequantizing and BLAS sgemm for long chunks.

Why MatMulNBits (onnxruntime, com.microsoft): its MLAS kernels read 4- and 8-bit weights with
per-block scales and integer zero points, ship as wheels for Linux, macOS and Windows (no
compiler on the user's machine), and were the fastest option measured here (2 threads, per
call; issue 11 has the numba figures):

| matrix | fp32 numpy 1 / 2 / 16 rows | MatMulNBits 8-bit 1 / 2 / 16 rows |
|---|---|---|
| LM head 262144 x 640 | 28 / 99 / 116 ms | 8.4 / 9.2 / 28 ms |
| w_gate_up 4096 x 640 | 0.09 / 1.4 / 1.7 ms | 0.06 / 0.08 / 0.5 ms |
| w_down 640 x 2048 | 0.05 / 0.57 / 0.79 ms | 0.05 / 0.08 / 0.38 ms |

Activations: MLAS multiplies int8 activations (`accuracy_level` 4: per block of the weight's
block size, scale amax/127, as llama.cpp does); its fp32-activation path has no fast 8-bit
kernel (it dequantizes the whole matrix per call). One int8 pass moved the shipped model's
logprobs by up to 1.1 nats (8 of 294 top-1 flips against fp32). So the graph also multiplies
the activations' rounding residual `x - Q(x)`, stacked under x in the same call (the weights
are read once): W.Q(x) + W.Q(x - Q(x)) is within ~3e-5 relative of W.x; the residual is
computed inside the graph (a dozen small nodes cost less than numpy's per-call overhead).
MatMulNBits is row-exact: a row's result does not depend on the other rows of the call.

Long chunks (prefill: more than engine.model.NBITS_MAX_ROWS rows) go through `dense_matmul`:
each matrix dequantized a 16 MB tile at a time into a reused buffer and multiplied by sgemm,
fp32 activations (exact). At 512 rows that is ~1.8x faster than MatMulNBits with the residual
(w_gate_up: 6.9 ms dequantizing + 29 ms sgemm vs 44 ms; w_down 2.8 + 7.8 vs 33 ms).

The min of Q4_1/Q5_1/Q4_K/Q5_K is not folded into a float zero point (MatMulNBits would apply
it as `(q - zp) * scale`, rounding it): `blocksum(x) @ offsets.T` is a separate fp32 term.

Each matrix is one session of the engine's threads (one thread below ONE_THREAD_BELOW
weights), spinning off (the numpy side needs the cores between calls). onnxruntime prepacks
the weights into its own layout when the session is built; the engine's memory-mapped copy is
read again only by `dense_matmul` (prefill) and `dequantize` (embedding rows).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.kernels.blocks import BlockQuant
from engine.kernels.onnx_graph import Graph

BACKEND = "onnxruntime MatMulNBits (int8 activations + residual)"
ACCURACY_LEVEL = 4  # int8 activations: the only fast 8-bit path in MLAS
# one thread is faster below this many weights: 270M's matrices, one row with its residual,
# per call: w_gate_up 4096 x 640 144 vs 147 us, wqkv 1536 x 640 78 vs 114, wo 54 vs 105 us
ONE_THREAD_BELOW = 1 << 23
_threads = 1  # intra-op threads of kernels built on first use (set_threads)


def set_threads(n: int) -> None:
    """Threads of every kernel built from now on (the engine's thread count)."""
    global _threads
    _threads = max(1, n)


def threads() -> int:
    return _threads


@dataclass(eq=False)
class QWeight:
    """Block-quantized matrices stacked on the output axis: `(sum N_i, K)`."""

    name: str
    parts: tuple[BlockQuant, ...]
    _kernel: _NBitsKernel | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.parts or len({p.shape[1] for p in self.parts}) != 1:
            raise ValueError(f"tensor {self.name}: stacked parts must share their input size")

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[0] for p in self.parts), self.parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(t for p in self.parts for t in p.ggml_type.split("+"))

    def build(self, threads: int) -> None:
        """Build the kernel (once; raises ValueError naming the tensor if onnxruntime
        refuses it). A matrix under ONE_THREAD_BELOW weights runs on one thread: waking a
        second costs more than it saves there."""
        N, K = self.shape
        with self._lock:
            if self._kernel is None:
                self._kernel = _NBitsKernel(self, 1 if N * K < ONE_THREAD_BELOW else threads)

    def __call__(self, x: np.ndarray, residual: bool = True) -> np.ndarray:
        """x (n, K) fp32 @ W.T -> (n, N) fp32 by MatMulNBits, on int8 activations and their
        rounding residual (~3e-5 relative); `residual=False`: int8 activations alone
        (~1e-2 relative, half the work: for scoring many rows)."""
        if self._kernel is None:
            self.build(_threads)
        assert self._kernel is not None
        return self._kernel(x, residual)

    def dense_matmul(self, x: np.ndarray) -> np.ndarray:
        """x (n, K) fp32 @ W.T -> (n, N) with fp32 activations: W dequantized a tile of rows
        at a time into a reused buffer, each tile multiplied by BLAS sgemm. For long chunks
        (prefill): the dequantizing is paid once per call, not per row."""
        n, K = x.shape
        y = np.empty((n, self.shape[0]), dtype=np.float32)  # (n, N)
        buf = _tile_buffer(K)
        rows_per_tile = buf.shape[0]
        col = 0
        for p in self.parts:
            for r0 in range(0, p.shape[0], rows_per_tile):
                r1 = min(p.shape[0], r0 + rows_per_tile)
                w = p.dequantize_into(buf[: r1 - r0], slice(r0, r1))  # (r, K) fp32
                y[:, col + r0 : col + r1] = x @ w.T  # (n, r)
            col += p.shape[0]
        return y

    def dequantize(self, rows: np.ndarray | None = None) -> np.ndarray:
        """fp32 values, (N, K), or only `rows` of a single-part matrix (an embedding)."""
        if rows is not None:
            assert len(self.parts) == 1, self.name
            return self.parts[0].dequantize(rows)
        return np.concatenate([p.dequantize() for p in self.parts])


TILE_ELEMENTS = 1 << 22  # a dequantized tile: 16 MB of fp32
_tiles = threading.local()


def _tile_buffer(K: int) -> np.ndarray:
    """This thread's dequantizing buffer, (TILE_ELEMENTS // K, K) fp32, allocated once per K."""
    bufs: dict[int, np.ndarray] = _tiles.__dict__.setdefault("by_k", {})
    if K not in bufs:
        bufs[K] = np.empty((max(1, TILE_ELEMENTS // K), K), dtype=np.float32)
    return bufs[K]


def stack(name: str, parts: Sequence[BlockQuant]) -> QWeight:
    """Stack matrices on the output axis, merging neighbours of the same layout into one
    (one MatMulNBits node; zero points are per block, so Q8_0 and Q5_0 rows mix)."""
    merged: list[BlockQuant] = []
    for p in parts:
        last = merged[-1] if merged else None
        if (last is not None and last.bits == p.bits and last.block == p.block
                and (last.offsets is None) == (p.offsets is None)):
            merged[-1] = BlockQuant(
                name, "+".join(dict.fromkeys(last.ggml_type.split("+") + [p.ggml_type])),
                (last.shape[0] + p.shape[0], p.shape[1]), p.block, p.bits,
                np.concatenate([last.q, p.q]), np.concatenate([last.scales, p.scales]),
                np.concatenate([last.zp, p.zp]),
                None if p.offsets is None or last.offsets is None
                else np.concatenate([last.offsets, p.offsets]))
        else:
            merged.append(p)
    return QWeight(name, tuple(merged))


def _packed_zero_points(p: BlockQuant) -> np.ndarray | None:
    """MatMulNBits zero points: None when every one is the default 2**(bits-1)."""
    if np.all(p.zp == 1 << (p.bits - 1)):
        return None
    if p.bits == 8:
        return p.zp.reshape(-1)
    N, nb = p.zp.shape
    z = np.zeros((N, (nb + 1) // 2 * 2), dtype=np.uint8)
    z[:, :nb] = p.zp
    return (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1)


def nbits_linear(g: Graph, x: str, w: QWeight, tag: str, rk: str) -> str:
    """Write `x (n, K) @ w.T -> (n, N)` into `g`; returns the output's name.

    `rk` (int64, (1,)) is how many rows of x get their rounding residual multiplied too: n
    (W.Q(x) + W.Q(x - Q(x)), ~3e-5 relative of W.x) or 0 (int8 activations alone). Per block
    size of the parts the residual R is stacked under x; per part one MatMulNBits over both
    (the weights are read once), its two halves summed, plus with a min its offset term
    blocksum(x) @ offsets.T in fp32; the parts side by side."""
    K = w.shape[1]
    s = g.add("Slice", [x, g.const("zero", np.array([0], dtype=np.int64)), rk,
                        g.const("axis0", np.array([0], dtype=np.int64))])  # (k, K)
    rows = g.add("Shape", [x], start=0, end=1)  # [n]
    stacked: dict[int, str] = {}
    for b in sorted({p.block for p in w.parts}):
        # R = s - Q(s), Q as MLAS quantizes activations: per block, scale amax/127, round
        # half to even (measured: W.Q(x) + W.Q(R) is within ~3e-5 relative of W.x)
        sb = g.add("Reshape", [s, g.const("blocks", np.array([0, K // b, b], dtype=np.int64))])
        amax = g.add("ReduceMax", [g.add("Abs", [sb])], axes=(-1,), keepdims=1)  # (k, nb, 1)
        scale = g.add("Div", [amax, g.const("c127", np.array(127.0, dtype=np.float32))])
        safe = g.add("Max", [scale, g.const("tiny", np.array(1e-30, dtype=np.float32))])
        q = g.add("Round", [g.add("Mul", [sb, g.add("Reciprocal", [safe])])])
        r = g.add("Sub", [sb, g.add("Mul", [q, scale])])  # (k, nb, b)
        r = g.add("Reshape", [r, g.const("flat", np.array([0, K], dtype=np.int64))])  # (k, K)
        stacked[b] = g.add("Concat", [x, r], axis=0)  # (n + k, K)
    ys: list[str] = []
    for i, p in enumerate(w.parts):
        N, nb = p.scales.shape
        ins = [stacked[p.block], g.external(f"{tag}.B{i}", p.q),
               g.external(f"{tag}.S{i}", p.scales.reshape(-1))]
        z = _packed_zero_points(p)
        if z is not None:
            ins.append(g.external(f"{tag}.Z{i}", z))
        y = g.add("MatMulNBits", ins, "com.microsoft", K=K, N=N, bits=p.bits,
                  block_size=p.block, accuracy_level=ACCURACY_LEVEL)  # (n + k, N)
        # the residual's rows added to x's: (1 + k/n, n, N) summed over the first axis
        shape = g.add("Concat", [g.const("minus1", np.array([-1], dtype=np.int64)), rows,
                                 g.const("cols", np.array([N], dtype=np.int64))], axis=0)
        y = g.add("ReduceSum", [g.add("Reshape", [y, shape]),
                                g.const("axis0", np.array([0], dtype=np.int64))],
                  keepdims=0)  # (n, N)
        if p.offsets is not None:  # blocksum(x) @ offsets.T, fp32: (n, N)
            xb = g.add("Reshape", [x, g.const("blocks", np.array([0, nb, p.block],
                                                                  dtype=np.int64))])
            xs = g.add("ReduceSum", [xb, g.const("last", np.array([-1], dtype=np.int64))],
                       keepdims=0)  # (n, nb)
            y = g.add("Add", [y, g.add("MatMul", [xs, g.external(f"{tag}.O{i}",
                                                                 p.offsets.T)])])
        ys.append(y)
    return ys[0] if len(ys) == 1 else g.add("Concat", ys, axis=1)  # (n, N)


class _NBitsKernel:
    """One onnxruntime session for `x @ W.T` (`nbits_linear`): inputs x (n, K) and rk."""

    def __init__(self, w: QWeight, threads: int) -> None:
        g = Graph()
        g.rename(nbits_linear(g, "x", w, "w", "rk"), "y")
        f32 = np.dtype(np.float32)
        N, K = w.shape
        self._run, self._keep = g.session(
            [("x", f32, ["n", K]), ("rk", np.dtype(np.int64), [1])], [("y", f32, ["n", N])],
            w.name, threads)

    def __call__(self, x: np.ndarray, residual: bool) -> np.ndarray:
        """x (n, K) -> (n, N)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rk = np.array([x.shape[0] if residual else 0], dtype=np.int64)
        y: np.ndarray = self._run(["y"], {"x": x, "rk": rk}, None)[0]
        return y
