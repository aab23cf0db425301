"""`x @ B` for a constant fp32 B by onnxruntime's MatMul, which packs B once.

OpenBLAS packs its B operand on every sgemm call. For the tied LM head of Gemma 3 270M (B is
640 x 262144, 671 MB) that copy is the whole cost at a few rows: measured here (2 threads),
numpy takes 122 ms for 4 rows and 133 ms for 16, against 24 ms for one row (GEMV needs no
packing). onnxruntime's CPU MatMul packs a constant B when its session is built and reuses
the packed copy: 29 ms for 4 rows, 33 ms for 8, 45 ms for 16, 90 ms for 48, fp32 throughout
(|difference| ~3e-6 on logits of magnitude ~30: summation order only). That is what verifying
drafted tokens and scoring next-edit candidates multiply.

The cost: the packed copy (the size of B, in memory, not on disk) and ~1.3 s to build it, so
the engine builds it in the background once it serves and uses numpy until it is ready.
Single rows stay with numpy's GEMV, which is as fast. Without onnxruntime, or if building
fails, numpy does everything (a warning says why).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from engine.kernels.onnx_graph import Initializer, Node, model_bytes

log = logging.getLogger(__name__)

MIN_ROWS = 2  # from this many rows up the packed kernel beats BLAS (one row: GEMV, no packing)


class PrepackedMatmul:
    """Multiplies rows by `b` (K, N), fp32, C-contiguous (kept by reference, never copied)."""

    def __init__(self, b: np.ndarray, name: str) -> None:
        assert b.ndim == 2 and b.dtype == np.float32 and b.flags["C_CONTIGUOUS"], (
            b.shape, b.dtype)
        self.b = b
        self.name = name
        self.error: str | None = None  # why the kernel is not in use, once building failed
        self.build_s = 0.0
        self.threads = 0
        self._session: object | None = None
        self._value: object | None = None  # the OrtValue over b: must outlive the session
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._session is not None

    @property
    def packed_bytes(self) -> int:
        """Memory the packed copy holds (0 until built)."""
        return int(self.b.nbytes) if self.ready else 0

    def build(self, threads: int) -> bool:
        """Build the session (once; later calls return at once). False if it cannot be."""
        with self._lock:
            if self._session is not None or self.error is not None:
                return self._session is not None
            t0 = time.perf_counter()
            try:
                self._session = self._make_session(threads)
            except Exception as e:  # noqa: BLE001 - numpy keeps doing the work
                self.error = f"{type(e).__name__}: {e}"
                log.warning("%s: no packed kernel (%s); numpy multiplies it", self.name,
                            self.error)
                return False
            self.build_s = time.perf_counter() - t0
            self.threads = threads
            log.info("%s: packed kernel ready in %.1fs (%d threads)", self.name, self.build_s,
                     threads)
            return True

    def _make_session(self, threads: int) -> object:
        import onnxruntime as ort

        k, n = self.b.shape
        f32 = np.dtype(np.float32)
        proto = model_bytes(
            [Node("MatMul", ["X", "B"], ["Y"])],
            [("X", f32, ["rows", k])], [("Y", f32, ["rows", n])],
            [Initializer("B", f32, (k, n), location="B", offset=0, length=int(self.b.nbytes))])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # no spinning: between calls the numpy side needs the cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._value = ort.OrtValue.ortvalue_from_numpy(self.b)
        so.add_external_initializers(["B"], [self._value])
        return ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (M, K) @ b -> (M, N): the packed kernel when built and M >= MIN_ROWS."""
        session = self._session
        if session is None or x.shape[0] < MIN_ROWS:
            return x @ self.b  # (M, N)
        out = session.run(None, {"X": np.ascontiguousarray(x, dtype=np.float32)})  # type: ignore[attr-defined]
        return out[0]  # (M, N)
