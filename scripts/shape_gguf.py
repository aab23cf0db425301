#!/usr/bin/env python3
"""Random-weight GGUFs in a real model's shape, for benchmarks of models we cannot download.

`write_shape_gguf(path, "gemma3-12b")` writes Gemma 3 12B's architecture (48 layers, d 3840,
ff 15360, 16 query / 8 K/V heads of 256, the 262,144-token vocabulary of the shipped model)
with a Q4_K_M-like mix of types, as llama.cpp's quantizer chooses them: Q4_K everywhere but
attn_v and ffn_down on the first and last eighth of the layers and every third one between
(Q6_K), and a Q6_K embedding. The blocks are random bytes with sane fp16 scales: every block
is valid and decodes to values of ~0.1, so both engines do exactly the work of the real model
(the text it writes is noise). Tensors are written one at a time (at most the embedding's
0.8 GB in memory).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Shape:
    n_layers: int
    d_model: int
    ff_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    sliding_window: int
    rope_scale: float
    context_length: int


SHAPES = {
    "gemma3-12b": Shape(48, 3840, 15360, 16, 8, 256, 1024, 8.0, 131072),
    "gemma3-4b": Shape(34, 2560, 10240, 8, 4, 256, 1024, 8.0, 131072),
}
# byte offset of the fp16 super-block scale(s) in each type's block
_F16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,)}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule for attn_v / ffn_down: Q6_K on these layers."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_specs(shape: Shape, n_layers: int, vocab: int) -> list[tuple[str, tuple[int, int] |
                                                                      tuple[int], str]]:
    """(GGUF name, (rows, cols) or (n,), type) in file order."""
    d, hd = shape.d_model, shape.head_dim
    specs: list[tuple[str, tuple[int, int] | tuple[int], str]] = [
        ("token_embd.weight", (vocab, d), "Q6_K")]
    for i in range(n_layers):
        b = f"blk.{i}."
        heavy = "Q6_K" if _more_bits(i, n_layers) else "Q4_K"
        specs += [
            (b + "attn_norm.weight", (d,), "F32"),
            (b + "attn_q.weight", (shape.n_heads * hd, d), "Q4_K"),
            (b + "attn_k.weight", (shape.n_kv_heads * hd, d), "Q4_K"),
            (b + "attn_v.weight", (shape.n_kv_heads * hd, d), heavy),
            (b + "attn_q_norm.weight", (hd,), "F32"),
            (b + "attn_k_norm.weight", (hd,), "F32"),
            (b + "attn_output.weight", (d, shape.n_heads * hd), "Q4_K"),
            (b + "post_attention_norm.weight", (d,), "F32"),
            (b + "ffn_norm.weight", (d,), "F32"),
            (b + "ffn_gate.weight", (shape.ff_dim, d), "Q4_K"),
            (b + "ffn_up.weight", (shape.ff_dim, d), "Q4_K"),
            (b + "ffn_down.weight", (d, shape.ff_dim), heavy),
            (b + "post_ffw_norm.weight", (d,), "F32"),
        ]
    specs.append(("output_norm.weight", (d,), "F32"))
    return specs


def _random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw blocks (rows, row bytes): random bits, fp16 scales that give values of ~0.1."""
    from gguf import GGMLQuantizationType
    from gguf.quants import GGML_QUANT_SIZES

    per_block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    nb = cols // per_block
    data = np.frombuffer(rng.bytes(rows * nb * size), dtype=np.uint8).reshape(rows, nb, size)
    data = data.copy()
    for off in _F16_FIELDS[kind]:
        d = (rng.random((rows, nb), dtype=np.float32) * 2e-4 + 1e-5).astype(np.float16)
        data[..., off:off + 2] = d.view(np.uint8).reshape(rows, nb, 2)
    return data.reshape(rows, nb * size)


def write_shape_gguf(path: Path, name: str, n_layers: int | None = None, seed: int = 0) -> int:
    """Write the GGUF; returns its size in bytes. `n_layers` (default: the shape's) cuts the
    trunk short (same matrices, fewer of them) for a quicker run."""
    import gguf

    from engine.weights import embedded_model_path

    shape = SHAPES[name]
    layers = shape.n_layers if n_layers is None else n_layers
    vocab_src = gguf.GGUFReader(str(embedded_model_path()))
    fields = {k: vocab_src.fields[k].contents() for k in (
        "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")}
    vocab = len(fields["tokenizer.ggml.tokens"])
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name(f"random {name}" + ("" if layers == shape.n_layers else f" ({layers} layers)"))
    w.add_context_length(shape.context_length)
    w.add_embedding_length(shape.d_model)
    w.add_block_count(layers)
    w.add_feed_forward_length(shape.ff_dim)
    w.add_head_count(shape.n_heads)
    w.add_head_count_kv(shape.n_kv_heads)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(shape.rope_scale)
    w.add_sliding_window(shape.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_token_list(fields["tokenizer.ggml.tokens"])
    w.add_token_scores(fields["tokenizer.ggml.scores"])
    w.add_token_types(fields["tokenizer.ggml.token_type"])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    specs = tensor_specs(shape, layers, vocab)
    for tname, dims, kind in specs:
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            w.add_tensor_info(tname, dims, np.dtype(np.float32), 4 * dims[0])
            continue
        rows, cols = dims  # type: ignore[misc]
        per_block, size = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = cols // per_block * size  # the writer takes the shape in bytes
        w.add_tensor_info(tname, (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes,
                          raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, dims, kind in specs:
        if kind == "F32":  # norm factors around 1 (GGUF stores 1 + w)
            w.write_tensor_data((1.0 + 0.05 * rng.standard_normal(dims[0])).astype(np.float32))
            continue
        rows, cols = dims  # type: ignore[misc]
        w.write_tensor_data(_random_blocks(kind, rows, cols, rng))  # the embedding: 0.8 GB
    w.close()
    return path.stat().st_size
