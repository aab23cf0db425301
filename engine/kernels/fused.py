"""One onnxruntime call per layer for a few rows: everything of a layer but its attention.

A decode step on the quantized weights made 73 onnxruntime calls (one per matrix) and ~200
numpy calls (norms, GeGLU, residual adds) around them; each costs its Python and dispatch
overhead, which on a 270M model is a large part of a token. Here each layer's work between two
attentions is one graph, `LayerTail`:

    x' = x + post_attn_norm(att @ wo.T)                    residual after attention
    h  = ffn_norm(x')                                      MLP pre-norm
    x''= (x' + post_ffn_norm(gelu_tanh(h @ w_gate.T) * (h @ w_up.T) @ w_down.T)) * scalar
    qkv= (attn_norm'(x'') @ wqkv'.T)                       the NEXT layer's q/k/v projection

and `LayerHead` is the first layer's pre-norm and projection. So a forward pass of L layers
makes L + 1 calls besides its attentions and the LM head; the numpy side keeps q/k norms, RoPE,
the K/V cache and attention (sliding windows, trees and image blocks stay where they are
tested).

Every matmul is MatMulNBits on int8 activations plus their rounding residual, exactly as
`engine.kernels.quantized` computes it (the same nodes, `nbits_linear`), so a fused layer and
the per-matrix kernels agree to float rounding; with `residual=False` (scoring's candidate
tree) the residual rows are dropped, as there. Norms are SimplifiedLayerNormalization (fp32,
x / sqrt(mean(x^2) + eps) * w, as `engine.model.rmsnorm`), GeGLU is FastGelu (the tanh form).
Every node is row-wise, so a row's result does not depend on the other rows of the call:
verifying drafted tokens equals decoding them one by one.

Each graph holds the prepacked weights of its matrices (the engine builds no per-matrix
sessions for the trunk when these exist), so memory is what the per-matrix kernels took.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.kernels.onnx_graph import Graph
from engine.kernels.quantized import QWeight, nbits_linear

BACKEND = "onnxruntime, one graph per layer (MatMulNBits, int8 activations + residual)"


def _norm(g: Graph, x: str, w: np.ndarray, eps: float, tag: str) -> str:
    """rmsnorm over the last axis: x / sqrt(mean(x^2) + eps) * w."""
    return g.add("SimplifiedLayerNormalization", [x, g.const(tag, w)], axis=-1,
                 epsilon=float(eps), stash_type=1)


class _Session:
    """A built graph and its run call."""

    def __init__(self, g: Graph, inputs: Sequence[tuple[str, int]],
                 outputs: Sequence[tuple[str, int]], name: str, threads: int) -> None:
        f32 = np.dtype(np.float32)
        ins: list[tuple[str, np.dtype, list[int | str]]] = [
            (n, f32, ["n", k]) for n, k in inputs]
        ins.append(("rk", np.dtype(np.int64), [1]))
        outs: list[tuple[str, np.dtype, list[int | str]]] = [
            (n, f32, ["n", k]) for n, k in outputs]
        self._run, self._keep = g.session(ins, outs, name, threads)
        self._outputs = [n for n, _ in outputs]

    def __call__(self, feeds: dict[str, np.ndarray], residual: bool) -> list[np.ndarray]:
        n = next(iter(feeds.values())).shape[0]
        feeds["rk"] = np.array([n if residual else 0], dtype=np.int64)
        out: list[np.ndarray] = self._run(self._outputs, feeds, None)
        return out


class LayerHead:
    """The first layer's pre-norm and q/k/v projection: x (n, d) -> qkv (n, N)."""

    def __init__(self, attn_norm: np.ndarray, wqkv: QWeight, eps: float, threads: int) -> None:
        g = Graph()
        h = _norm(g, "x", attn_norm, eps, "attn_norm")
        qkv = nbits_linear(g, h, wqkv, "wqkv", "rk")
        g.rename(qkv, "qkv")
        d = attn_norm.shape[0]
        self._s = _Session(g, [("x", d)], [("qkv", wqkv.shape[0])], "layer head", threads)

    def __call__(self, x: np.ndarray, residual: bool = True) -> np.ndarray:
        (qkv,) = self._s({"x": np.ascontiguousarray(x, dtype=np.float32)}, residual)
        return qkv


class LayerTail:
    """Layer i after its attention, and layer i + 1's projection when `next_qkv` is given:
    (x (n, d), att (n, H*hd)) -> (x (n, d), qkv (n, N') or None)."""

    def __init__(self, layer: Any, eps: float, threads: int,
                 next_norm: np.ndarray | None = None, next_qkv: QWeight | None = None,
                 name: str = "layer") -> None:
        g = Graph()
        wo, w_gate_up, w_down = layer.wo, layer.w_gate_up, layer.w_down
        d, ff = w_down.shape
        # output projection, post-norm, residual; then the MLP's pre-norm
        o = nbits_linear(g, "att", wo, "wo", "rk")  # (n, d)
        o = _norm(g, o, layer.post_attn_norm, eps, "post_attn")
        x1 = g.add("Add", ["x", o])  # (n, d)
        h = _norm(g, x1, layer.ffn_norm, eps, "ffn_norm")
        # GeGLU-tanh: gelu(h @ w_gate.T) * (h @ w_up.T), then the down projection
        gu = nbits_linear(g, h, w_gate_up, "w_gate_up", "rk")  # (n, 2*ff)
        gate, up = g.split(gu, [ff, ff])  # (n, ff) each
        act = g.add("FastGelu", [gate], domain="com.microsoft")
        y = nbits_linear(g, g.add("Mul", [act, up]), w_down, "w_down", "rk")  # (n, d)
        x2 = g.add("Add", [x1, _norm(g, y, layer.post_ffn_norm, eps, "post_ffn")])  # (n, d)
        if layer.layer_scalar is not None:  # Gemma 4's per-layer output scale
            x2 = g.add("Mul", [x2, g.const("scalar", layer.layer_scalar.reshape(1))])
        g.rename(x2, "x_out")
        outputs = [("x_out", d)]
        if next_qkv is not None:
            assert next_norm is not None
            qkv = nbits_linear(g, _norm(g, "x_out", next_norm, eps, "next_norm"), next_qkv,
                               "next_wqkv", "rk")
            g.rename(qkv, "qkv")
            outputs.append(("qkv", next_qkv.shape[0]))
        self._s = _Session(g, [("x", d), ("att", wo.shape[1])], outputs, name, threads)

    def __call__(self, x: np.ndarray, att: np.ndarray, residual: bool = True
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        out = self._s({"x": np.ascontiguousarray(x, dtype=np.float32),
                       "att": np.ascontiguousarray(att, dtype=np.float32)}, residual)
        return out[0], (out[1] if len(out) > 1 else None)


def fusable(layers: Sequence[Any]) -> bool:
    """Whether every layer's matrices are quantized (the graphs hold MatMulNBits only)."""
    return bool(layers) and all(
        isinstance(getattr(layer, n), QWeight)
        for layer in layers for n in ("wqkv", "wo", "w_gate_up", "w_down"))


class FusedLayers:
    """The graphs of a whole trunk, built by `build` (until then `ready` is False and the
    forward pass multiplies matrix by matrix): `head`, then `tails[i]` after layer i's
    attention."""

    def __init__(self, layers: Sequence[Any], eps: float) -> None:
        assert fusable(layers)
        self.layers = tuple(layers)
        self.eps = eps
        self.head: LayerHead | None = None
        self.tails: list[LayerTail] = []
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.head is not None

    def build(self, threads: int) -> None:
        """Build every graph (once; raises ValueError naming a layer onnxruntime refuses)."""
        with self._lock:
            if self.head is not None:
                return
            ls, eps = self.layers, self.eps
            tails = [LayerTail(layer, eps, threads,
                               ls[i + 1].attn_norm if i + 1 < len(ls) else None,
                               ls[i + 1].wqkv if i + 1 < len(ls) else None,
                               name=f"layers.{i}")
                     for i, layer in enumerate(ls)]
            self.tails = tails
            self.head = LayerHead(ls[0].attn_norm, ls[0].wqkv, eps, threads)
