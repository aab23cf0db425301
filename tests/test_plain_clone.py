"""A plain `git clone` has nothing beside it: no test may read the project's ../shared folder."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
OUTSIDE = re.compile(r"\.\./shared|parent / \"shared\"|parents\[\d\] / \"shared\"")


def test_no_test_reads_outside_the_clone() -> None:
    offenders = [str(p.relative_to(TESTS)) for p in TESTS.rglob("*.py")
                 if p != Path(__file__).resolve() and OUTSIDE.search(p.read_text())]
    assert offenders == []


def test_reference_data_is_in_the_clone() -> None:
    from tests.conftest import REFERENCE, TYPING_BASE, reference_cases

    assert REFERENCE.is_relative_to(TESTS) and TYPING_BASE.is_relative_to(TESTS)
    cases = reference_cases()
    assert len(cases) == 10 and all(c["prompt_token_ids"][0] == 2 for c in cases)
