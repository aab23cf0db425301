"""A loaded model: config, weights and tokenizer together, plus BLAS / kernel thread pinning."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from engine.config import ModelConfig
from engine.kernels import quantized
from engine.kernels.fused import BACKEND as fused_backend
from engine.kv_cache import KVCache
from engine.model import Weights
from engine.tokenizer import Tokenizer
from engine.weights import (
    ENGINE_READY_VERSION,
    ModelFiles,
    Progress,
    load_model_files,
    release_mapped_pages,
)

ENGINE_VERSION = "0.2.0"  # bump when numerics change (invalidates persisted prompt caches)


def default_threads() -> int:
    """BLAS threads: `GEMMA_LSP_THREADS`, else the cores this process may use."""
    env = os.environ.get("GEMMA_LSP_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"GEMMA_LSP_THREADS must be an integer, got {env!r}") from None
        if n > 0:
            return n
        raise ValueError(f"GEMMA_LSP_THREADS must be positive, got {n}")
    return max(1, len(os.sched_getaffinity(0)))


def pin_blas_threads(n: int | None = None) -> tuple[str, int]:
    """Limit BLAS and the quantized kernels to `n` threads (oversubscription costs 10x).
    Returns (library, threads)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    n = default_threads() if n is None else n
    quantized.set_threads(n)
    threadpool_limits(limits=n, user_api="blas")
    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    name = ",".join(f"{i.get('internal_api')} {i.get('version')}" for i in libs) or "unknown"
    return name, n


@dataclass(frozen=True)
class Model:
    config: ModelConfig
    weights: Weights
    tokenizer: Tokenizer
    files: ModelFiles

    @classmethod
    def load(cls, source: str | Path | None = None, progress: Progress | None = None,
             quant: str | None = None) -> Model:
        """Load a model (the embedded Gemma 3 270M when `source` is None); `progress` hears
        about a first build; `quant`: the type a Hugging Face checkpoint is quantized to
        (engine.weights.load_model_files)."""
        files = (load_model_files(source, quant) if progress is None
                 else load_model_files(source, quant, progress))
        weights = Weights.from_packed(files.config, files.tensors)
        return cls(files.config, weights, files.tokenizer, files)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies what cached K/V depends on: model file, tokenizer, dtype, engine version."""
        h = hashlib.sha256()
        h.update(self.files.source_sha256.encode())
        for name in sorted(p.name for p in self.files.ready_dir.glob("tokenizer*.json")):
            h.update((self.files.ready_dir / name).read_bytes())
        kind = "q" if self.weights.tok_embd is not None else "fp32"
        h.update(f"{kind}|ready{ENGINE_READY_VERSION}|engine{ENGINE_VERSION}".encode())
        return h.hexdigest()

    @property
    def name(self) -> str:
        return self.files.source.name

    def warm_up(self) -> None:
        """Run one token so every weight page is mapped in before the first real request."""
        from engine.model import forward

        forward(self.config, self.weights, [self.tokenizer.bos_id], self.new_kv(1))

    def build_quantized(self, threads: int) -> float:
        """Build the quantized kernels now (they are built on first use otherwise): one graph
        per layer where the trunk is quantized (its matrices then get no sessions of their
        own), else one per matrix; returns the seconds it took."""
        t0 = time.perf_counter()
        w = self.weights
        if w.tok_embd is not None:  # first, while little else is resident (peak RSS)
            w.tok_embd.build(threads)
            # the LM head reads its packed copy from now on, the embedding's rows are read a
            # few at a time: the mapped copy's pages go (RSS -183 MB on the shipped model)
            for p in w.tok_embd.parts:
                for a in (p.q, p.scales, p.zp, p.offsets):
                    if a is not None:
                        release_mapped_pages(a)
        if w.fused is not None:
            w.fused.build(threads)
        for _, m in w.matrices():
            if isinstance(m, quantized.QWeight) and w.fused is None:
                m.build(threads)
        return time.perf_counter() - t0

    def build_kernels(self, threads: int, background: bool = False) -> threading.Thread | None:
        """Build the packed kernels (engine/kernels) on `threads` threads; until they are
        ready numpy does their work. With `background`, in a thread of its own, returned (join
        it before the process exits: onnxruntime aborts if torn down mid-build)."""
        kernels = self.weights.kernels
        if kernels is None:
            return None
        if not background:
            kernels.build(threads)
            return None
        thread = threading.Thread(target=kernels.build, args=(threads,), name="kernels",
                                  daemon=True)
        thread.start()
        return thread

    def weight_status(self) -> dict[str, object]:
        """What `status` says of the weights: matrix types, bytes, K/V bytes per token."""
        types: dict[str, int] = {}
        nbytes = 0
        for _, m in self.weights.matrices():
            for t in (m.types if isinstance(m, quantized.QWeight) else ("F32",)):
                types[t] = types.get(t, 0) + 1
            nbytes += m.nbytes
        nbytes += sum(a.nbytes for layer in self.weights.layers for a in vars(layer).values()
                      if isinstance(a, np.ndarray) and a.ndim == 1)
        return {"weight_types": dict(sorted(types.items())), "weight_bytes": nbytes,
                "kv_bytes_per_token": self.config.kv_bytes_per_token,
                "quant": self.files.quant}

    def kernel_status(self) -> dict[str, object]:
        kernels = self.weights.kernels
        if self.weights.tok_embd is not None:  # quantized: MatMulNBits kernels
            fused = self.weights.fused is not None and self.weights.fused.ready
            return {"state": "ready", "backend": fused_backend if fused else quantized.BACKEND,
                    "threads": quantized.threads(),
                    "packed_bytes": sum(m.nbytes for _, m in self.weights.matrices())}
        if kernels is None:
            return {"state": "off: none for this model", "backend": "numpy"}
        st = kernels.stats
        return {"state": st.state,
                "backend": ("onnxruntime, matrices packed once (2+ rows)" if kernels.ready
                            else "numpy"),
                "matrices": st.matrices, "packed_bytes": st.packed_bytes,
                "threads": st.threads, "build_s": st.build_s}

    def new_kv(self, capacity: int) -> KVCache:
        return KVCache(self.config, min(capacity, self.config.context_length))
