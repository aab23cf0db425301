"""A tiny random Gemma 4 unified checkpoint (text + encoder-free vision + audio) built with
transformers, saved as a checkpoint directory the engine loads, and small media files.

Needs the `ref` extra (torch, transformers). The image processor of transformers needs
torchvision, which has no CPU wheel matching this torch: tests feed the model tensors made by
the engine's own preprocessing (checked separately against transformers' resize rule and
block order).
"""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 512
IMAGE_ID, VIDEO_ID, AUDIO_ID, BOI_ID, EOI_ID, BOA_ID, EOA_ID = range(500, 507)
SPECIALS = {"<|image|>": IMAGE_ID, "<|video|>": VIDEO_ID, "<|audio|>": AUDIO_ID,
            "<|image>": BOI_ID, "<image|>": EOI_ID, "<|audio>": BOA_ID, "<audio|>": EOA_ID,
            "<|turn>": 507, "<turn|>": 508}
PATCH_PX = 12  # patch_size 4 x pooling 3
AUDIO_FRAME = 40


def write_tokenizer(path: Path) -> None:
    """Byte-fallback BPE over single characters, Gemma's specials at the config's ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab |= {f"<0x{b:02X}>": 4 + b for b in range(256)}
    chars = "▁" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" \
        + "\n.,:;()[]{}=+-*/_'\"#<>!?"
    for c in chars:
        vocab[c] = len(vocab)
    while len(vocab) < IMAGE_ID:
        vocab[f"▁w{len(vocab)}"] = len(vocab)
    for piece, i in sorted(SPECIALS.items(), key=lambda kv: kv[1]):
        vocab[piece] = i
    while len(vocab) < VOCAB:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True)
                            for p in ["<pad>", "<eos>", "<bos>", "<unk>", *SPECIALS]])
    tok.save(str(path))


def build(directory: Path, *, seed: int = 0, vision: bool = True, audio: bool = True) -> Any:
    """Save a random Gemma4UnifiedForConditionalGeneration (fp32) with a tokenizer; returns
    the transformers model (eval mode) for reference outputs."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    text = tf.Gemma4UnifiedTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
        final_logit_softcapping=30.0, max_position_embeddings=4096,
        attn_implementation="eager")
    cfg = tf.Gemma4UnifiedConfig(
        text_config=text,
        vision_config=tf.Gemma4UnifiedVisionConfig(
            patch_size=4, pooling_kernel_size=3, mm_embed_dim=32, mm_posemb_size=128,
            output_proj_dims=32) if vision else None,
        audio_config=tf.Gemma4UnifiedAudioConfig(audio_embed_dim=AUDIO_FRAME) if audio else None,
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, audio_token_id=AUDIO_ID,
        boi_token_id=BOI_ID, eoi_token_id=EOI_ID, boa_token_id=BOA_ID, eoa_token_index=EOA_ID)
    model = tf.Gemma4UnifiedForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "_ln" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            elif "pos_embedding" in name:
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.04 if "language_model" in name else 0.1)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    write_tokenizer(directory / "tokenizer.json")
    gen = {"bos_token_id": 2, "eos_token_id": [1, SPECIALS["<turn|>"]], "pad_token_id": 0}
    (directory / "generation_config.json").write_text(json.dumps(gen))
    return model


# ----------------------------------------------------------------------------- media files


def png(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = len(mode)
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze() if channels == 1 else arr, mode).save(buf, "PNG")
    return buf.getvalue()


def wav(seconds: float, rate: int = 16_000, channels: int = 1, bits: int = 16,
        freq: float = 440.0, float_samples: bool = False) -> bytes:
    """A sine tone as WAV bytes: PCM (8/16/24/32-bit) or IEEE float (32-bit)."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    x = 0.5 * np.sin(2 * math.pi * freq * t)
    x = np.repeat(x[:, None], channels, axis=1)
    if float_samples:
        data, tag = x.astype("<f4").tobytes(), 3
        bits = 32
    elif bits == 8:
        data, tag = np.round(x * 127 + 128).astype(np.uint8).tobytes(), 1
    elif bits == 24:
        v = np.round(x * (2**23 - 1)).astype(np.int32).reshape(-1)
        b = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], axis=1).astype(np.uint8)
        data, tag = b.tobytes(), 1
    else:
        data = np.round(x * (2 ** (bits - 1) - 1)).astype("<i2" if bits == 16 else "<i4").tobytes()
        tag = 1
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def start_engine(runtime: Path, env: dict[str, str], *args: str) -> Any:
    """A real `gemma-lsp engine` with its socket in `runtime` (made private); returns the
    process once the socket exists."""
    import subprocess
    import sys
    import time

    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = (runtime / "engine.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gemma_lsp", "engine", "--no-persist", "--idle-timeout", "0",
         *args], env=dict(env, GEMMA_LSP_RUNTIME_DIR=str(runtime)), stdout=log,
        stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (runtime / "engine.sock").exists():
        assert proc.poll() is None, (runtime / "engine.log").read_text()
        assert time.monotonic() < deadline, "engine did not start"
        time.sleep(0.1)
    return proc


def stop_engine(proc: Any) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
