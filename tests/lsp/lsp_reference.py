"""An independent model of what an LSP client does with text: LSP line breaks, positions in
each encoding, applying edits. Written from the specification, sharing no code with
gemma_lsp.documents, so that tests can compare the server's copy against it."""

from __future__ import annotations

import random
from typing import Any

# the characters a hostile document is made of: astral emoji, CJK, combining marks, tabs,
# every LSP line break, and the characters str.splitlines() wrongly treats as line breaks
HOSTILE = ["a", "b", "x", " ", "(", ":", "é", "e\u0301", "中", "文", "😀", "𝄞", "\t",
           "\n", "\r\n", "\r", "\x0c", "\x0b", "\x85", "\u2028", "\u2029", "\u200d", "#"]

UNIT_BYTES = {"utf-8": ("utf-8", 1), "utf-16": ("utf-16-le", 2), "utf-32": ("utf-32-le", 4)}


def line_starts(text: str) -> list[int]:
    """Offsets where lines begin: after each \\n, \\r\\n or lone \\r (nothing else)."""
    starts = [0]
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\r" and text[i + 1 : i + 2] == "\n":
            i += 2
            starts.append(i)
            continue
        i += 1
        if ch in "\r\n":
            starts.append(i)
    return starts


def line_content(text: str, line: int) -> tuple[int, int]:
    """Start and end (before the line break) of `line`."""
    starts = line_starts(text)
    start = starts[line]
    if line + 1 == len(starts):
        return start, len(text)
    end = starts[line + 1]
    return start, end - (2 if text[end - 2 : end] == "\r\n" else 1)


def units(ch: str, encoding: str) -> int:
    codec, size = UNIT_BYTES[encoding]
    return len(ch.encode(codec, "surrogatepass")) // size


def to_offset(text: str, line: int, character: int, encoding: str) -> int:
    """LSP: a character past the line's end is the line's end; a line past the last one is
    the document's end."""
    starts = line_starts(text)
    if line >= len(starts):
        return len(text)
    start, end = line_content(text, line)
    col = 0
    for i in range(start, end):
        if col >= character:
            return i
        col += units(text[i], encoding)
    return end


def to_position(text: str, offset: int, encoding: str) -> dict[str, int]:
    starts = line_starts(text)
    line = max(i for i, s in enumerate(starts) if s <= offset)
    start, _ = line_content(text, line)
    return {"line": line, "character": sum(units(c, encoding) for c in text[start:offset])}


def apply_edit(text: str, rng: dict[str, Any], new_text: str, encoding: str) -> str:
    a = to_offset(text, rng["start"]["line"], rng["start"]["character"], encoding)
    b = to_offset(text, rng["end"]["line"], rng["end"]["character"], encoding)
    a, b = min(a, b), max(a, b)
    return text[:a] + new_text + text[b:]


def apply_text_edits(text: str, edits: list[dict[str, Any]], encoding: str) -> str:
    """Apply TextEdits (all relative to `text`), last first."""
    def key(e: dict[str, Any]) -> int:
        return to_offset(text, e["range"]["start"]["line"], e["range"]["start"]["character"],
                         encoding)

    for e in sorted(edits, key=key, reverse=True):
        text = apply_edit(text, e["range"], e["newText"], encoding)
    return text


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(HOSTILE) for _ in range(n))


def random_change(rng: random.Random, text: str, encoding: str) -> dict[str, Any]:
    """An incremental change a client could send: a range between two character boundaries
    (sometimes past a line's end or past the last line), replaced by hostile text."""
    starts = line_starts(text)

    def pos() -> dict[str, int]:
        line = rng.randrange(len(starts) + (1 if rng.random() < 0.05 else 0))
        if line >= len(starts):
            return {"line": line + rng.randrange(3), "character": rng.randrange(4)}
        start, end = line_content(text, line)
        if rng.random() < 0.1:  # past the line's end
            width = sum(units(c, encoding) for c in text[start:end])
            return {"line": line, "character": width + 1 + rng.randrange(5)}
        i = rng.randint(start, end)
        return {"line": line, "character": sum(units(c, encoding) for c in text[start:i])}

    a, b = pos(), pos()
    def order(p: dict[str, int]) -> tuple[int, int, int]:
        return to_offset(text, p["line"], p["character"], encoding), p["line"], p["character"]

    a, b = sorted([a, b], key=order)
    return {"range": {"start": a, "end": b},
            "text": random_text(rng, rng.choice([0, 0, 1, 1, 2, 5, 12]))}
