"""Scenarios for scripts/bench_nes.py (data in scripts/data/nes_scenarios.json): a starting
file, the user's edit(s), the expected next edit.

Each edit and each expected change is ``[old, new]``: the first occurrence of ``old`` in the
text at that point becomes ``new``. ``expect`` empty: the edit implies no further edit.
Kinds: rename (a renamed identifier reaching its uses), param (an argument added or removed at
a call, repeated at the other calls), pattern (a changed call repeated on similar lines),
field (a renamed field in a struct literal), typo (a typo fixed once, fixed again), none (an
edit that implies nothing more, often with a tempting wrong carry-over nearby).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "nes_scenarios.json"
SUFFIX = {"python": "py", "typescript": "ts", "go": "go", "rust": "rs"}


@dataclass(frozen=True)
class Scenario:
    name: str
    lang: str
    kind: str
    text: str
    edits: tuple[tuple[str, str], ...]
    expect: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        return "main." + SUFFIX[self.lang]


def load(path: Path = DATA) -> list[Scenario]:
    out = []
    for raw in json.loads(path.read_text()):
        out.append(Scenario(raw["name"], raw["lang"], raw["kind"], raw["text"],
                            tuple((a, b) for a, b in raw["edits"]),
                            tuple((a, b) for a, b in raw["expect"])))
    return out


SCENARIOS = load()
