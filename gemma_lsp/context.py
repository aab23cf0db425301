"""Document + cursor -> what the model should see: prefix, suffix and extra snippets.

Budgets are characters derived from token budgets. Everything here is deterministic in the
document state so that prompts stay stable across keystrokes (the engine caches by prefix):
the prefix starts on an anchor line (every ``anchor_lines`` lines) so its first character only
moves now and then, and extras come only from other documents or from regions away from the
cursor, ordered by recency of edits, never by what is being typed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from gemma_lsp.documents import Document, DocumentStore

__all__ = [
    "Budgets",
    "CompletionContext",
    "Snippet",
    "build_context",
    "comment_syntax",
    "display_path",
    "indent_width",
    "render_extras_block",
    "render_snippet",
    "select_extras",
]


@dataclass(frozen=True)
class Budgets:
    """Context budgets in tokens, converted to characters with ``chars_per_token``."""

    prefix_tokens: int = 1500
    suffix_tokens: int = 400
    extras_tokens: int = 512
    chars_per_token: float = 3.5
    anchor_lines: int = 16  # prefix starts on a line number that is a multiple of this
    snippet_lines: int = 24  # most lines taken from one region / document
    context_lines: int = 3  # lines kept around an edited region
    max_snippets: int = 8

    def _chars(self, tokens: int) -> int:
        return max(0, int(tokens * self.chars_per_token))

    @property
    def prefix_chars(self) -> int:
        return self._chars(self.prefix_tokens)

    @property
    def suffix_chars(self) -> int:
        return self._chars(self.suffix_tokens)

    @property
    def extras_chars(self) -> int:
        return self._chars(self.extras_tokens)


@dataclass(frozen=True)
class Snippet:
    """Lines ``start_line..end_line`` (inclusive) of another place, shown to the model."""

    uri: str
    path: str
    text: str
    start_line: int = 0
    end_line: int = 0
    language_id: str = ""
    kind: str = "open"  # "edit" (recently edited region) or "open" (another open document)


@dataclass(frozen=True)
class CompletionContext:
    """What the model sees for one cursor.

    ``prefix`` = document text from ``prefix_start`` to the cursor; ``suffix`` = text from the
    cursor to ``suffix_end``; ``extras`` go before the prefix. ``line_prefix`` /
    ``line_suffix`` are the cursor line's text before / after the cursor (no line break) and
    ``indent`` its leading whitespace.
    """

    prefix: str
    suffix: str = ""
    extras: list[Snippet] = field(default_factory=list)
    language_id: str = ""
    uri: str = ""
    indent: str = ""
    line_prefix: str = ""
    line_suffix: str = ""
    path: str = ""
    offset: int = 0
    prefix_start: int = 0
    suffix_end: int = 0
    line: int = 0
    eol: str = "\n"

    @property
    def at_document_start(self) -> bool:
        """True when the prefix is not cut (it starts at the document's first character)."""
        return self.prefix_start == 0


# --- comment syntax ---------------------------------------------------------------------------

_LINE_COMMENT: dict[str, str] = {}
for _prefix, _langs in {
    "#": "python ruby perl shellscript sh bash zsh fish yaml toml r julia elixir nim coffeescript "
    "powershell makefile dockerfile cmake graphql crystal tcl awk gdscript starlark bazel "
    "terraform hcl nix",
    "//": "c cpp java javascript typescript javascriptreact typescriptreact go rust csharp kotlin "
    "swift scala dart php groovy zig objective-c objective-cpp jsonc json json5 scss less proto "
    "solidity glsl hlsl verilog systemverilog d fsharp odin v gleam",
    "--": "lua sql haskell elm ada vhdl purescript idris agda",
    ";": "clojure lisp commonlisp scheme racket ini asm nasm fennel",
    "%": "latex tex bibtex erlang matlab prolog",
    "'": "vb",
    '"': "vim viml",
}.items():
    for _lang in _langs.split():
        _LINE_COMMENT[_lang] = _prefix

_BLOCK_COMMENT: dict[str, tuple[str, str]] = {
    "html": ("<!--", "-->"),
    "xml": ("<!--", "-->"),
    "markdown": ("<!--", "-->"),
    "vue": ("<!--", "-->"),
    "svelte": ("<!--", "-->"),
    "svg": ("<!--", "-->"),
    "xsl": ("<!--", "-->"),
    "css": ("/*", "*/"),
    "ocaml": ("(*", "*)"),
}


def comment_syntax(language_id: str) -> tuple[str, str]:
    """``(start, end)`` of a comment in this language; ``end`` is "" for line comments."""
    lang = language_id.lower()
    if lang in _BLOCK_COMMENT:
        return _BLOCK_COMMENT[lang]
    return _LINE_COMMENT.get(lang, "#"), ""


def display_path(uri: str, root_uri: str | None = None) -> str:
    """A readable path for a URI: relative to ``root_uri`` when inside it, else the full path."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        return uri
    path = unquote(parsed.path)
    if root_uri:
        root = unquote(urlparse(root_uri).path).rstrip("/")
        if root and path.startswith(root + "/"):
            return path[len(root) + 1 :]
    return path


def render_snippet(snippet: Snippet, language_id: str) -> str:
    """A snippet as comments in ``language_id``: a ``Path:`` header then the commented lines.
    Always ends with a line break."""
    start, end = comment_syntax(language_id)
    lines = snippet.text.split("\n")
    if end:
        body = "\n".join(lines).replace(end, end[:1] + " " + end[1:])
        return f"{start} Path: {snippet.path} {end}\n{start}\n{body}\n{end}\n"
    out = [f"{start} Path: {snippet.path}"]
    out.extend(f"{start} {line}" if line else start for line in lines)
    return "\n".join(out) + "\n"


def render_extras_block(extras: list[Snippet], language_id: str) -> str:
    """All snippets commented in the current document's language, in order."""
    return "".join(render_snippet(s, language_id) for s in extras)


def indent_width(text: str, tab_size: int = 4) -> int:
    """Width of the leading whitespace of ``text`` (tabs expanded)."""
    ws = text[: len(text) - len(text.lstrip(" \t"))]
    return len(ws.expandtabs(tab_size))


# --- prefix / suffix --------------------------------------------------------------------------


def _prefix_start(doc: Document, offset: int, cursor_line: int, budget: int, anchor: int) -> int:
    earliest = offset - budget
    if earliest <= 0:
        return 0
    line = doc.line_of_offset(earliest)
    if doc.line_start(line) < earliest:
        line += 1
    if line > cursor_line:  # the cursor line alone is over budget: cut inside it
        return earliest
    if anchor > 1:
        q = math.ceil(line / anchor) * anchor
        if q <= cursor_line:
            return doc.line_start(q)
    return doc.line_start(line)


def _suffix_end(doc: Document, offset: int, budget: int) -> int:
    end = offset + budget
    n = len(doc.text)
    if end >= n:
        return n
    start = doc.line_start(doc.line_of_offset(end))
    return start if start > offset else end


# --- extras -----------------------------------------------------------------------------------


def _snippet(doc: Document, lo: int, hi: int, kind: str, root_uri: str | None) -> Snippet | None:
    last = doc.line_count - 1
    lo, hi = max(0, lo), min(hi, last)
    while lo <= hi and not doc.line_text(lo).strip():
        lo += 1
    while hi >= lo and not doc.line_text(hi).strip():
        hi -= 1
    if lo > hi:
        return None
    text = doc.text[doc.line_start(lo) : doc.line_end(hi)]
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return Snippet(doc.uri, display_path(doc.uri, root_uri), text, lo, hi, doc.language_id, kind)


def _fit(snippet: Snippet, language_id: str, room: int) -> Snippet | None:
    """The snippet, or its first lines, rendered within ``room`` characters."""
    if len(render_snippet(snippet, language_id)) <= room:
        return snippet
    lines = snippet.text.split("\n")
    while len(lines) > 1:
        lines.pop()
        cut = Snippet(
            snippet.uri,
            snippet.path,
            "\n".join(lines),
            snippet.start_line,
            snippet.start_line + len(lines) - 1,
            snippet.language_id,
            snippet.kind,
        )
        if len(render_snippet(cut, language_id)) <= room:
            return cut
    return None


def select_extras(
    doc: Document,
    store: DocumentStore | None,
    budgets: Budgets,
    window: tuple[int, int],
    root_uri: str | None = None,
) -> list[Snippet]:
    """Snippets from recently edited regions (most recent first) and other open documents.

    Regions of ``doc`` that overlap ``window`` (the lines already in the prefix / suffix, which
    contain the cursor's region) are skipped, as are skipped documents and overlapping or
    duplicate snippets.
    """
    if store is None or budgets.extras_chars <= 0 or budgets.max_snippets <= 0:
        return []
    room = budgets.extras_chars
    half = max(1, budgets.snippet_lines // 2)
    ctx_lines = budgets.context_lines
    candidates: list[tuple[Document, int, int, str]] = []
    for region in store.recent_edits():
        other = store.get(region.uri)
        if other is None or other.skipped:
            continue
        lo, hi = region.start_line - ctx_lines, region.end_line + ctx_lines
        if other is doc and lo <= window[1] and window[0] <= hi:
            continue
        if hi - lo + 1 > budgets.snippet_lines:  # keep the lines nearest the region's middle
            mid = (region.start_line + region.end_line) // 2
            lo, hi = mid - half, mid - half + budgets.snippet_lines - 1
        candidates.append((other, lo, hi, "edit"))
    for other in store.by_activity():
        if other is doc or other.skipped:
            continue
        candidates.append((other, 0, budgets.snippet_lines - 1, "open"))

    chosen: list[Snippet] = []
    seen_text: set[str] = set()
    for other, lo, hi, kind in candidates:
        if len(chosen) >= budgets.max_snippets or room <= 0:
            break
        if any(s.uri == other.uri and s.start_line <= hi and lo <= s.end_line for s in chosen):
            continue
        snip = _snippet(other, lo, hi, kind, root_uri)
        if snip is None or snip.text in seen_text:
            continue
        fitted = _fit(snip, doc.language_id, room)
        if fitted is None:
            break
        chosen.append(fitted)
        seen_text.add(fitted.text)
        room -= len(render_snippet(fitted, doc.language_id))
    return chosen


def build_context(
    doc: Document,
    offset: int,
    store: DocumentStore | None = None,
    budgets: Budgets | None = None,
    *,
    root_uri: str | None = None,
) -> CompletionContext:
    """The completion context for the cursor at string ``offset`` of ``doc``."""
    b = budgets or Budgets()
    text = doc.text
    offset = max(0, min(offset, len(text)))
    cursor_line = doc.line_of_offset(offset)
    start = _prefix_start(doc, offset, cursor_line, b.prefix_chars, b.anchor_lines)
    end = _suffix_end(doc, offset, b.suffix_chars)
    line_start = doc.line_start(cursor_line)
    line_end = max(doc.line_end(cursor_line), offset)
    line_prefix = text[line_start:offset]
    line_text = text[line_start:line_end]
    indent = line_text[: len(line_text) - len(line_text.lstrip(" \t"))]
    window = (doc.line_of_offset(start), doc.line_of_offset(end))
    extras = [] if doc.skipped else select_extras(doc, store, b, window, root_uri)
    return CompletionContext(
        prefix=text[start:offset],
        suffix=text[offset:end],
        extras=extras,
        language_id=doc.language_id,
        uri=doc.uri,
        indent=indent,
        line_prefix=line_prefix,
        line_suffix=text[offset:line_end],
        path=display_path(doc.uri, root_uri),
        offset=offset,
        prefix_start=start,
        suffix_end=end,
        line=cursor_line,
        eol=doc.eol,
    )
