"""The model's shape: a frozen config built once from GGUF metadata (or HF config.json)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Gemma 3 facts that GGUF metadata does not carry (llama.cpp hard-codes them too).
GEMMA3_SLIDING_PERIOD = 6  # layer i is global iff (i + 1) % 6 == 0
GEMMA3_LOCAL_ROPE_BASE = 10_000.0


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about a Gemma model, and nothing else."""

    arch: str  # "gemma3"
    vocab_size: int  # rows of the embedding / LM head
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ff_dim: int
    context_length: int
    sliding_window: int
    sliding_layers: tuple[bool, ...]  # per layer: True if the layer uses the sliding window
    rope_base_global: float
    rope_base_local: float
    rope_scale_global: float  # linear position scaling on global layers (1.0 = none)
    norm_eps: float
    query_pre_attn_scalar: float  # scores are scaled by this ** -0.5
    final_logit_softcap: float | None = None

    def __post_init__(self) -> None:
        assert len(self.sliding_layers) == self.n_layers
        assert self.n_heads % self.n_kv_heads == 0

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.query_pre_attn_scalar)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        data["sliding_layers"] = tuple(data["sliding_layers"])
        return cls(**data)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, vocab_size: int) -> ModelConfig:
        """Build from GGUF key/values (`general.architecture`, `{arch}.*`)."""
        arch = meta.get("general.architecture")
        if arch != "gemma3":
            raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: 'gemma3')")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF metadata lacks {arch}.{key}")
            return value

        n_layers = int(get("block_count"))
        n_heads = int(get("attention.head_count"))
        d_model = int(get("embedding_length"))
        head_dim = int(get("attention.key_length", d_model // n_heads))
        sliding = tuple((i + 1) % GEMMA3_SLIDING_PERIOD != 0 for i in range(n_layers))
        scaling_type = meta.get(f"{arch}.rope.scaling.type")
        scale = float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
        if scaling_type not in (None, "linear", "none"):
            raise ValueError(f"unsupported rope scaling type {scaling_type!r}")
        if scaling_type == "none":
            scale = 1.0
        # llama.cpp: 27B scales by d_model / n_heads, every other size by head_dim.
        qpas = float(d_model // n_heads) if n_layers == 62 else float(head_dim)
        return cls(
            arch="gemma3",
            vocab_size=int(vocab_size),
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ff_dim=int(get("feed_forward_length")),
            context_length=int(get("context_length")),
            sliding_window=int(get("attention.sliding_window")),
            sliding_layers=sliding,
            rope_base_global=float(get("rope.freq_base", 1_000_000.0)),
            rope_base_local=GEMMA3_LOCAL_ROPE_BASE,
            rope_scale_global=scale,
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            query_pre_attn_scalar=qpas,
        )
