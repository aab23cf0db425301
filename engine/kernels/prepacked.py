"""Matmuls of a few rows by the model's constant fp32 matrices, by onnxruntime with each
matrix packed once; `Kernels.linear(x, W)` picks that or numpy per call.

OpenBLAS packs a matrix operand on every sgemm call. For one row numpy uses GEMV (no
packing); from two rows up the copy is the cost. Measured here (2 threads, Gemma 3 270M):

| matrix | numpy, 1 row | numpy, 2 / 10 / 45 rows | packed kernel, 2 / 10 / 45 rows |
|---|---|---|---|
| LM head 640 x 262144 | 24 ms | 122 / 130 / 200 ms | 29 / 40 / 90 ms |
| w_gate_up 4096 x 640 | 0.08 ms | 0.95 / 1.11 / 2.1 ms | 0.12 / 0.28 / 1.3 ms |
| w_down 640 x 2048 | 0.04 ms | 0.42 / 0.67 / 1.3 ms | 0.08 / 0.27 / 1.9 ms |

so a 2-row forward cost 2.1x a one-row decode step and a 10-row one 2.7x: what verifying
drafted tokens and scoring next-edit candidates run. onnxruntime's CPU Gemm/MatMul packs a
constant operand when its session is built and reuses it (fp32 throughout; results differ
from numpy's by summation order only, ~3e-6 on logits of magnitude ~30).

The cost: a packed copy of every matrix (as large as the fp32 weights, in memory, not on
disk) and a few seconds to build, so the engine builds them in the background once it serves
and numpy works until then. Without onnxruntime, or if a build fails, numpy does everything
(a warning says why). Activations stay fp32.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.kernels.onnx_graph import Graph

log = logging.getLogger(__name__)

MIN_ROWS = 2  # below this numpy's GEMV is as fast (no packing)
MAX_ROWS_TRUNK = 32  # past this numpy's sgemm amortises its packing on the trunk's matrices


class PrepackedMatmul:
    """`x @ w.T` for `w` (N, K) (`transposed`, the engine's `(out, in)` layout), or `x @ w`
    for `w` (K, N). `w` is fp32, C-contiguous, kept by reference and never copied here."""

    def __init__(self, w: np.ndarray, name: str, *, transposed: bool) -> None:
        assert w.ndim == 2 and w.dtype == np.float32 and w.flags["C_CONTIGUOUS"], (
            name, w.shape, w.dtype)
        self.w = w
        self.name = name
        self.transposed = transposed
        self._run: Any = None  # the session's bound run call, once built
        self._keep: list[object] = []  # the session and the OrtValue over w it reads

    @property
    def ready(self) -> bool:
        return self._run is not None

    def build(self, threads: int) -> None:
        """Build the session (raises if onnxruntime is missing or refuses the graph)."""
        n, k = self.w.shape if self.transposed else self.w.shape[::-1]
        f32 = np.dtype(np.float32)
        g = Graph()
        w = g.external("W", self.w)  # C-contiguous fp32: read in place, not copied
        g.rename(g.add("Gemm", ["X", w], transB=1) if self.transposed
                 else g.add("MatMul", ["X", w]), "Y")
        self._run, self._keep = g.session([("X", f32, ["rows", k])], [("Y", f32, ["rows", n])],
                                          self.name, threads)

    def drop(self) -> None:
        """Forget the session (its packed copy goes with it)."""
        self._run, self._keep = None, []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(M, K) -> (M, N) by the packed kernel (built first)."""
        assert self._run is not None, self.name
        out = self._run(["Y"], {"X": np.ascontiguousarray(x, dtype=np.float32)}, None)
        return out[0]  # (M, N)


@dataclass
class KernelStats:
    state: str = "not built"  # "building", "ready", "off: <why>"
    matrices: int = 0
    packed_bytes: int = 0
    threads: int = 0
    build_s: float = 0.0


class Kernels:
    """The packed kernels of one model's matrices, found by the matrix itself (its identity:
    the forward pass passes the arrays it holds). Built once, in a thread if asked; each
    `linear` call uses a kernel only once all are built."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[PrepackedMatmul, int]] = {}  # id(w) -> (kernel, max rows)
        self._ready = False
        self._lock = threading.Lock()
        self._blas: list[Any] = []  # numpy's BLAS pools (threadpoolctl controllers)
        self.stats = KernelStats()

    def add(self, w: np.ndarray, name: str, *, transposed: bool, max_rows: int) -> None:
        """Register `w` ((N, K) if `transposed`, else (K, N)) for 2..max_rows rows."""
        assert not self._ready
        self._by_id[id(w)] = (PrepackedMatmul(w, name, transposed=transposed), max_rows)

    def build(self, threads: int) -> None:
        """Build every kernel (once). On any failure numpy keeps doing all the work."""
        with self._lock:
            if self.stats.state != "not built":
                return
            self.stats.state = "building"
            t0 = time.perf_counter()
            try:
                for k, _ in self._by_id.values():
                    k.build(threads)
            except Exception as e:  # noqa: BLE001 - numpy keeps doing the work
                self.stats.state = f"off: {type(e).__name__}: {e}"
                log.warning("no packed kernels (%s: %s); numpy multiplies everything",
                            type(e).__name__, e)
                for k, _ in self._by_id.values():
                    k.drop()
                return
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController().select(user_api="blas").lib_controllers
            self.stats = KernelStats("ready", len(self._by_id),
                                     sum(int(k.w.nbytes) for k, _ in self._by_id.values()),
                                     threads, round(time.perf_counter() - t0, 2))
            self._ready = True
            log.info("packed kernels ready: %d matrices, %.0f MB, %.1fs (%d threads)",
                     self.stats.matrices, self.stats.packed_bytes / 2**20, self.stats.build_s,
                     threads)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def size(self) -> int:
        """How many matrices are registered."""
        return len(self._by_id)

    @contextmanager
    def scope(self, rows: int) -> Iterator[None]:
        """Around a forward over `rows` rows: while the packed kernels do its matmuls,
        numpy's BLAS (attention's small products) runs on one thread. Its idle workers
        otherwise spin on the other core after every call and the kernels' threads wait for
        it: measured, a 10-row forward took 115 ms that way and 98 ms this way."""
        if not (self._ready and MIN_ROWS <= rows <= MAX_ROWS_TRUNK and self._blas):
            yield
            return
        before = [c.get_num_threads() for c in self._blas]
        for c in self._blas:
            c.set_num_threads(1)
        try:
            yield
        finally:
            for c, n in zip(self._blas, before, strict=True):
                c.set_num_threads(n)

    def _kernel_for(self, x: np.ndarray, w: np.ndarray) -> PrepackedMatmul | None:
        """The packed kernel that multiplies x by w, if built and x's rows are its range."""
        if not self._ready or x.shape[0] < MIN_ROWS:
            return None
        found = self._by_id.get(id(w))
        return found[0] if found is not None and x.shape[0] <= found[1] else None

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """x (M, K) @ w.T for the engine's `(out, in)` w -> (M, N)."""
        k = self._kernel_for(x, w)
        return x @ w.T if k is None else k(x)  # (M, N)

    def matmul(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """x (M, K) @ w for w (K, N) (the tied LM head) -> (M, N)."""
        k = self._kernel_for(x, w)
        return x @ w if k is None else k(x)  # (M, N)
