"""A loaded model: config, weights and tokenizer together, plus BLAS thread pinning."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.model import Weights
from engine.tokenizer import Tokenizer
from engine.weights import ENGINE_READY_VERSION, ModelFiles, Progress, load_model_files

ENGINE_VERSION = "0.1.1"  # bump when numerics change (invalidates persisted prompt caches)


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
    """Limit BLAS to `n` threads (oversubscription costs 10x). Returns (library, threads)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    n = default_threads() if n is None else n
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
    def load(cls, source: str | Path | None = None,
             progress: Progress | None = None) -> Model:
        """Load a model (the embedded Gemma 3 270M when `source` is None); `progress` hears
        about a first build (engine.weights)."""
        files = load_model_files(source) if progress is None else load_model_files(source,
                                                                                   progress)
        weights = Weights.from_packed(files.config, files.tensors)
        return cls(files.config, weights, files.tokenizer, files)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies what cached K/V depends on: model file, tokenizer, dtype, engine version."""
        h = hashlib.sha256()
        h.update(self.files.source_sha256.encode())
        for name in sorted(p.name for p in self.files.ready_dir.glob("tokenizer*.json")):
            h.update((self.files.ready_dir / name).read_bytes())
        h.update(f"fp32|ready{ENGINE_READY_VERSION}|engine{ENGINE_VERSION}".encode())
        return h.hexdigest()

    @property
    def name(self) -> str:
        return self.files.source.name

    def warm_up(self) -> None:
        """Run one token so every weight page is mapped in before the first real request."""
        from engine.model import forward

        forward(self.config, self.weights, [self.tokenizer.bos_id], self.new_kv(1))

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

    def kernel_status(self) -> dict[str, object]:
        kernels = self.weights.kernels
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
