"""The Gemma forward pass in numpy (Gemma 3; Gemma 4 dense text models): norms, RoPE,
attention, MLP. Pure functions over weights.

Activations are fp32. Matrices are `(out, in)` and applied as `Weights.linear(x, W)` = `x @ W.T`:
a GGUF's quantized matrices stay in their block formats (engine.kernels.quantized), dense ones
are fp32 (engine.kernels.prepacked for a few rows). On a quantized trunk a few rows take one
call per layer for everything but the attention (engine.kernels.fused); `forward` then skips
its own matmul steps, which stay the reference. Norm weights are stored as the factor to
multiply by (GGUF already holds `1 + w`; HF loaders add the 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np

from engine.audio import AudioWeights
from engine.config import ModelConfig
from engine.kernels.blocks import BlockQuant
from engine.kernels.fused import FusedLayers, fusable
from engine.kernels.prepacked import MAX_ROWS_TRUNK, Kernels
from engine.kernels.quantized import QWeight, stack
from engine.kv_cache import KVCache
from engine.multimodal import SoftSpan, blocks_in
from engine.vision import VisionWeights

SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))
# a quantized trunk matmul of up to this many rows runs MatMulNBits on int8 activations and
# their rounding residual (engine.kernels.quantized); longer chunks dequantize tile by tile
# for BLAS sgemm (fp32 activations, exact). Per layer of the shipped model: 64 rows 12 vs
# 23 ms, 512 rows 142 vs 58 ms; prefill of 128-token chunks 200 tok/s one way, 270 the
# other. The LM head always takes MatMulNBits: dequantizing its 168M weights would cost
# more than any chunk saves.
NBITS_MAX_ROWS = 64

Matrix = np.ndarray | QWeight  # a weight matrix (out, in): dense fp32 or block-quantized
Tensor = np.ndarray | BlockQuant  # a canonical tensor as read from a file


class Cancelled(Exception):
    """Raised between layers when the caller's `should_stop()` says so."""


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray  # (d,)
    wqkv: Matrix  # (H*hd + 2*KV*hd, d): wq, wk, wv stacked, one matmul
    q_norm: np.ndarray  # (hd,)
    k_norm: np.ndarray  # (hd,)
    wo: Matrix  # (d, H*hd)
    post_attn_norm: np.ndarray  # (d,)
    ffn_norm: np.ndarray  # (d,)
    w_gate_up: Matrix  # (2*ff, d): w_gate, w_up stacked, one matmul
    w_down: Matrix  # (d, ff)
    post_ffn_norm: np.ndarray  # (d,)
    layer_scalar: np.ndarray | None = None  # (1,) Gemma 4 scales each layer's output


def _matrix(name: str, parts: Sequence[Tensor]) -> Matrix:
    """Stack matrices on the output axis: quantized parts stay quantized (one kernel); a mix
    of dense and quantized parts is made dense (exact either way)."""
    quantized = [p for p in parts if isinstance(p, BlockQuant)]
    if len(quantized) == len(parts):
        return stack(name, quantized)
    dense = [p.dequantize() if isinstance(p, BlockQuant) else p for p in parts]
    return dense[0] if len(dense) == 1 else np.concatenate(dense)


def _dense(t: Tensor) -> np.ndarray:
    return t.dequantize() if isinstance(t, BlockQuant) else t


def pack_tensors(config: ModelConfig, tensors: Mapping[str, Tensor]
                 ) -> dict[str, np.ndarray | QWeight]:
    """Canonical named tensors (wq, wk, ..., tok_embd) -> the engine-ready layout.

    Stacks wq|wk|wv and w_gate|w_up so each is one matmul. A quantized embedding stays as
    it is (`tok_embd`, (V, d): rows are read by id, the LM head is a quantized matmul); a
    dense one is stored transposed (`tok_embd_t`, (d, V)), the faster fp32 GEMV layout here.
    """
    embd = tensors["tok_embd"]
    out: dict[str, np.ndarray | QWeight] = {"final_norm": _dense(tensors["final_norm"])}
    if isinstance(embd, BlockQuant):
        out["tok_embd"] = stack("tok_embd", [embd])
    else:
        out["tok_embd_t"] = np.ascontiguousarray(embd.T)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        # a layer attending another's K/V has no wk/wv; with V = K there is no wv
        qkv = [n for n in ("wq", "wk", "wv") if p + n in tensors]
        out[p + "wqkv"] = _matrix(p + "wqkv", [tensors[p + n] for n in qkv])
        out[p + "w_gate_up"] = _matrix(p + "w_gate_up",
                                       [tensors[p + "w_gate"], tensors[p + "w_up"]])
        for n in ("wo", "w_down"):
            out[p + n] = _matrix(p + n, [tensors[p + n]])
        out[p + "k_norm"] = _dense(tensors.get(
            p + "k_norm", np.ones(config.head_dim_of(i), dtype=np.float32)))
        for n in ("attn_norm", "q_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm",
                  "layer_scalar"):
            if p + n in tensors:
                out[p + n] = _dense(tensors[p + n])
    for name, arr in tensors.items():  # Gemma 4 unified's image / audio embedders
        if name.startswith(("vision.", "audio.")):
            out[name] = _dense(arr)
    return out


@dataclass(frozen=True)
class Weights:
    tok_embd_t: np.ndarray | None  # (d, V): a dense embedding transposed, also the LM head
    final_norm: np.ndarray  # (d,)
    layers: tuple[LayerWeights, ...]
    vision: VisionWeights | None = None  # Gemma 4 unified's image embedder
    audio: AudioWeights | None = None  # and its audio embedder
    kernels: Kernels | None = None  # packed kernels for a few rows (engine/kernels), if any
    tok_embd: QWeight | None = None  # (V, d): a quantized embedding (then no tok_embd_t)
    approximate: bool = False  # quantized matmuls on int8 activations alone (scoring's tree)
    fused: FusedLayers | None = None  # one graph per layer for a few rows (quantized trunks)

    def linear(self, x: np.ndarray, w: Matrix) -> np.ndarray:
        """x (T, in) @ w.T for a weight w (out, in) of this model -> (T, out)."""
        if isinstance(w, QWeight):
            if self.approximate:
                return w(x, residual=False)
            return w(x) if x.shape[0] <= NBITS_MAX_ROWS else w.dense_matmul(x)
        return x @ w.T if self.kernels is None else self.kernels.linear(x, w)

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of the embedding, unscaled: (T, d) fp32."""
        if self.tok_embd is not None:
            return self.tok_embd.dequantize(ids)  # (T, d) only these rows
        assert self.tok_embd_t is not None
        return self.tok_embd_t[:, ids].T  # (T, d)

    def matrices(self) -> list[tuple[str, Matrix]]:
        """Every weight matrix by name, the embedding first."""
        embd = self.tok_embd if self.tok_embd is not None else self.tok_embd_t
        assert embd is not None
        return [("tok_embd", embd)] + [
            (f"layers.{i}.{n}", getattr(layer, n)) for i, layer in enumerate(self.layers)
            for n in ("wqkv", "wo", "w_gate_up", "w_down")]

    def dequantized(self) -> Weights:
        """The same model with every matrix dense fp32 (the reference of the fidelity tests),
        its packed kernels registered but not built."""
        def dense(m: Matrix) -> np.ndarray:
            return m.dequantize() if isinstance(m, QWeight) else m

        layers = tuple(dataclasses.replace(
            layer, wqkv=dense(layer.wqkv), wo=dense(layer.wo), w_gate_up=dense(layer.w_gate_up),
            w_down=dense(layer.w_down)) for layer in self.layers)
        embd_t = (self.tok_embd_t if self.tok_embd is None
                  else np.ascontiguousarray(self.tok_embd.dequantize().T))
        return Weights(embd_t, self.final_norm, layers, self.vision, self.audio,
                       _packed_kernels(layers, embd_t))

    @classmethod
    def from_packed(cls, config: ModelConfig, packed: Mapping[str, np.ndarray | QWeight]
                    ) -> Weights:
        """Wrap tensors in the `pack_tensors` layout (no copies)."""
        names = LayerWeights.__dataclass_fields__
        layers = tuple(
            LayerWeights(**{n: packed[f"layers.{i}.{n}"]  # type: ignore[arg-type]
                            for n in names if f"layers.{i}.{n}" in packed})
            for i in range(config.n_layers)
        )
        embd_t, embd_q = packed.get("tok_embd_t"), packed.get("tok_embd")
        assert isinstance(embd_t, np.ndarray) != isinstance(embd_q, QWeight), "one embedding"
        kernels = _packed_kernels(layers, embd_t if isinstance(embd_t, np.ndarray) else None)
        final_norm = packed["final_norm"]
        assert isinstance(final_norm, np.ndarray)
        dense = {k: v for k, v in packed.items() if isinstance(v, np.ndarray)}
        return cls(embd_t if isinstance(embd_t, np.ndarray) else None, final_norm, layers,
                   VisionWeights.from_packed(dense), AudioWeights.from_packed(dense),
                   kernels, embd_q if isinstance(embd_q, QWeight) else None,
                   fused=FusedLayers(layers, config.norm_eps) if fusable(layers) else None)


def _packed_kernels(layers: Sequence[LayerWeights], embd_t: np.ndarray | None) -> Kernels | None:
    """Packed kernels for the dense fp32 matrices (quantized ones carry their own), if any."""
    kernels = Kernels()
    for i, layer in enumerate(layers):
        for n in ("wqkv", "wo", "w_gate_up", "w_down"):
            m = getattr(layer, n)
            if isinstance(m, np.ndarray):
                kernels.add(m, f"layers.{i}.{n}", transposed=True, max_rows=MAX_ROWS_TRUNK)
    if embd_t is not None:
        kernels.add(embd_t, "LM head", transposed=False, max_rows=1 << 30)
    return kernels if kernels.size else None


# --------------------------------------------------------------------------- building blocks


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) * w over the last axis."""
    if x.ndim == 2 and x.shape[0] == 1:  # decode: one row, fewest numpy calls
        v = x[0]
        r = np.float32(1.0 / math.sqrt(float(v @ v) / v.shape[0] + eps))
        return x * (w * r)  # (1, n)
    r = np.einsum("...i,...i->...", x, x)[..., None]  # (..., 1) sum of squares, one pass
    r *= np.float32(1.0 / x.shape[-1])
    r += np.float32(eps)
    np.sqrt(r, out=r)
    np.reciprocal(r, out=r)
    out = x * r  # (..., n)
    out *= w
    return out


def rope_tables(positions: np.ndarray, head_dim: int, base: float, scale: float = 1.0,
                fraction: float = 1.0) -> tuple[np.ndarray, ...]:
    """cos and sin for NeoX RoPE at `positions`, with linear position `scale` (1.0 = none).
    With `fraction` < 1 only the first pairs rotate (Gemma 4's partial rotary).

    The arithmetic is float32 step for step as in transformers (inverse frequencies, their
    division by the scale, the angle product), so angles round the same way: at position 600
    a float64 angle differs by ~3e-5 rad, which unscaled Gemma 4 scores amplify to 1e-3 in
    the logits.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # (hd/2,)
    inv_freq = np.float32(1.0) / np.power(base, exponent.astype(np.float64)).astype(
        np.float32)  # (hd/2,)
    inv_freq[int(fraction * head_dim // 2):] = 0.0  # the pairs past the rotated share stay
    inv_freq /= np.float32(scale)
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # (T, hd/2)
    cos = np.cos(angles.astype(np.float64)).astype(np.float32)[:, None, :]  # (T, 1, hd/2)
    sin = np.sin(angles.astype(np.float64)).astype(np.float32)[:, None, :]  # (T, 1, hd/2)
    return cos, sin


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE on `(T, heads, hd)`: the two halves of each head form the pairs."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = np.empty_like(x)  # (T, heads, hd)
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:] = x2 * cos + x1 * sin
    return out


def gelu_tanh_mul(out: np.ndarray, x: np.ndarray, up: np.ndarray) -> None:
    """out = gelu_tanh(x) * up, via 0.5 * (1 + tanh(z)) == 1 / (1 + exp(-2z)) (exp is faster)."""
    t = x * x  # (..., ff)
    t *= np.float32(-2.0 * 0.044715) * SQRT_2_OVER_PI
    t -= np.float32(2.0) * SQRT_2_OVER_PI
    t *= x  # -2z
    np.minimum(t, np.float32(80.0), out=t)  # exp(80) is finite in fp32; the result is ~0 there
    np.exp(t, out=t)
    t += np.float32(1.0)
    np.multiply(x, up, out=out)
    out /= t


ATTN_QUERY_BLOCK = 128  # prefill attends per block of queries, skipping keys in their future

AttnPlan = list[tuple[int, int, int, int, np.ndarray | None]]


def attention_plan(start: int, n_new: int, window: int | None,
                   blocks: Sequence[tuple[int, int]] = ()) -> AttnPlan:
    """Per query block: (first query, end query, first key, end key, additive mask or None).

    Positions are absolute. A query at p sees keys k <= p, and p - k < window if windowed;
    a query inside a bidirectional block (an image's soft tokens, all inside this chunk)
    also sees every key of that block, past the window and in its future.
    """
    plan: AttnPlan = []
    for b0 in range(0, n_new, ATTN_QUERY_BLOCK):
        b1 = min(n_new, b0 + ATTN_QUERY_BLOCK)
        q0, q1 = start + b0, start + b1
        k0 = 0 if window is None else max(0, q0 - window + 1)
        k1 = q1
        mine = [(a, b) for a, b in blocks if a < q1 and b > q0]
        for a, b in mine:
            k0, k1 = min(k0, a), max(k1, b)
        bias = None
        if q1 - q0 > 1 or (window is not None and q0 - k0 >= window) or mine:
            q_pos = np.arange(q0, q1)[:, None]  # (t, 1)
            k_pos = np.arange(k0, k1)[None, :]  # (1, s)
            visible = k_pos <= q_pos  # (t, s)
            if window is not None:
                visible &= (q_pos - k_pos) < window
            for a, b in mine:  # causal OR same block
                visible |= (q_pos >= a) & (q_pos < b) & (k_pos >= a) & (k_pos < b)
            bias = np.where(visible, np.float32(0.0), np.float32(-np.inf))  # (t, s)
        plan.append((q0, q1, k0, k1, bias))
    return plan


def tree_plan(start: int, parents: Sequence[int],
              window: int | None) -> tuple[np.ndarray, AttnPlan]:
    """Positions and the attention plan of a chunk whose rows form a tree after the cached
    prefix (slots start..): row r follows row parents[r], or the prefix when it is -1. A row
    sits at position start + its depth and sees the prefix and its own ancestors only
    (windowed by position); siblings never see each other."""
    T = len(parents)
    depth = np.zeros(T, dtype=np.int64)  # (T,)
    mine = np.zeros((T, T), dtype=bool)  # (T, T) ancestor-or-self
    for r, p in enumerate(parents):
        assert -1 <= p < r, (r, p)
        if p >= 0:
            depth[r] = depth[p] + 1
            mine[r] = mine[p]
        mine[r, r] = True
    pos = start + depth  # (T,)
    k_pos = np.concatenate([np.arange(start), pos])  # (start + T,)
    visible = np.concatenate([np.ones((T, start), dtype=bool), mine], axis=1)  # (T, start + T)
    k0 = 0
    if window is not None:
        visible &= (pos[:, None] - k_pos[None, :]) < window
        k0 = max(0, start - window + 1)  # no row sees a key before this
    bias = np.where(visible[:, k0:], np.float32(0.0), np.float32(-np.inf))  # (T, s)
    return pos, [(start, start + T, k0, start + T, bias)]


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, plan: AttnPlan, q_start: int
) -> np.ndarray:
    """Grouped-query attention. q (T, H, hd) pre-scaled at positions q_start..;
    k, v (KV, P, hd) hold positions 0..P of this layer. Returns (T, H*hd)."""
    T, H, hd = q.shape
    n_kv = k.shape[0]
    G = H // n_kv
    out = np.empty((H, T, hd), dtype=np.float32)  # (H, T, hd)
    for q0, q1, k0, k1, bias in plan:
        t = q1 - q0
        qb = q[q0 - q_start : q1 - q_start]  # (t, H, hd)
        qg = qb.transpose(1, 0, 2).reshape(n_kv, G * t, hd)  # (KV, G*t, hd): head h -> kv h//G
        scores = qg @ k[:, k0:k1].transpose(0, 2, 1)  # (KV, G*t, s)
        scores = scores.reshape(n_kv, G, t, -1)  # (KV, G, t, s)
        if bias is not None:
            scores += bias
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        ob = scores.reshape(n_kv, G * t, -1) @ v[:, k0:k1]  # (KV, G*t, hd)
        out[:, q0 - q_start : q1 - q_start] = ob.reshape(H, t, hd)
    return out.transpose(1, 0, 2).reshape(T, H * hd)  # (T, H*hd)


# --------------------------------------------------------------------------- forward


def embed_inputs(cfg: ModelConfig, w: Weights, ids: np.ndarray, start: int,
                 soft: Sequence[SoftSpan]) -> np.ndarray:
    """(T, d) inputs at positions start..: token rows x sqrt(d); soft tokens (negative ids)
    replaced by their image / audio embeddings (not scaled)."""
    T = ids.shape[0]
    soft_pos = ids < 0  # (T,)
    lookup = np.where(soft_pos, 0, ids) if soft_pos.any() else ids  # (T,)
    x = w.embed_rows(lookup) * np.float32(cfg.embed_scale)  # (T, d)
    covered = 0
    for span in soft:
        a, b = max(span.start, start), min(span.end, start + T)
        if a < b:
            assert cfg.media is not None
            x[a - start : b - start] = span.embed(cfg.media, w.vision, w.audio, a, b)
            covered += b - a
    assert covered == int(soft_pos.sum()), "soft tokens without a span to embed them"
    return x


def forward(
    cfg: ModelConfig,
    w: Weights,
    tokens: Sequence[int] | np.ndarray,
    kv: KVCache,
    *,
    logits: Literal["last", "all", "none"] = "last",
    should_stop: Callable[[], bool] | None = None,
    soft: Sequence[SoftSpan] = (),
    hidden_out: np.ndarray | None = None,
    parents: Sequence[int] | None = None,
) -> np.ndarray | None:
    """Run `tokens` at positions kv.length.. ; append their K/V; return logits where asked.

    Returns (V,) for "last", (T, V) for "all", None for "none". Raises Cancelled between
    layers if `should_stop()` turns true; the cache then keeps only what it had before.
    Negative ids are soft tokens (images, audio), embedded from the `soft` spans that cover
    them; an image's span must lie wholly inside or outside this chunk.
    `hidden_out` (T, d), if given, receives the final-normed hidden state of every row (what
    a Gemma 4 assistant drafts from).
    `parents`, if given, makes the chunk a tree (see `tree_plan`): several continuations of
    the cached prefix at once, each row at its own depth; the K/V slots then hold no single
    sequence, so the caller cuts `kv` back to where the tree began before anything else.
    """
    scope = nullcontext() if w.kernels is None else w.kernels.scope(len(tokens))
    with scope:  # while packed kernels multiply a few rows, numpy's BLAS runs one thread
        return _forward(cfg, w, tokens, kv, logits=logits, should_stop=should_stop, soft=soft,
                        hidden_out=hidden_out, parents=parents)


def _forward(
    cfg: ModelConfig,
    w: Weights,
    tokens: Sequence[int] | np.ndarray,
    kv: KVCache,
    *,
    logits: Literal["last", "all", "none"],
    should_stop: Callable[[], bool] | None,
    soft: Sequence[SoftSpan],
    hidden_out: np.ndarray | None,
    parents: Sequence[int] | None,
) -> np.ndarray | None:
    """`forward`'s body: the steps, one comment each."""
    ids = np.asarray(tokens, dtype=np.int64)  # (T,)
    T = ids.shape[0]
    start = kv.length
    end = start + T
    assert T > 0 and end <= kv.capacity, (start, T, kv.capacity)
    H = cfg.n_heads
    pos = np.arange(start, end)  # (T,)
    if parents is not None:
        assert len(parents) == T and not soft, "a tree chunk has one parent per row, no media"
        pos, plan_tree_global = tree_plan(start, parents, None)  # (T,)

    # RoPE tables and masks, shared by all layers of a kind (full-attention layers may have
    # wider heads and rotate only part of them)
    kinds = cfg.sliding_layers
    hd_global = next((cfg.head_dim_of(i) for i, s in enumerate(kinds) if not s), cfg.head_dim)
    hd_local = next((cfg.head_dim_of(i) for i, s in enumerate(kinds) if s), cfg.head_dim)
    rope_global = rope_tables(pos, hd_global, cfg.rope_base_global, cfg.rope_scale_global,
                              cfg.rope_fraction_global)
    rope_local = rope_tables(pos, hd_local, cfg.rope_base_local)
    blocks = blocks_in(soft, start, end)  # image soft tokens attend each other both ways
    plan_global = attention_plan(start, T, None, blocks)
    plan_local = attention_plan(start, T, cfg.sliding_window, blocks)
    if parents is not None:
        plan_global = plan_tree_global
        plan_local = tree_plan(start, parents, cfg.sliding_window)[1]
    scale = np.float32(cfg.attn_scale)

    # token embedding scaled by sqrt(d); soft tokens from their embedders, unscaled
    x = embed_inputs(cfg, w, ids, start, soft)  # (T, d)
    # a few rows on a quantized trunk (or any number on int8 activations alone, as `linear`
    # takes them): one call per layer does all but the attention (engine.kernels.fused),
    # starting with layer 0's pre-norm and projection
    few = T <= NBITS_MAX_ROWS or w.approximate
    fused = w.fused if w.fused is not None and w.fused.ready and few else None
    exact = not w.approximate
    qkv = None if fused is None or fused.head is None else fused.head(x, exact)  # (T, ...)

    for i, layer in enumerate(w.layers):
        if should_stop is not None and should_stop():
            raise Cancelled()
        local = kinds[i]
        cos, sin = rope_local if local else rope_global
        hd, KV, src = cfg.head_dim_of(i), cfg.kv_heads(i), cfg.source(i)

        # attention: pre-norm, q/k/v projections in one matmul (fused: done by the last call)
        if fused is None:
            h = rmsnorm(x, layer.attn_norm, cfg.norm_eps)  # (T, d)
            qkv = w.linear(h, layer.wqkv)  # (T, (H + 2*KV) * hd)
        assert qkv is not None
        q = qkv[:, : H * hd].reshape(T, H, hd)  # (T, H, hd)
        # q norm over head_dim, then RoPE
        q = apply_rope(rmsnorm(q, layer.q_norm, cfg.norm_eps), cos, sin) * scale  # (T, H, hd)
        if src == i:  # this layer's own K/V (K/V-sharing layers attend layer `src`'s)
            k = qkv[:, H * hd : (H + KV) * hd].reshape(T, KV, hd)  # (T, KV, hd)
            v = k if cfg.v_is_k(i) else qkv[:, (H + KV) * hd :].reshape(T, KV, hd)  # (T, KV, hd)
            k = apply_rope(rmsnorm(k, layer.k_norm, cfg.norm_eps), cos, sin)  # (T, KV, hd)
            if cfg.v_norm:
                v = rmsnorm(v, np.ones(hd, dtype=np.float32), cfg.norm_eps)  # (T, KV, hd)
            # write this chunk's K/V into the cache by slice
            kv.k[i, :KV, start:end, :hd] = k.transpose(1, 0, 2)
            kv.v[i, :KV, start:end, :hd] = v.transpose(1, 0, 2)
        # attend over the visible keys (last W positions on sliding layers)
        plan = plan_local if local else plan_global
        att = attention(q, kv.k[src, :KV, :end, :hd], kv.v[src, :KV, :end, :hd], plan,
                        start)  # (T, H*hd)
        if fused is not None:  # the rest of this layer and the next one's projection
            x, qkv = fused.tails[i](x, att, exact)  # (T, d), (T, ...) or None after the last
            continue
        # output projection, post-norm, residual
        x = x + rmsnorm(w.linear(att, layer.wo), layer.post_attn_norm, cfg.norm_eps)  # (T, d)

        # MLP: pre-norm, GeGLU-tanh, down projection, post-norm, residual
        ff = layer.w_down.shape[1]
        h = rmsnorm(x, layer.ffn_norm, cfg.norm_eps)  # (T, d)
        gu = w.linear(h, layer.w_gate_up)  # (T, 2*ff)
        g = np.empty((T, ff), dtype=np.float32)  # (T, ff)
        gelu_tanh_mul(g, gu[:, :ff], gu[:, ff:])
        x = x + rmsnorm(w.linear(g, layer.w_down), layer.post_ffn_norm, cfg.norm_eps)  # (T, d)
        if layer.layer_scalar is not None:
            x = x * layer.layer_scalar  # (T, d) Gemma 4's per-layer output scale

    kv.tokens[start:end] = ids
    kv.length = end
    if hidden_out is not None:
        hidden_out[:] = rmsnorm(x, w.final_norm, cfg.norm_eps)  # (T, d)
    if logits == "none":
        return None

    # final norm and tied LM head, only where logits are needed
    xs = x[-1:] if logits == "last" else x  # (T', d)
    out = lm_head(cfg, w, rmsnorm(xs, w.final_norm, cfg.norm_eps))  # (T', V)
    return out[0] if logits == "last" else out


def lm_head(cfg: ModelConfig, w: Weights, h: np.ndarray, exact: bool = True) -> np.ndarray:
    """Logits (T, V) of final-normed hidden states h (T, d): the tied embedding, softcapped.
    `exact=False` lets a quantized head use int8 activations alone (half the work; logits
    within ~1e-2 relative): for scoring many rows."""
    if w.tok_embd is not None:
        out = w.tok_embd(h, residual=exact)  # (T, V) MatMulNBits
    else:
        assert w.tok_embd_t is not None
        k = w.kernels
        out = h @ w.tok_embd_t if k is None else k.matmul(h, w.tok_embd_t)  # (T, V)
    if cfg.final_logit_softcap is not None:
        cap = np.float32(cfg.final_logit_softcap)
        out = np.tanh(out / cap) * cap  # (T, V)
    return out
