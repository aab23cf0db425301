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
class MediaConfig:
    """Gemma 4 unified's soft-token inputs: the placeholder ids and the embedders' shapes.

    `patch_px` is the model patch (vision patch_size x pooling_kernel_size, 48 in the released
    models); 0 means the model has no vision embedder, `audio_frame` 0 no audio embedder.
    """

    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    audio_token_id: int
    boa_token_id: int
    eoa_token_id: int
    patch_px: int = 0  # side of one image soft token's pixel block
    vision_dim: int = 0  # mm_embed_dim
    posemb_size: int = 0  # rows of the x/y position table
    vision_eps: float = 1e-6  # the weightless RMSNorm before the projection
    audio_frame: int = 0  # samples per audio soft token (640 = 40 ms at 16 kHz)
    audio_eps: float = 1e-6

    @property
    def vision(self) -> bool:
        return self.patch_px > 0

    @property
    def audio(self) -> bool:
        return self.audio_frame > 0


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
    # Gemma 4 (empty tuples / defaults: Gemma 3, the same for every layer)
    layer_head_dims: tuple[int, ...] = ()  # per layer (full-attention layers are wider)
    layer_kv_heads: tuple[int, ...] = ()  # per layer
    layer_ff_dims: tuple[int, ...] = ()  # per layer (double-wide MLPs on shared-K/V layers)
    k_eq_v: tuple[bool, ...] = ()  # per layer: V is the raw K projection (no wv)
    kv_source: tuple[int, ...] = ()  # per layer: the layer whose K/V it attends (K/V sharing)
    v_norm: bool = False  # RMS-normalise V (no scale)
    rope_fraction_global: float = 1.0  # share of rotated pairs on full-attention layers
    media: MediaConfig | None = None  # Gemma 4 unified: image / audio soft tokens

    def __post_init__(self) -> None:
        assert len(self.sliding_layers) == self.n_layers
        for per_layer in (self.layer_head_dims, self.layer_kv_heads, self.layer_ff_dims,
                          self.k_eq_v, self.kv_source):
            assert len(per_layer) in (0, self.n_layers), per_layer
        for i in range(self.n_layers):
            assert self.n_heads % self.kv_heads(i) == 0
            assert self.source(i) <= i and self.source(self.source(i)) == self.source(i)

    def head_dim_of(self, i: int) -> int:
        return self.layer_head_dims[i] if self.layer_head_dims else self.head_dim

    def kv_heads(self, i: int) -> int:
        return self.layer_kv_heads[i] if self.layer_kv_heads else self.n_kv_heads

    def ff_of(self, i: int) -> int:
        return self.layer_ff_dims[i] if self.layer_ff_dims else self.ff_dim

    def source(self, i: int) -> int:
        return self.kv_source[i] if self.kv_source else i

    def shares_kv(self, i: int) -> bool:
        return self.source(i) != i

    def v_is_k(self, i: int) -> bool:
        return bool(self.k_eq_v and self.k_eq_v[i])

    @property
    def head_dim_max(self) -> int:
        return max(self.layer_head_dims or (self.head_dim,))

    @property
    def kv_heads_max(self) -> int:
        return max(self.layer_kv_heads or (self.n_kv_heads,))

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.query_pre_attn_scalar)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.kv_heads_max * self.head_dim_max * 4

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        for key, value in data.items():
            if isinstance(value, list):
                data[key] = tuple(value)
        if data.get("media") is not None:
            data["media"] = MediaConfig(**data["media"])
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
