"""Gemma 4 assistant models (multi-token prediction drafters): loading one and drafting.

An assistant checkpoint (`model_type` `gemma4_assistant` / `gemma4_unified_assistant`) is a
small Gemma 4 text stack with no K/V projections: every layer attends to the *target's*
K/V (its last full-attention and last sliding layer). Its input is the target's final-normed
hidden state before a token concatenated with that token's scaled target embedding, projected
down (`pre_projection`); its output gives draft logits (own tied head, optionally through the
ordered-embedding centroids) and, projected back up (`post_projection`), the hidden state the
next draft starts from. Every draft of a round sits at the position of the newest token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.model import Weights, apply_rope, gelu_tanh_mul, rmsnorm, rope_tables

ASSISTANT_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")


@dataclass(frozen=True)
class AssistantLayer:
    attn_norm: np.ndarray  # (Da,)
    wq: np.ndarray  # (H*hd, Da)
    q_norm: np.ndarray  # (hd,)
    wo: np.ndarray  # (Da, H*hd)
    post_attn_norm: np.ndarray  # (Da,)
    ffn_norm: np.ndarray  # (Da,)
    w_gate_up: np.ndarray  # (2*ff, Da)
    w_down: np.ndarray  # (Da, ff)
    post_ffn_norm: np.ndarray  # (Da,)
    layer_scalar: np.ndarray | None  # (1,)


@dataclass(frozen=True)
class Assistant:
    name: str
    config: ModelConfig  # the assistant's own stack (its K/V geometry is the target's)
    backbone_d: int  # the target's hidden size it was trained with
    embed: np.ndarray  # (V, Da) its own embedding, used only as the LM head
    pre_projection: np.ndarray  # (Da, 2*Dt)
    post_projection: np.ndarray  # (Dt, Da)
    final_norm: np.ndarray  # (Da,)
    layers: tuple[AssistantLayer, ...]
    centroids: np.ndarray | None = None  # (C, Da) ordered embeddings: cluster scores
    clusters: np.ndarray | None = None  # (C, V/C) token ids of each cluster
    top_clusters: int = 32

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, source: str | Path) -> Assistant:
        """An assistant from a checkpoint directory or a cached Hugging Face repo id."""
        from engine import hf

        directory = hf.resolve(source)
        if not directory.is_dir():
            raise ValueError(f"draft model {source}: an assistant is a checkpoint directory "
                             "(config.json + safetensors), not a single file")
        try:
            raw = json.loads((directory / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{directory}: no readable config.json ({e})") from e
        kind = raw.get("model_type")
        if kind not in ASSISTANT_TYPES:
            raise ValueError(f"draft model {source}: model_type {kind!r} is not a Gemma 4 "
                             f"assistant (want one of {', '.join(ASSISTANT_TYPES)})")
        text = dict(raw.get("text_config") or {})
        if not text.get("num_hidden_layers"):
            raise ValueError(f"draft model {source}: config.json has no text_config")
        text["num_kv_shared_layers"] = 0  # its geometry; the K/V itself comes from the target
        text["use_double_wide_mlp"] = False
        cfg = hf._gemma4_config(text)
        tensors: dict[str, np.ndarray] = {}
        from engine.weights import mmap_safetensors

        for f in hf.weight_files(directory):
            for name, arr in mmap_safetensors(f)[0].items():
                tensors[name] = np.ascontiguousarray(hf._fp32(arr)) if arr.dtype != np.int64 \
                    else np.asarray(arr)

        def get(name: str) -> np.ndarray:
            if name not in tensors:
                raise ValueError(f"draft model {source}: tensor {name} is missing")
            return tensors[name]

        layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            layers.append(AssistantLayer(
                attn_norm=get(p + "input_layernorm.weight"),
                wq=get(p + "self_attn.q_proj.weight"),
                q_norm=get(p + "self_attn.q_norm.weight"),
                wo=get(p + "self_attn.o_proj.weight"),
                post_attn_norm=get(p + "post_attention_layernorm.weight"),
                ffn_norm=get(p + "pre_feedforward_layernorm.weight"),
                w_gate_up=np.concatenate([get(p + "mlp.gate_proj.weight"),
                                          get(p + "mlp.up_proj.weight")]),
                w_down=get(p + "mlp.down_proj.weight"),
                post_ffn_norm=get(p + "post_feedforward_layernorm.weight"),
                layer_scalar=tensors.get(p + "layer_scalar"),
            ))
        embed = get("model.embed_tokens.weight")
        centroids = clusters = None
        if raw.get("use_ordered_embeddings"):
            centroids = get("masked_embedding.centroids.weight")
            order = get("masked_embedding.token_ordering").astype(np.int64)
            clusters = order.reshape(centroids.shape[0], -1)  # (C, V/C)
        backbone = int(raw.get("backbone_hidden_size") or 0)
        pre = get("pre_projection.weight")
        if pre.shape != (cfg.d_model, 2 * backbone):
            raise ValueError(f"draft model {source}: pre_projection is {pre.shape}, expected "
                             f"({cfg.d_model}, {2 * backbone})")
        return cls(directory.name, cfg, backbone, embed, pre, get("post_projection.weight"),
                   get("model.norm.weight"), tuple(layers), centroids, clusters,
                   int(raw.get("centroid_intermediate_top_k") or 32))

    def check_target(self, target: ModelConfig) -> None:
        """ValueError unless this assistant can draft for `target` (sizes, K/V geometry)."""
        if target.arch != "gemma4":
            raise ValueError(f"a Gemma 4 assistant drafts for Gemma 4 models; the model is "
                             f"{target.arch}")
        if target.d_model != self.backbone_d:
            raise ValueError(f"the assistant was trained for hidden size {self.backbone_d}; "
                             f"the model has {target.d_model}")
        for i in range(self.config.n_layers):
            src = store_layer(target, self.config.sliding_layers[i])
            want = (target.head_dim_of(src), target.kv_heads(src))
            got = (self.config.head_dim_of(i), self.config.kv_heads(i))
            if want != got:
                raise ValueError(f"assistant layer {i} expects K/V of head dim / heads {got}; "
                                 f"the model's layer {src} has {want}")

    def drafter(self, target: Any, kv: KVCache, prompt: Sequence[int]) -> AssistantDrafter:
        self.check_target(target.config)
        return AssistantDrafter(self, target, kv)

    # ------------------------------------------------------------------ forward

    def step(self, target: ModelConfig, target_w: Weights, kv: KVCache, token: int,
             h_target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One draft: logits (V,) for the token after `token`, and the next hidden (Dt,).

        `h_target` is the target's final-normed hidden state (or the previous draft's
        projection) before `token`; `kv` holds the target's K/V for positions [0, length),
        `token` sits at position `length`.
        """
        cfg = self.config
        pos = kv.length
        H = cfg.n_heads
        # input: the token's scaled target embedding next to the target hidden, projected
        e = target_w.embed_rows(np.array([token]))[0] * np.float32(target.embed_scale)  # (Dt,)
        x = np.concatenate([e, h_target])[None, :] @ self.pre_projection.T  # (1, Da)
        kinds = cfg.sliding_layers
        for i, layer in enumerate(self.layers):
            local = kinds[i]
            hd, KV = cfg.head_dim_of(i), cfg.kv_heads(i)
            src = store_layer(target, local)
            if local:
                cos, sin = rope_tables(np.array([pos]), hd, cfg.rope_base_local)
                k0 = max(0, pos - (cfg.sliding_window + 1))  # the last W + 1 entries
            else:
                cos, sin = rope_tables(np.array([pos]), hd, cfg.rope_base_global,
                                       cfg.rope_scale_global, cfg.rope_fraction_global)
                k0 = 0  # every stored position
            # attention: query from the assistant stream, keys/values the target's
            h = rmsnorm(x, layer.attn_norm, cfg.norm_eps)  # (1, Da)
            q = (h @ layer.wq.T).reshape(1, H, hd)  # (1, H, hd)
            q = apply_rope(rmsnorm(q, layer.q_norm, cfg.norm_eps), cos, sin)[0]  # (H, hd)
            q = q * np.float32(cfg.attn_scale)  # (H, hd)
            k = kv.k[src, :KV, k0:pos, :hd]  # (KV, s, hd)
            v = kv.v[src, :KV, k0:pos, :hd]  # (KV, s, hd)
            qg = q.reshape(KV, H // KV, hd)  # (KV, G, hd): head h -> kv head h // G
            scores = qg @ k.transpose(0, 2, 1)  # (KV, G, s)
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            att = (scores @ v).reshape(1, H * hd)  # (1, H*hd)
            x = x + rmsnorm(att @ layer.wo.T, layer.post_attn_norm, cfg.norm_eps)  # (1, Da)
            # MLP: pre-norm, GeGLU-tanh, down projection, post-norm, residual
            ff = layer.w_down.shape[1]
            h = rmsnorm(x, layer.ffn_norm, cfg.norm_eps)  # (1, Da)
            gu = h @ layer.w_gate_up.T  # (1, 2*ff)
            g = np.empty((1, ff), dtype=np.float32)  # (1, ff)
            gelu_tanh_mul(g, gu[:, :ff], gu[:, ff:])
            x = x + rmsnorm(g @ layer.w_down.T, layer.post_ffn_norm, cfg.norm_eps)  # (1, Da)
            if layer.layer_scalar is not None:
                x = x * layer.layer_scalar  # (1, Da)
        x = rmsnorm(x, self.final_norm, cfg.norm_eps)[0]  # (Da,)
        h_next = self.post_projection @ x  # (Dt,)
        return self.logits(x), h_next

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Draft logits (V,) from the final-normed assistant state (no softcap)."""
        if self.centroids is None or self.clusters is None:
            return self.embed @ x  # (V,)
        # ordered embeddings: score only the tokens of the best clusters, the rest below them
        best = np.argpartition(-(self.centroids @ x), self.top_clusters - 1)[
            : self.top_clusters]  # (top,)
        ids = self.clusters[best].reshape(-1)  # (top * V/C,)
        picked = self.embed[ids] @ x  # (top * V/C,)
        out = np.full(self.embed.shape[0], picked.min() - 1.0, dtype=np.float32)  # (V,)
        out[ids] = picked
        return out


def store_layer(target: ModelConfig, sliding: bool) -> int:
    """The target layer whose K/V an assistant layer of this kind attends: the source of the
    target's last layer of that kind."""
    last = max((i for i, s in enumerate(target.sliding_layers) if s == sliding), default=None)
    if last is None:
        raise ValueError(f"the model has no {'sliding' if sliding else 'full'}-attention layer "
                         "for the assistant to attend")
    return target.source(last)


class AssistantDrafter:
    """Drafts greedily with an assistant for one request (needs the target's hidden state)."""

    needs_hidden = True

    def __init__(self, assistant: Assistant, target: Any, kv: KVCache) -> None:
        self.assistant = assistant
        self.target = target
        self.kv = kv
        self.vocab = int(target.tokenizer.vocab_size)
        self.last: int | None = None
        self.hidden: np.ndarray | None = None  # the target's before `last`

    def append(self, tokens: Sequence[int], hidden: np.ndarray | None = None) -> None:
        if tokens:
            self.last = int(tokens[-1])
        self.hidden = None if hidden is None else np.asarray(hidden, dtype=np.float32)

    def propose(self, k: int) -> list[int]:
        if self.last is None or self.hidden is None or k <= 0:
            return []  # right after prefill there is no hidden state yet: decode plainly
        tok, h = self.last, self.hidden
        cfg, embd = self.target.config, self.target.weights
        out: list[int] = []
        for _ in range(k):
            logits, h = self.assistant.step(cfg, embd, self.kv, tok, h)
            tok = int(np.argmax(logits[: self.vocab]))
            out.append(tok)
        return out
