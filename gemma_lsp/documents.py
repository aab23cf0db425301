"""Open documents: text, incremental edits, LSP position encodings and recent edit regions.

Pure bookkeeping (no I/O, no threads). Positions are converted in the negotiated encoding
(UTF-16 by default, or UTF-8 / UTF-32). Line breaks are ``\\n``, ``\\r\\n`` and ``\\r`` as in the
LSP specification. Line start offsets are kept in a list and updated per edit (typing on one
line costs O(length of that line) plus a string splice; the tail of the list is shifted lazily).
"""

from __future__ import annotations

import re
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from lsprotocol import types as lsp

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "Document",
    "DocumentStore",
    "EditRegion",
    "apply_changes_to_string",
    "convert_eol",
    "normalize_encoding",
    "split_lines",
]

DEFAULT_MAX_FILE_BYTES = 20 * 1024 * 1024
EDIT_RING_SIZE = 16
_MERGE_DISTANCE = 2  # edits this many lines apart (or closer) extend the same region

_EOL = re.compile(r"\r\n|\r|\n")
_UTF8 = lsp.PositionEncodingKind.Utf8
_UTF16 = lsp.PositionEncodingKind.Utf16
_UTF32 = lsp.PositionEncodingKind.Utf32


def normalize_encoding(encoding: lsp.PositionEncodingKind | str | None) -> lsp.PositionEncodingKind:
    """A `PositionEncodingKind` from an enum member or its string value (default UTF-16)."""
    if encoding is None:
        return _UTF16
    if isinstance(encoding, lsp.PositionEncodingKind):
        return encoding
    try:
        return lsp.PositionEncodingKind(str(encoding).lower())
    except ValueError:
        raise ValueError(f"unknown position encoding {encoding!r}") from None


def split_lines(text: str, keepends: bool = False) -> list[str]:
    """The lines of ``text`` at LSP's line breaks only (``\\n``, ``\\r\\n``, ``\\r``), not
    at the form feeds, NELs and U+2028/9 where ``str.splitlines`` also splits. As with
    ``splitlines``, a final line break does not start an empty last line."""
    out: list[str] = []
    start = 0
    for m in _EOL.finditer(text):
        out.append(text[start : m.end() if keepends else m.start()])
        start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out


def convert_eol(text: str, eol: str) -> str:
    """``text`` with every line break written as ``eol``."""
    return text if eol == "\n" and "\r" not in text else _EOL.sub(eol, text)


def _is_line_start(text: str, p: int) -> bool:
    """True if offset ``p`` (0 < p <= len) begins a line: it follows a line break."""
    prev = text[p - 1]
    return prev == "\n" or (prev == "\r" and (p >= len(text) or text[p] != "\n"))


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _units(ch: str, encoding: lsp.PositionEncodingKind) -> int:
    o = ord(ch)
    if encoding == _UTF16:
        return 2 if o > 0xFFFF else 1
    if encoding == _UTF8:
        return 1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4
    return 1


def _column_to_index(line: str, character: int, encoding: lsp.PositionEncodingKind) -> int:
    """Index into ``line`` for a column in code units, clamped to the line's end.

    A column inside a character (between UTF-16 surrogates, inside a UTF-8 sequence) maps to
    the start of that character.
    """
    if encoding == _UTF32 or line.isascii():
        return min(character, len(line))
    units = 0
    for i, ch in enumerate(line):
        units += _units(ch, encoding)
        if units > character:
            return i
    return len(line)


def _index_to_column(line: str, index: int, encoding: lsp.PositionEncodingKind) -> int:
    head = line[:index]
    if encoding == _UTF32 or head.isascii():
        return len(head)
    if encoding == _UTF16:
        return len(head.encode("utf-16-le", "surrogatepass")) // 2
    return len(head.encode("utf-8", "surrogatepass"))


class _LineIndex:
    """Start offsets of every line; entries at ``pending_from`` and later lack ``pending``."""

    __slots__ = ("_starts", "_from", "_delta")

    def __init__(self, text: str) -> None:
        self._starts = [0]
        self._starts.extend(m.end() for m in _EOL.finditer(text))
        self._from = len(self._starts)
        self._delta = 0

    def __len__(self) -> int:
        return len(self._starts)

    def start(self, line: int) -> int:
        s = self._starts[line]
        return s + self._delta if line >= self._from else s

    def flush(self) -> None:
        if self._delta and self._from < len(self._starts):
            d = self._delta
            tail = self._starts[self._from :]
            self._starts[self._from :] = [s + d for s in tail]
        self._from = len(self._starts)
        self._delta = 0

    def starts(self) -> list[int]:
        self.flush()
        return list(self._starts)

    def line_of(self, offset: int) -> int:
        """The line containing ``offset`` (the last line whose start is <= offset)."""
        st, k, d = self._starts, self._from, self._delta
        if k < len(st) and st[k] + d <= offset:
            return bisect_right(st, offset - d, lo=k) - 1
        return bisect_right(st, offset, 0, k) - 1

    def replace(self, new_text: str, a: int, b: int, inserted: int) -> None:
        """Update after ``old[a:b]`` was replaced by ``inserted`` characters (``new_text``)."""
        delta = inserted - (b - a)
        # old starts in [a, b] are recomputed; those after b move by delta
        j = self.line_of(a)
        i0 = j if self.start(j) == a else j + 1
        i0 = max(i0, 1)
        i1 = self.line_of(b) + 1
        if i1 < i0:
            i1 = i0
        if not (i0 <= self._from <= i1) and self._from < len(self._starts):
            self.flush()
        lo = max(a, 1)
        hi = a + inserted  # inclusive; new starts can only fall in [lo, hi]
        if inserted <= 64:
            new = [p for p in range(lo, hi + 1) if _is_line_start(new_text, p)]
        else:
            window = _EOL.finditer(new_text, lo - 1, min(hi + 1, len(new_text)))
            new = [m.end() for m in window if m.end() <= hi and _is_line_start(new_text, m.end())]
        old_delta = self._delta if self._from < len(self._starts) else 0
        self._starts[i0:i1] = new
        self._from = i0 + len(new)
        self._delta = old_delta + delta
        if self._from >= len(self._starts):
            self._delta = 0


@dataclass(frozen=True)
class EditRegion:
    """Lines ``start_line..end_line`` (inclusive, current numbering) of ``uri`` edited at
    ``timestamp`` (the store's clock)."""

    uri: str
    start_line: int
    end_line: int
    timestamp: float
    seq: int = 0

    def overlaps(self, start_line: int, end_line: int) -> bool:
        return self.start_line <= end_line and start_line <= self.end_line


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i, step = 0, 4096
    while i < n:
        j = min(i + step, n)
        if a[i:j] != b[i:j]:
            while a[i] == b[i]:
                i += 1
            return i
        i = j
    return n


def _common_suffix(a: str, b: str, limit: int) -> int:
    """Length of the common suffix of ``a`` and ``b``, at most ``limit``."""
    la, lb = len(a), len(b)
    k, step = 0, 4096
    while k < limit:
        m = min(k + step, limit)
        if a[la - m : la - k] != b[lb - m : lb - k]:
            while a[la - k - 1] == b[lb - k - 1]:
                k += 1
            return k
        k = m
    return limit


class Document:
    """One open text document. Mutated only through `apply_change` / `DocumentStore`."""

    def __init__(
        self,
        uri: str,
        text: str,
        version: int = 0,
        language_id: str = "",
        *,
        encoding: lsp.PositionEncodingKind | str | None = None,
    ) -> None:
        self.uri = uri
        self.version = version
        self.language_id = language_id
        self.encoding = normalize_encoding(encoding)
        self.skipped = False
        self.skip_reason: str | None = None
        self.last_activity = 0.0  # store clock at open / last edit
        self._text = text
        self._index: _LineIndex | None = None
        self._utf8_size: int | None = None
        self._edits: deque[EditRegion] = deque(maxlen=EDIT_RING_SIZE)

    def __repr__(self) -> str:
        return (
            f"Document({self.uri!r}, version={self.version}, language_id={self.language_id!r}, "
            f"chars={len(self._text)}, skipped={self.skipped})"
        )

    # -- text and lines ---------------------------------------------------------------------

    @property
    def text(self) -> str:
        return self._text

    @property
    def utf8_size(self) -> int:
        """Size of the text in UTF-8 bytes (computed once, then kept up to date per edit)."""
        if self._utf8_size is None:
            self._utf8_size = _utf8_len(self._text)
        return self._utf8_size

    @property
    def _lines(self) -> _LineIndex:
        if self._index is None:
            self._index = _LineIndex(self._text)
        return self._index

    @property
    def line_count(self) -> int:
        return len(self._lines)

    def line_start(self, line: int) -> int:
        """Offset of the first character of ``line`` (clamped to the last line)."""
        idx = self._lines
        return idx.start(max(0, min(line, len(idx) - 1)))

    def line_end(self, line: int, *, include_eol: bool = False) -> int:
        """Offset just past the content of ``line`` (before its line break unless asked)."""
        idx = self._lines
        line = max(0, min(line, len(idx) - 1))
        if line + 1 >= len(idx):
            return len(self._text)
        nxt = idx.start(line + 1)
        if include_eol:
            return nxt
        return nxt - 2 if self._text.startswith("\r\n", nxt - 2) else nxt - 1

    def line_text(self, line: int, *, include_eol: bool = False) -> str:
        return self._text[self.line_start(line) : self.line_end(line, include_eol=include_eol)]

    def line_of_offset(self, offset: int) -> int:
        return self._lines.line_of(max(0, min(offset, len(self._text))))

    @property
    def eol(self) -> str:
        """The document's first line break (``"\\n"`` if it has none)."""
        m = _EOL.search(self._text)
        return m.group(0) if m else "\n"

    def eol_at(self, offset: int) -> str:
        """The line break ending the line at ``offset`` (the document's first one if that
        line has none): what text inserted there should use."""
        line = self.line_of_offset(offset)
        brk = self._text[self.line_end(line) : self.line_end(line, include_eol=True)]
        return brk or self.eol

    # -- positions --------------------------------------------------------------------------

    def offset_at(
        self, position: lsp.Position, encoding: lsp.PositionEncodingKind | str | None = None
    ) -> int:
        """String offset of an LSP position; past a line's end -> the line's end, past the
        last line -> the document's end. Negative values raise `ValueError`."""
        line, character = position.line, position.character
        if line < 0 or character < 0:
            raise ValueError(f"negative position: line {line}, character {character}")
        enc = self.encoding if encoding is None else normalize_encoding(encoding)
        idx = self._lines
        if line >= len(idx):
            return len(self._text)
        start = idx.start(line)
        end = self.line_end(line)
        if enc == _UTF32:
            return start + min(character, end - start)
        return start + _column_to_index(self._text[start:end], character, enc)

    def position_at(
        self, offset: int, encoding: lsp.PositionEncodingKind | str | None = None
    ) -> lsp.Position:
        """LSP position of a string offset (clamped to the document's end; an offset inside a
        ``\\r\\n`` maps to the end of that line)."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        enc = self.encoding if encoding is None else normalize_encoding(encoding)
        offset = min(offset, len(self._text))
        line = self._lines.line_of(offset)
        start = self._lines.start(line)
        end = self.line_end(line)
        index = min(offset, end) - start
        if enc == _UTF32:
            return lsp.Position(line=line, character=index)
        return lsp.Position(
            line=line, character=_index_to_column(self._text[start:end], index, enc)
        )

    def range_offsets(
        self, rng: lsp.Range, encoding: lsp.PositionEncodingKind | str | None = None
    ) -> tuple[int, int]:
        a = self.offset_at(rng.start, encoding)
        b = self.offset_at(rng.end, encoding)
        return (a, b) if a <= b else (b, a)

    def range_of(
        self, start: int, end: int, encoding: lsp.PositionEncodingKind | str | None = None
    ) -> lsp.Range:
        return lsp.Range(
            start=self.position_at(start, encoding), end=self.position_at(end, encoding)
        )

    # -- edits ------------------------------------------------------------------------------

    def replace(self, start: int, end: int, new_text: str) -> tuple[int, int, int]:
        """Replace ``text[start:end]``; returns (first line, last old line, last new line)."""
        n = len(self._text)
        if start < 0 or end < 0:
            raise ValueError(f"negative offsets {start}, {end}")
        start, end = min(start, n), min(end, n)
        if end < start:
            start, end = end, start
        idx = self._lines
        first = idx.line_of(start)
        last_old = idx.line_of(end)
        if self._utf8_size is not None:
            self._utf8_size += _utf8_len(new_text) - _utf8_len(self._text[start:end])
        self._text = self._text[:start] + new_text + self._text[end:]
        idx.replace(self._text, start, end, len(new_text))
        last_new = idx.line_of(start + len(new_text))
        return first, last_old, last_new

    def set_text(self, text: str) -> tuple[int, int, int] | None:
        """Replace the whole text; applied as the smallest single edit. None if unchanged."""
        old = self._text
        if text == old:
            return None
        p = _common_prefix(old, text)
        s = _common_suffix(old, text, min(len(old), len(text)) - p)
        if self._index is None:
            self._text = text
            self._utf8_size = None
            first = self._lines.line_of(p)
            return first, first, self._lines.line_of(len(text) - s)
        return self.replace(p, len(old) - s, text[p : len(text) - s])

    def apply_change(
        self, change: lsp.TextDocumentContentChangeEvent
    ) -> tuple[int, int, int] | None:
        """Apply one content change event (partial with range, or whole document)."""
        if isinstance(change, lsp.TextDocumentContentChangePartial):
            a, b = self.range_offsets(change.range)
            return self.replace(a, b, change.text)
        return self.set_text(change.text)

    def recent_edits(self) -> list[EditRegion]:
        """This document's edit regions, most recent first."""
        return sorted(self._edits, key=lambda r: (r.timestamp, r.seq), reverse=True)

    def _record_edit(self, first: int, last_old: int, last_new: int, ts: float, seq: int) -> None:
        shift = last_new - last_old
        updated: list[EditRegion] = []
        for r in self._edits:
            if r.start_line > last_old:
                r = EditRegion(r.uri, r.start_line + shift, r.end_line + shift, r.timestamp, r.seq)
            elif r.end_line >= first:  # touches the edit: keep it within valid lines
                end = r.end_line + shift if r.end_line > last_old else min(r.end_line, last_new)
                r = EditRegion(r.uri, min(r.start_line, first), max(end, first), r.timestamp, r.seq)
            updated.append(r)
        self._edits.clear()
        self._edits.extend(updated)
        new = EditRegion(self.uri, first, last_new, ts, seq)
        if self._edits:
            latest = max(self._edits, key=lambda r: (r.timestamp, r.seq))
            if (
                latest.start_line - _MERGE_DISTANCE <= last_new
                and first <= latest.end_line + _MERGE_DISTANCE
            ):
                self._edits.remove(latest)
                new = EditRegion(
                    self.uri,
                    min(first, latest.start_line),
                    max(last_new, latest.end_line),
                    ts,
                    seq,
                )
        self._edits.append(new)


class DocumentStore:
    """The open documents of one session, keyed by URI."""

    def __init__(
        self,
        *,
        encoding: lsp.PositionEncodingKind | str | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._docs: dict[str, Document] = {}
        self._encoding = normalize_encoding(encoding)
        self.max_file_bytes = max_file_bytes
        self._clock = clock
        self._seq = 0
        # told of every change before it is applied: (document, start, end, inserted text)
        self.on_edit: Callable[[Document, int, int, str], None] | None = None

    @property
    def encoding(self) -> lsp.PositionEncodingKind:
        return self._encoding

    @encoding.setter
    def encoding(self, value: lsp.PositionEncodingKind | str | None) -> None:
        self._encoding = normalize_encoding(value)
        for doc in self._docs.values():
            doc.encoding = self._encoding

    def __contains__(self, uri: object) -> bool:
        return uri in self._docs

    def __len__(self) -> int:
        return len(self._docs)

    def __iter__(self) -> Iterator[Document]:
        return iter(list(self._docs.values()))

    def get(self, uri: str) -> Document | None:
        return self._docs.get(uri)

    def documents(self) -> list[Document]:
        return list(self._docs.values())

    def _tick(self) -> tuple[float, int]:
        self._seq += 1
        return self._clock(), self._seq

    def _check_skip(self, doc: Document) -> None:
        size = doc.utf8_size
        if size > self.max_file_bytes:
            doc.skipped = True
            doc.skip_reason = f"too large ({size} bytes > {self.max_file_bytes})"
        elif "\x00" in doc.text:
            doc.skipped = True
            doc.skip_reason = "looks binary (contains NUL)"
        else:
            doc.skipped = False
            doc.skip_reason = None

    def open(self, uri: str, text: str, version: int = 0, language_id: str = "") -> Document:
        """Open (or re-open, replacing) a document; huge or binary ones are marked skipped."""
        doc = Document(uri, text, version, language_id, encoding=self._encoding)
        doc.last_activity, _ = self._tick()
        self._check_skip(doc)
        self._docs[uri] = doc
        return doc

    def open_item(self, item: lsp.TextDocumentItem) -> Document:
        return self.open(item.uri, item.text, item.version, item.language_id)

    def change(
        self,
        uri: str,
        version: int | None,
        changes: Sequence[lsp.TextDocumentContentChangeEvent],
    ) -> Document | None:
        """Apply content changes in order; returns the document, or None if it is not open.

        An incremental change that inserts a NUL or grows past the size limit marks the document
        skipped; a whole-document change re-evaluates it fully.
        """
        doc = self._docs.get(uri)
        if doc is None:
            return None
        whole = False
        for change in changes:
            if self.on_edit is not None:
                self._announce(doc, change, self.on_edit)
            span = doc.apply_change(change)
            if isinstance(change, lsp.TextDocumentContentChangeWholeDocument):
                whole = True
            elif "\x00" in change.text and not doc.skipped:
                doc.skipped = True
                doc.skip_reason = "looks binary (contains NUL)"
            if span is not None:
                ts, seq = self._tick()
                doc.last_activity = ts
                doc._record_edit(*span, ts, seq)
        if version is not None:
            doc.version = version
        if whole:
            self._check_skip(doc)
        elif not doc.skipped and doc.utf8_size > self.max_file_bytes:
            doc.skipped = True
            doc.skip_reason = f"too large ({doc.utf8_size} bytes > {self.max_file_bytes})"
        return doc

    @staticmethod
    def _announce(doc: Document, change: lsp.TextDocumentContentChangeEvent,
                  listener: Callable[[Document, int, int, str], None]) -> None:
        """Tell ``listener`` which span of the (still unchanged) text becomes what."""
        if isinstance(change, lsp.TextDocumentContentChangePartial):
            a, b = doc.range_offsets(change.range)
            listener(doc, a, b, change.text)
            return
        old, new = doc.text, change.text
        p = _common_prefix(old, new)
        q = _common_suffix(old, new, min(len(old), len(new)) - p)
        listener(doc, p, len(old) - q, new[p : len(new) - q])

    def close(self, uri: str) -> Document | None:
        return self._docs.pop(uri, None)

    def recent_edits(self, limit: int | None = None) -> list[EditRegion]:
        """Edit regions of all open documents, most recent first."""
        regions: list[EditRegion] = []
        for doc in self._docs.values():
            regions.extend(doc._edits)
        regions.sort(key=lambda r: (r.timestamp, r.seq), reverse=True)
        return regions if limit is None else regions[:limit]

    def by_activity(self) -> list[Document]:
        """Open documents, most recently opened or edited first (ties: URI)."""
        return sorted(self._docs.values(), key=lambda d: (-d.last_activity, d.uri))


def apply_changes_to_string(
    text: str,
    changes: Iterable[lsp.TextDocumentContentChangeEvent],
    encoding: lsp.PositionEncodingKind | str | None = None,
) -> str:
    """Apply change events to a plain string (convenience; builds a throwaway Document)."""
    doc = Document("untitled:", text, encoding=encoding)
    for change in changes:
        doc.apply_change(change)
    return doc.text
