"""A plain `git clone` has nothing beside it: no test may read the folder beside the clone."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# the ways a path to the folder beside the clone gets written (built from pieces so that this
# file, which names them, does not match them itself)
_NAME = "sha" + "red"
OUTSIDE = re.compile(rf'\.\./{_NAME}|parent / "{_NAME}"|parents\[\d\] / "{_NAME}"')


def test_no_test_reads_outside_the_clone() -> None:
    offenders = [str(p.relative_to(TESTS)) for p in TESTS.rglob("*.py")
                 if OUTSIDE.search(p.read_text())]
    assert offenders == []


def test_reference_data_is_in_the_clone() -> None:
    from tests.conftest import REFERENCE, TYPING_BASE, reference_cases

    assert REFERENCE.is_relative_to(TESTS) and TYPING_BASE.is_relative_to(TESTS)
    cases = reference_cases()
    assert len(cases) == 10 and all(c["prompt_token_ids"][0] == 2 for c in cases)
