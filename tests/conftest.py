"""Shared fixtures: the real embedded model, loaded once per test session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "gemma3_270m_llamacpp.jsonl"


def reference_cases() -> list[dict[str, Any]]:
    if not REFERENCE.exists():
        pytest.skip(f"reference data not found at {REFERENCE}")
    return [json.loads(line) for line in REFERENCE.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def model() -> Any:
    from engine.runtime import Model, pin_blas_threads

    pin_blas_threads()
    return Model.load()
