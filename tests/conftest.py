"""Shared fixtures: the real embedded model, loaded once per test session."""

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


def reference_cases() -> list[dict[str, Any]]:
    return [json.loads(line) for line in REFERENCE.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def model() -> Any:
    from engine.runtime import Model, pin_blas_threads

    _, threads = pin_blas_threads()
    m = Model.load()
    m.build_kernels(threads)  # as the engine runs it: the packed LM head for 2+ rows
    return m
