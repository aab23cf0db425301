"""Quality rules for completions, as pure functions over text.

The same rules run while tokens stream in (`should_stop_early`, so decoding stops as soon as
one fires) and on the final text (`trim_completion`):

- repetition: the completion starts repeating the text after the cursor (the first non-empty
  lines below the cursor, or the whole rest of the cursor line);
- scope: a line less indented than the block at the cursor (indentation-based languages), or
  more closing than opening braces (brace languages: the line that closes the block is kept);
- length: at most ``max_lines`` lines;
- the middle of a line: where the rest of the cursor line is more than closing brackets and
  punctuation, a completion must run into that rest (then the rest is kept after it), else
  there is none. (An insertion that stops short leaves the old rest of the line behind it:
  `def area(width|, h):` completed with `, height):` and a docstring line kept `, h):` at
  the end of that line. Copilot's middle-of-line rule is the same.)

A completion-menu item must also be a complete unit (`complete_unit`): whole lines from the
cursor, brackets and quotes balanced, not ending on an operator, or nothing.

The completion's first line continues the cursor line (``ctx.line_prefix``); the model's line
breaks are ``\\n``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from gemma_lsp.context import CompletionContext, indent_width

__all__ = [
    "BRACE_LANGUAGES",
    "INDENT_LANGUAGES",
    "complete_unit",
    "dedupe",
    "finalize",
    "is_useful",
    "should_stop_early",
    "trim_completion",
    "typed_ahead",
]

INDENT_LANGUAGES = frozenset(
    "python yaml nim coffeescript fsharp haskell elm pug jade sass stylus purescript "
    "gdscript starlark bazel".split()
)
BRACE_LANGUAGES = frozenset(
    "c cpp java javascript typescript javascriptreact typescriptreact go rust csharp kotlin "
    "swift scala dart php groovy zig objective-c objective-cpp json jsonc json5 css scss less "
    "proto solidity glsl hlsl d odin v gleam perl awk".split()
)
_TRIVIAL = frozenset(")]}>;,.:'\"` \t\r\n")
_BLOCK_OPENERS = (":",)  # a line ending like this opens a nested block (indent languages)
# a rest of the cursor line a completion may be inserted before, whatever it ends with
_END_OF_LINE = re.compile(r"\s*[)\]}>\"'`]*\s*[:{;,]?\s*")


def _suffix_anchors(ctx: CompletionContext) -> tuple[str | None, str | None]:
    """The first two non-empty lines after the cursor line (right-stripped)."""
    found = [line.rstrip() for line in ctx.suffix.splitlines()[1:] if line.strip()][:2]
    return (
        found[0] if found else None,
        found[1] if len(found) > 1 else None,
    )


def _bracket_net(text: str) -> int:
    """Opening minus closing brackets (all kinds)."""
    return sum(text.count(c) for c in "([{") - sum(text.count(c) for c in ")]}")


def _may_drop(kept: str, dropped: str) -> bool:
    """Dropping ``dropped`` (text the rest of the line already has) is right unless its closing
    brackets close something opened in ``kept`` (then they belong to the completion)."""
    return not any(c in ")]}" for c in dropped) or _bracket_net(kept) <= 0


def _brace_delta(line: str, lang: str) -> int:
    """``{`` minus ``}`` on one line, skipping simple string literals and ``//`` comments."""
    quotes = '"`' if lang == "rust" else "\"'`"
    depth = 0
    quote: str | None = None
    i = 0
    n = len(line)
    while i < n:
        c = line[i]
        if quote is not None:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in quotes:
            quote = c
        elif c == "/" and line.startswith("//", i):
            break
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        i += 1
    return depth


def _find_cut(text: str, ctx: CompletionContext, max_lines: int, final: bool) -> int | None:
    """Where a rule cuts ``text`` (keep ``text[:cut]``), or None. Unless ``final``, the last
    line is treated as incomplete."""
    lines = text.split("\n")
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    complete = len(lines) if final else len(lines) - 1
    lang = ctx.language_id.lower()
    cuts: list[int] = []

    if max_lines > 0 and len(lines) > max_lines:
        cuts.append(starts[max_lines] - 1)

    # repetition of the lines below the cursor
    s0, s1 = _suffix_anchors(ctx)
    if s0 is not None:
        cursor_line_blank = not ctx.line_prefix.strip() and not ctx.line_suffix.strip()
        for i in range(complete):
            if i == 0 and not cursor_line_blank:
                continue
            full = ctx.line_prefix + lines[0] if i == 0 else lines[i]
            if not full.strip() or full.rstrip() != s0:
                continue
            if len(s0.strip()) < 4 and s1 is not None:  # short line like "}": confirm
                following = [x for x in lines[i + 1 : complete] if x.strip()]
                if following:
                    if following[0].rstrip() != s1:
                        continue
                elif not final:
                    break  # wait for the next line
            cuts.append(starts[i] - 1 if i > 0 else 0)
            break

    # repetition of the rest of the cursor line at the end of a line (multi-line completions)
    rest = ctx.line_suffix.rstrip()
    if rest.strip():
        for i in range(complete):
            if lines[i].rstrip().endswith(rest):
                end = starts[i] + len(lines[i].rstrip()) - len(rest)
                if _may_drop(text[:end], rest):
                    cuts.append(end)
                    break

    # leaving the block: indentation
    if lang in INDENT_LANGUAGES and len(lines) > 1:
        current = ctx.line_prefix + lines[0]
        base = current if not ctx.line_prefix.strip() else ctx.line_prefix
        block = indent_width(base)
        if current.rstrip().endswith(_BLOCK_OPENERS):
            block += 1
        for i in range(1, len(lines)):
            line = lines[i]
            if not line.strip():
                continue
            if indent_width(line) < block:
                cuts.append(starts[i] - 1)
                break

    # leaving the block: braces
    if lang in BRACE_LANGUAGES:
        depth = 0
        for i in range(complete):
            depth += _brace_delta(lines[i], lang)
            if depth < 0:
                cuts.append(starts[i] + len(lines[i]))
                break

    return min(cuts) if cuts else None


def should_stop_early(text_so_far: str, ctx: CompletionContext, max_lines: int) -> bool:
    """True as soon as a rule fires on the streamed text (decoding can stop)."""
    cut = _find_cut(text_so_far, ctx, max_lines, final=False)
    return cut is not None and cut < len(text_so_far)


def _drop_overlap(text: str, rest: str) -> str:
    """Drop the longest end of ``text`` that equals the start of ``rest`` (see `_may_drop`)."""
    for k in range(min(len(rest), len(text)), 0, -1):
        if text.endswith(rest[:k]) and _may_drop(text[:-k], rest[:k]):
            return text[:-k]
    return text


def trim_completion(text: str, ctx: CompletionContext, max_lines: int) -> str:
    """The completion cut by the rules, without an overlap with the rest of the cursor line and
    without trailing whitespace; "" when nothing but whitespace is left."""
    text = text.replace("\r\n", "\n")
    rest = ctx.line_suffix.rstrip()
    if rest.strip() and not _END_OF_LINE.fullmatch(rest) and not any(
            line.rstrip().endswith(rest) for line in text.split("\n")):
        return ""  # the middle of a line, and the completion stops short of its rest
    cut = _find_cut(text, ctx, max_lines, final=True)
    if cut is not None:
        text = text[:cut]
    if ctx.line_suffix.strip():
        text = _drop_overlap(text, ctx.line_suffix)
    text = text.rstrip()
    return text if text.strip() else ""


def dedupe(candidates: Iterable[str]) -> list[str]:
    """Non-empty candidates in order, without repeats (compared without trailing whitespace)."""
    seen: set[str] = set()
    out: list[str] = []
    for c in candidates:
        key = c.rstrip()
        if not key.strip() or key in seen:
            continue
        seen.add(key)
        out.append(c)
    return out


def is_useful(text: str) -> bool:
    """False for whitespace and for text made only of closing brackets / punctuation."""
    s = text.strip()
    return bool(s) and not all(c in _TRIVIAL for c in s)


def finalize(candidates: Iterable[str], ctx: CompletionContext, max_lines: int) -> list[str]:
    """Trim every candidate, then drop useless ones and repeats."""
    return [
        c for c in dedupe(trim_completion(c, ctx, max_lines) for c in candidates) if is_useful(c)
    ]


def typed_ahead(previous_suggestion_text: str, previous_prefix: str, new_prefix: str) -> str | None:
    """The rest of a suggestion when the user typed its first characters since it was made
    (``new_prefix == previous_prefix + typed`` and the suggestion starts with ``typed``);
    None when the typing does not match or nothing would remain."""
    if not new_prefix.startswith(previous_prefix):
        return None
    typed = new_prefix[len(previous_prefix) :]
    if not previous_suggestion_text.startswith(typed):
        return None
    rest = previous_suggestion_text[len(typed) :]
    return rest if rest.strip() else None


# --- complete units (completion-menu items) ---------------------------------------------------

_CONTINUES = (",", "\\", "+", "-", "*", "/", "%", "=", "&", "|", "^", "<", ">", ".", "(", "[",
              "{", "@", "~", "!", "?")
_CONTINUES_WORDS = frozenset("and or not in is lambda if else return await yield from import "
                             "as with for while def class elif".split())
_OPEN = {"(": ")", "[": "]", "{": "}"}


def _open_at_end(text: str, comment: str) -> list[str]:
    """The brackets and strings still open after ``text`` (innermost last). Closing brackets
    of something opened before ``text`` are ignored (they end an enclosing construct)."""
    state: list[str] = []
    for line in text.split("\n"):
        if state and state[-1] in ("'", '"', "`"):
            state.pop()  # a one-line string left open: that line is broken, keep it open
            state.append("?")
        i, n = 0, len(line)
        while i < n:
            c = line[i]
            top = state[-1] if state else ""
            if top and top[0] in "'\"`":  # inside a string
                if c == "\\":
                    i += 2
                elif line.startswith(top, i):
                    state.pop()
                    i += len(top)
                else:
                    i += 1
                continue
            if comment and line.startswith(comment, i):
                break
            if c in "'\"`":
                q = c * 3 if line.startswith(c * 3, i) else c
                state.append(q)
                i += len(q)
                continue
            if c in _OPEN:
                state.append(c)
            elif c in ")]}" and state and _OPEN.get(state[-1]) == c:
                state.pop()
            i += 1
    return state


def complete_unit(text: str, ctx: CompletionContext, final: bool = True) -> str | None:
    """The longest start of ``text`` that is a complete unit for a completion menu, or None.

    A unit is whole lines (the rest of the cursor line at least, so it never ends inside a
    token) after which no bracket or string opened on the cursor line or in the completion is
    left open (the rest of the cursor line, which stays after the item, counted), and whose
    last line does not end on an operator, a comma or a keyword that needs more. Unless
    ``final``, the last line of ``text`` is still being decoded and is not considered.
    """
    from gemma_lsp.context import comment_syntax

    start, end = comment_syntax(ctx.language_id)
    comment = "" if end else start
    lines = text.split("\n")
    complete = len(lines) if final else len(lines) - 1
    best: int | None = None
    pos = 0
    for i in range(complete):
        pos += len(lines[i])
        candidate = text[:pos].rstrip()
        whole = ctx.line_prefix + candidate + ctx.line_suffix
        last = whole.rsplit("\n", 1)[-1]
        if comment and comment in last:
            last = last[: last.index(comment)]  # (a comment sign inside a string: stricter)
        last = last.rstrip()
        words = last.split()
        if (candidate.strip() and last.strip() and not _open_at_end(whole, comment)
                and not last.endswith(_CONTINUES) and words[-1] not in _CONTINUES_WORDS):
            best = pos
        pos += 1  # the line break
    if best is None:
        return None
    unit = text[:best].rstrip()
    return unit if is_useful(unit) else None
