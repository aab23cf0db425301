"""Hugging Face checkpoints: config and tensor mapping, bf16 and shards, the multimodal
layout, repo ids from the local cache, and the shipped GGUF exported to an HF directory and
loaded back with the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine import hf
from engine.kv_cache import KVCache
from engine.model import forward
from engine.runtime import Model
from engine.sampling import log_softmax
from tests.engine.tiny import (
    tiny_config,
    tiny_gemma4_text_config,
    tiny_tensors,
    tiny_vocab,
    write_tiny_gguf,
)

CFG = tiny_config()
NORMS = ("q_norm", "k_norm", "attn_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm")
HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
            "wo": "self_attn.o_proj", "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
            "attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffn_norm": "post_feedforward_layernorm", "w_gate": "mlp.gate_proj",
            "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GEMMA_LSP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (round to nearest even), as uint16 the way safetensors stores them."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_multimodal_checkpoint(d: Path, tensors: dict[str, np.ndarray]) -> None:
    """A Gemma3ForConditionalGeneration-style directory: nested text_config, bf16 weights in
    two shards with an index, language-model prefix, and a vision tower to be skipped."""
    d.mkdir(parents=True)
    text = hf.config_to_hf(CFG)
    (d / "config.json").write_text(json.dumps({
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text, "vision_config": {"model_type": "siglip_vision_model"}}))
    named: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if name == "tok_embd":
            key = "language_model.model.embed_tokens.weight"
        elif name == "final_norm":
            key = "language_model.model.norm.weight"
        else:
            _, i, role = name.split(".")
            key = f"language_model.model.layers.{i}.{HF_NAMES[role]}.weight"
        norm = name == "final_norm" or name.split(".")[-1] in NORMS
        named[key] = bf16(arr - 1 if norm else arr)
    named["vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((4, 4),
                                                                                    np.uint16)
    keys = sorted(named)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for fname, ks in shards.items():
        # safetensors.numpy writes uint16; the loader reads the header's dtype: patch it to BF16
        save_file({k: named[k] for k in ks}, str(d / fname))
        raw = (d / fname).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = raw[8:8 + n].replace(b'"U16"', b'"BF16"')
        (d / fname).write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))


def test_config_round_trips_through_hf_field_names() -> None:
    assert hf.config_from_hf(hf.config_to_hf(CFG)) == CFG
    scaled = tiny_config(rope_scale_global=8.0, final_logit_softcap=30.0)
    assert hf.config_from_hf({"text_config": hf.config_to_hf(scaled)}) == scaled


def test_unsupported_families_are_named_clearly() -> None:
    ple = {"model_type": "gemma4_text", "hidden_size_per_layer_input": 256}
    with pytest.raises(ValueError, match="per-layer embeddings.*backend"):
        hf.config_from_hf({"model_type": "gemma4", "text_config": ple})
    with pytest.raises(ValueError, match="gemma3n.*backend"):
        hf.config_from_hf({"model_type": "gemma3n"})
    with pytest.raises(ValueError, match="'llama' is not a Gemma 3 or Gemma 4"):
        hf.config_from_hf({"model_type": "llama"})


def test_bf16_sharded_multimodal_checkpoint_maps_to_canonical_tensors(tmp_path: Path) -> None:
    tensors = tiny_tensors(CFG)
    d = tmp_path / "ckpt"
    write_multimodal_checkpoint(d, tensors)
    got = dict(hf.read_tensors(d))
    assert set(got) == set(tensors)  # the vision tower is skipped
    for name, arr in tensors.items():
        norm = name == "final_norm" or name.split(".")[-1] in NORMS
        stored = hf._fp32(bf16(arr - 1 if norm else arr))
        want = stored + np.float32(1) if norm else stored
        np.testing.assert_array_equal(got[name], want, err_msg=name)
        assert np.abs(got[name] - arr).max() <= 0.01 * max(1.0, float(np.abs(arr).max()))


def test_repo_ids_resolve_offline_from_the_cache_only(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="gemma-lsp pull google/gemma-3-1b-it"):
        hf.resolve("google/gemma-3-1b-it")
    with pytest.raises(ValueError, match="model file not found"):
        hf.resolve(tmp_path / "nothing.gguf")
    out = subprocess.run([sys.executable, "-m", "gemma_lsp", "pull", "google/gemma-3-1b-it"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"),
                              "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "google/gemma-3-1b-it" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_shipped_model_exported_to_hf_loads_back_with_the_same_logits(
    model: Any, cache: Path, tmp_path: Path,
) -> None:
    d = hf.export(model, tmp_path / "gemma-3-270m-hf")
    back = Model.load(d, quant="f32")
    assert back.config == model.config
    text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    ids = model.tokenizer.encode(text)
    assert back.tokenizer.encode(text) == ids
    assert back.tokenizer.stop_ids >= {1, 106}
    # the export holds the GGUF's values in fp32: as the fp32 forward of those values
    dense = model.weights.dequantized()
    a = forward(model.config, dense, ids, KVCache(model.config, 64), logits="all")
    b = forward(back.config, back.weights, ids, KVCache(back.config, 64), logits="all")
    assert a is not None and b is not None
    assert float(np.abs(a - b).max()) <= 1e-4  # norms go through w - 1 + 1 in fp32
    assert (a.argmax(-1) == b.argmax(-1)).all()
    # a second load reuses the engine-ready copy
    assert Model.load(d, quant="f32").files.ready_dir == back.files.ready_dir


def _tiny_tokenizer_json(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab |= {f"t{i}": i for i in range(4, vocab_size)}
    Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(str(path))


def test_logits_match_transformers_on_a_tiny_random_gemma3(cache: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="the `ref` extra (torch, transformers) is needed")
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
        max_position_embeddings=2048, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                            "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        attn_implementation="eager")
    ref = tf.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # norms too: the 1 + w mapping must be right
            p.normal_(0.0, 0.3 if "norm" in name else 0.08)
    d = tmp_path / "tiny-gemma3"
    ref.save_pretrained(d)
    _tiny_tokenizer_json(d / "tokenizer.json", 300)
    ids = torch.randint(4, 300, (1, 600), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits[0].numpy()  # (600, V)
    ours = Model.load(d, quant="f32")  # the fp32 reference path
    assert ours.config.sliding_layers == (True, True, False, True)
    assert ours.config.rope_scale_global == 2.0
    got = forward(ours.config, ours.weights, ids[0].tolist(), KVCache(ours.config, 600),
                  logits="all")
    assert got is not None
    err = float(np.abs(got - want).max())
    print(f"max |logit diff| vs transformers: {err:.2e}")
    assert err <= 1e-4, err


def test_logits_match_transformers_on_a_tiny_random_gemma4(cache: Path, tmp_path: Path) -> None:
    """Dense Gemma 4: plain norms, V norm, unscaled scores, wider full-attention heads with
    partial RoPE, K = V and fewer K/V heads there, K/V sharing, layer scalars, softcap."""
    torch = pytest.importorskip("torch", reason="the `ref` extra (torch, transformers) is needed")
    tf = pytest.importorskip("transformers")
    if not hasattr(tf, "Gemma4ForCausalLM"):
        pytest.skip("this transformers has no Gemma 4")
    torch.manual_seed(0)
    config = tiny_gemma4_text_config(tf)
    ref = tf.Gemma4ForCausalLM(config).eval()
    with torch.no_grad():  # (linear weights at std 0.04: with 0.08 this random model is so
        # chaotic that transformers' own float32 and float64 passes differ by 3e-4)
        for name, p in ref.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.04)
        for name, b in ref.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    d = tmp_path / "tiny-gemma4"
    ref.save_pretrained(d)
    _tiny_tokenizer_json(d / "tokenizer.json", 300)
    ids = torch.randint(4, 300, (1, 600), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # (hidden states requested: avoids a transformers shortcut that
        # breaks without per-layer embeddings)
        want = ref(ids, output_hidden_states=True).logits[0].numpy()  # (600, V)
    ours = Model.load(d, quant="f32")  # the fp32 reference path
    c = ours.config
    assert c.arch == "gemma4" and c.layer_head_dims == (16, 16, 32, 16, 32, 16, 32)
    assert c.kv_source == (0, 1, 2, 3, 4, 3, 4) and c.k_eq_v[2] and not c.k_eq_v[1]
    assert c.layer_ff_dims[5] == 192
    got = forward(c, ours.weights, ids[0].tolist(), KVCache(c, 600), logits="all")
    assert got is not None
    err = float(np.abs(got - want).max())
    print(f"max |logit diff| vs transformers (Gemma 4): {err:.2e}")
    # Gemma 4 does not scale attention scores, so RoPE angle rounding is amplified by |q||k|:
    # angles must be rounded as transformers rounds them (float32); float64 angles: 2.4e-4 here
    assert err <= 1e-4, err
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99
    # prefill in chunks then decode agrees with the one-shot pass
    kv = KVCache(c, 600)
    forward(c, ours.weights, ids[0, :300].tolist(), kv, logits="none")
    tail = forward(c, ours.weights, ids[0, 300:599].tolist(), kv, logits="none")
    assert tail is None
    last = forward(c, ours.weights, ids[0, 599:].tolist(), kv)
    assert last is not None and float(np.abs(last - got[-1]).max()) <= 1e-4


def test_a_checkpoint_is_quantized_once_to_the_type_asked_for(cache: Path, tmp_path: Path) -> None:
    """Hugging Face weights are quantized at first load (q8_0 by default below 8B parameters),
    into an engine-ready copy of their own; the quantized model stays close to fp32."""
    from engine.kernels.quantized import QWeight
    from engine.weights import default_quant

    cfg = tiny_config(vocab_size=len(tiny_vocab()[0]), ff_dim=64)  # inputs: whole 32-blocks
    write_tiny_gguf(str(tmp_path / "tiny.gguf"), cfg, tiny_tensors(cfg, seed=5))
    d = hf.export(Model.load(tmp_path / "tiny.gguf"), tmp_path / "tiny-hf")
    dense = Model.load(d, quant="f32")
    q8 = Model.load(d)
    q4 = Model.load(d, quant="q4_0")
    assert (dense.files.quant, q8.files.quant, q4.files.quant) == ("f32", "q8_0", "q4_0")
    assert len({m.files.ready_dir for m in (dense, q8, q4)}) == 3
    assert all(isinstance(w, QWeight) for _, w in q8.weights.matrices())
    assert q8.weight_status()["weight_types"] == {"Q8_0": 1 + 4 * cfg.n_layers}
    assert not any(isinstance(w, QWeight) for _, w in dense.weights.matrices())
    assert default_quant(270_000_000) == "q8_0" and default_quant(12_000_000_000) == "q4_0"
    ids = list(range(4, 124))
    want = forward(dense.config, dense.weights, ids, KVCache(dense.config, 128), logits="all")
    errs = []
    for m in (q8, q4):
        got = forward(m.config, m.weights, ids, KVCache(m.config, 128), logits="all")
        assert got is not None and want is not None
        lp, ref = log_softmax(got), log_softmax(want)
        top = np.argsort(ref, axis=-1)[:, -5:]  # (T, 5) the fp32 model's top 5
        err = float(np.abs(np.take_along_axis(lp, top, -1)
                           - np.take_along_axis(ref, top, -1)).max())
        print(f"{m.files.quant}: max |d logprob| {err:.4f}")
        errs.append(err)
    # a tiny random model is chaotic (the shipped model's figures: scripts/quant_quality.py);
    # measured 0.11 and 1.8 nats here: 8-bit is much the closer
    assert errs[0] < errs[1] / 4 and errs[0] <= 0.25 and errs[1] <= 3.0, errs
    with pytest.raises(ValueError, match="q3_x"):
        Model.load(d, quant="q3_x")
