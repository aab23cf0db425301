"""A tiny random Gemma-3-shaped model for fast unit tests, and a naive reference forward."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engine.config import ModelConfig
from engine.model import Weights, pack_tensors


def tiny_gemma4_text_config(tf: Any) -> Any:
    """A transformers Gemma4TextConfig (`tf`: the transformers module) of a tiny dense Gemma 4
    with every feature the engine maps: plain norms, V norm, wider full-attention heads with
    partial RoPE, K = V and fewer K/V heads there, K/V sharing, double-wide MLP, softcap."""
    kinds = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
             "full_attention", "sliding_attention", "full_attention"]
    return tf.Gemma4TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, num_kv_shared_layers=2,
        use_double_wide_mlp=True, sliding_window=64, max_position_embeddings=2048,
        layer_types=kinds, hidden_size_per_layer_input=0, final_logit_softcapping=30.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                            "partial_rotary_factor": 0.25}},
        attn_implementation="eager")



def tiny_config(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(
        arch="gemma3",
        vocab_size=97,
        d_model=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ff_dim=48,
        context_length=256,
        sliding_window=8,
        sliding_layers=(True, True, False, True),
        rope_base_global=1_000_000.0,
        rope_base_local=10_000.0,
        rope_scale_global=1.0,
        norm_eps=1e-6,
        query_pre_attn_scalar=16.0,
    )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def tiny_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical-named random tensors (norm weights are the factor, around 1)."""
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    d, hd, ff = cfg.d_model, cfg.head_dim, cfg.ff_dim
    t = {"tok_embd": mat(cfg.vocab_size, d), "final_norm": norm(d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        t |= {
            p + "attn_norm": norm(d),
            p + "wq": mat(cfg.n_heads * hd, d),
            p + "wk": mat(cfg.n_kv_heads * hd, d),
            p + "wv": mat(cfg.n_kv_heads * hd, d),
            p + "q_norm": norm(hd),
            p + "k_norm": norm(hd),
            p + "wo": mat(d, cfg.n_heads * hd),
            p + "post_attn_norm": norm(d),
            p + "ffn_norm": norm(d),
            p + "w_gate": mat(ff, d),
            p + "w_up": mat(ff, d),
            p + "w_down": mat(d, ff),
            p + "post_ffn_norm": norm(d),
        }
    return t


def tiny_weights(cfg: ModelConfig, seed: int = 0) -> Weights:
    return Weights.from_packed(cfg, pack_tensors(cfg, tiny_tensors(cfg, seed)))


def naive_forward(cfg: ModelConfig, t: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Straight-line fp64 Gemma 3 forward, one query at a time: the independent reference."""
    f = {k: v.astype(np.float64) for k, v in t.items()}

    def rms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * w

    def rope(x: np.ndarray, pos: int, base: float) -> np.ndarray:
        half = x.shape[-1] // 2
        inv = base ** (-np.arange(0, x.shape[-1], 2) / x.shape[-1])
        c, s = np.cos(pos * inv), np.sin(pos * inv)
        return np.concatenate([x[..., :half] * c - x[..., half:] * s,
                               x[..., half:] * c + x[..., :half] * s], axis=-1)

    n, hd = len(ids), cfg.head_dim
    x = f["tok_embd"][ids] * math.sqrt(cfg.d_model)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        local = cfg.sliding_layers[i]
        base = cfg.rope_base_local if local else cfg.rope_base_global
        h = rms(x, f[p + "attn_norm"])
        q = (h @ f[p + "wq"].T).reshape(n, cfg.n_heads, hd)
        k = (h @ f[p + "wk"].T).reshape(n, cfg.n_kv_heads, hd)
        v = (h @ f[p + "wv"].T).reshape(n, cfg.n_kv_heads, hd)
        q = np.stack([rope(rms(q[j], f[p + "q_norm"]), j, base) for j in range(n)])
        k = np.stack([rope(rms(k[j], f[p + "k_norm"]), j, base) for j in range(n)])
        att = np.zeros((n, cfg.n_heads, hd))
        group = cfg.n_heads // cfg.n_kv_heads
        for j in range(n):
            for hh in range(cfg.n_heads):
                keys = [kk for kk in range(j + 1) if not local or j - kk < cfg.sliding_window]
                kvh = hh // group
                sc = np.array([q[j, hh] @ k[kk, kvh] for kk in keys])
                sc = sc / math.sqrt(cfg.query_pre_attn_scalar)
                pr = np.exp(sc - sc.max())
                pr /= pr.sum()
                att[j, hh] = sum(pr[m] * v[kk, kvh] for m, kk in enumerate(keys))
        x = x + rms(att.reshape(n, -1) @ f[p + "wo"].T, f[p + "post_attn_norm"])
        h = rms(x, f[p + "ffn_norm"])
        g = h @ f[p + "w_gate"].T
        g = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
        x = x + rms((g * (h @ f[p + "w_up"].T)) @ f[p + "w_down"].T, f[p + "post_ffn_norm"])
    return rms(x, f["final_norm"]) @ f["tok_embd"].T


_GGUF_ROLE = {
    "attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
    "wo": "attn_output", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
    "post_attn_norm": "post_attention_norm", "ffn_norm": "ffn_norm", "w_gate": "ffn_gate",
    "w_up": "ffn_up", "w_down": "ffn_down", "post_ffn_norm": "post_ffw_norm",
}


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """Specials, the 256 byte tokens, then a few normal pieces (SentencePiece BPE style)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [3, 3, 3, 2]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    normal = ["▁", "a", "b", "c", "d", "e", "x", "y", "ab", "▁a", "▁ab", "cd", "abcd"]
    tokens += normal
    types += [1] * len(normal)
    scores = [0.0] * (260) + [-float(i) for i in range(len(normal))]
    return tokens, scores, types


def write_tiny_gguf(path: str, cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
    """Write a tiny Gemma 3 GGUF (F32 tensors) with `gguf.GGUFWriter`."""
    import gguf

    tokens, scores, types = tiny_vocab()
    assert cfg.vocab_size == len(tokens), (cfg.vocab_size, len(tokens))
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ff_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_base_global)
    w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    for name, arr in tensors.items():
        if name == "tok_embd":
            gname = "token_embd.weight"
        elif name == "final_norm":
            gname = "output_norm.weight"
        else:
            _, i, role = name.split(".")
            gname = f"blk.{i}.{_GGUF_ROLE[role]}.weight"
        w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
