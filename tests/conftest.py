"""Shared fixtures: the real embedded model, loaded once per test session; how closely two
paths through its quantized weights agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# copied from the project's reference data (tests/data/README-reference.md says what it is):
# tests never read anything outside the clone
DATA = ROOT / "tests" / "data"
REFERENCE = DATA / "gemma3_270m_llamacpp.jsonl"
TYPING_BASE = DATA / "typing_base.py.txt"

# Two paths through the shipped (quantized) model agree to this, in logits and logprobs:
# MatMulNBits on int8 activations plus their rounding residual (a few rows: decode,
# verification, scoring; ~3e-5 relative a matmul) and the dequantized fp32 sgemm of long
# chunks differ by up to 0.012 in logits of magnitude ~30 (measured: prefill in chunks of 37
# rows then decode, against one 120-row forward). Each path alone is row-exact.
QUANT_ATOL = 2e-2


def assert_logits_agree(got: Any, want: Any, atol: float = QUANT_ATOL, k: int = 40) -> None:
    """Two logit vectors (V,) of the same position agree: the logprobs of `want`'s top k
    within `atol` (a shift common to all logits cancels), the same argmax unless the two are
    a near-tie (within `atol`)."""
    import numpy as np

    from engine.sampling import log_softmax

    top = np.argsort(want)[-k:]
    g, w = log_softmax(got), log_softmax(want)
    np.testing.assert_allclose(g[top], w[top], atol=atol)
    assert w[int(np.argmax(got))] >= w.max() - atol, (int(np.argmax(got)), int(np.argmax(want)))


def assert_same_top(got: list[tuple[int, float]], want: list[tuple[int, float]],
                    atol: float = QUANT_ATOL) -> None:
    """Two top-k lists of (id, logprob) agree: shared ids within `atol`; an id in one list
    only is a near-tie at the other's cut-off (its last logprob, within 2 * atol)."""
    g, w = dict(got), dict(want)
    for i in g.keys() & w.keys():
        assert abs(g[i] - w[i]) <= atol, (i, g[i], w[i])
    for mine, other in ((g, w), (w, g)):
        for i in mine.keys() - other.keys():
            assert mine[i] <= min(other.values()) + 2 * atol, (i, mine[i], other)


def reference_cases() -> list[dict[str, Any]]:
    return [json.loads(line) for line in REFERENCE.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def model() -> Any:
    from engine.runtime import Model, pin_blas_threads

    _, threads = pin_blas_threads()
    m = Model.load()
    m.build_kernels(threads)  # as the engine runs it: the packed LM head for 2+ rows
    return m
