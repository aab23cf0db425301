"""Next-edit suggestions: what the user will change next, predicted from what they just changed.

This room owns the pure parts, no I/O: the edit history (edits coalesced into groups as a user
types), the editable region around the last edit, the prompt that shows the model the history
and the region, the candidate rewrites of the region, the diff of a rewrite into the smallest
edits, and the gate that decides from the model's own log-likelihoods whether to show one.

How a suggestion is made (gemma_lsp/next_edit_service.py runs it):
1. candidates for the region's rewrite: the region unchanged (the "nothing to do" answer), the
   user's last change carried over to the rest of the region (a renamed identifier, a fixed
   typo, a changed call repeated on similar lines) and, when the model has time, its own free
   rewrite of the region;
2. the engine scores every candidate as the continuation of one prompt (file, edit history as
   before/after blocks, the region's "before" block): the sum of the candidate's token
   log-probabilities;
3. the best candidate is shown only if it beats "unchanged" by a margin calibrated on
   scripts/bench_nes.py, and what it changes is the smallest set of edits.
"""

from __future__ import annotations

import difflib
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gemma_lsp.documents import split_lines

__all__ = [
    "Candidate",
    "EditGroup",
    "EditHistory",
    "Region",
    "TextEditSpan",
    "carry_over_candidates",
    "choose",
    "editable_region",
    "minimal_edits",
    "render_prompt",
]

END = "<|end|>"  # closes the model's "after" block; a stop string of the free rewrite
_WORD = re.compile(r"\w+|\s+|[^\w\s]")
_IDENT = re.compile(r"^[A-Za-z_]\w*$")


# --- edit history -----------------------------------------------------------------------------


@dataclass
class EditGroup:
    """The user's edits of one place, coalesced while they type.

    ``start``/``old``/``new``: the span the group changed, as offsets in the document's current
    text (``-1`` once later edits elsewhere made the offsets unreliable), what the span held
    before the group's first edit and what it holds now. ``before``/``after``: the whole lines
    around the span before and after, as the prompt shows them.
    """

    uri: str
    start: int
    old: str
    new: str
    before: str
    after: str
    t_first: float
    t_last: float

    @property
    def end(self) -> int:
        return self.start + len(self.new)


def _line_bounds(text: str, a: int, b: int) -> tuple[int, int]:
    """The start of the line holding ``a`` and the end (before its line break) of the line
    holding ``b``."""
    lo = max(text.rfind("\n", 0, a), text.rfind("\r", 0, a)) + 1
    ends = [i for i in (text.find("\n", b), text.find("\r", b)) if i >= 0]
    return lo, (min(ends) if ends else len(text))


class EditHistory:
    """Recent edit groups across documents, oldest first, bounded in count and size.

    An edit joins the latest group when it is in the same document, comes within
    ``coalesce_s`` of the group's last edit and touches the group's span; otherwise it starts a
    new group. Each group keeps at most ``max_chars`` of before/after text.
    """

    def __init__(self, *, max_groups: int = 16, coalesce_s: float = 2.0,
                 max_chars: int = 2000) -> None:
        self.max_groups = max_groups
        self.coalesce_s = coalesce_s
        self.max_chars = max_chars
        self._groups: deque[EditGroup] = deque(maxlen=max_groups)

    def __len__(self) -> int:
        return len(self._groups)

    def groups(self, uri: str | None = None) -> list[EditGroup]:
        """Groups that changed something (typing a word and deleting it changes nothing)."""
        return [g for g in self._groups if (uri is None or g.uri == uri) and g.old != g.new]

    def last(self, uri: str | None = None) -> EditGroup | None:
        for g in reversed(self._groups):
            if (uri is None or g.uri == uri) and g.old != g.new:
                return g
        return None

    def forget(self, uri: str) -> None:
        kept = [g for g in self._groups if g.uri != uri]
        self._groups.clear()
        self._groups.extend(kept)

    def record(self, uri: str, text: str, start: int, end: int, inserted: str,
               now: float) -> None:
        """One change: ``text[start:end]`` (the text before the change) becomes ``inserted``."""
        removed = text[start:end]
        # editors may send more than changed: keep only what differs
        p = 0
        while p < min(len(removed), len(inserted)) and removed[p] == inserted[p]:
            p += 1
        q = 0
        while (q < min(len(removed), len(inserted)) - p
               and removed[len(removed) - 1 - q] == inserted[len(inserted) - 1 - q]):
            q += 1
        start, end = start + p, end - q
        removed, inserted = removed[p:len(removed) - q], inserted[p:len(inserted) - q]
        if not removed and not inserted:
            return
        delta = len(inserted) - len(removed)
        last = self._groups[-1] if self._groups else None
        joins = (
            last is not None and last.uri == uri and last.start >= 0
            and now - last.t_last <= self.coalesce_s
            and start <= last.end and end >= last.start
        )
        # later edits move the spans of this document's other groups, or make them unreliable
        for g in self._groups:
            if g.uri != uri or g.start < 0 or (joins and g is last):
                continue
            if end <= g.start:
                g.start += delta
            elif start < g.end:
                g.start = -1
        after_text = text[:start] + inserted + text[end:]
        if joins:
            assert last is not None
            lo, hi = min(last.start, start), max(last.end, end)
            old = text[lo:last.start] + last.old + text[last.end:hi]
            new = after_text[lo:hi + delta]
            last.start, last.old, last.new, last.t_last = lo, old, new, now
            group = last
        else:
            group = EditGroup(uri, start, removed, inserted, "", "", now, now)
            self._groups.append(group)
        a, b = _line_bounds(after_text, group.start, group.end)
        group.after = after_text[a:b][: self.max_chars]
        group.before = (after_text[a:group.start] + group.old + after_text[group.end:b])[
            : self.max_chars]


# --- region, prompt -------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """Lines ``first..last`` (inclusive) of a document: offsets ``start..end`` of its text
    (``end`` before the last line's line break) and the text between them."""

    first: int
    last: int
    start: int
    end: int
    text: str


def editable_region(text: str, offset: int, *, above: int = 2, below: int = 8) -> Region:
    """The lines around ``offset``: ``above`` lines before its line and ``below`` after."""
    starts = [0]
    for m in re.finditer(r"\r\n|\r|\n", text):
        starts.append(m.end())
    line = max(i for i, s in enumerate(starts) if s <= offset)
    first, last = max(0, line - above), min(len(starts) - 1, line + below)
    start = starts[first]
    end = starts[last + 1] if last + 1 < len(starts) else len(text)
    body = text[start:end]
    stripped = body.rstrip("\r\n")  # the region ends before its last line break
    return Region(first, last, start, start + len(stripped), stripped)


def _block(label: str, body: str) -> str:
    return f"<<<{label}\n{body}\n"


def render_prompt(file_window: str, path: str, history: Sequence[EditGroup],
                  region: Region) -> str:
    """A continuation-style prompt for a base model: the file first (its K/V is what the
    document's completions cached), then the edit history as before/after blocks, then the
    region's "before" block; the model continues with the region's "after" text and END."""
    parts = [file_window.rstrip("\n"), "\n\n", f"{END}\nEdits to {path}, oldest first:\n"]
    for g in history:
        parts.append(_block("before", g.before))
        parts.append(_block("after", g.after))
        parts.append(END + "\n")
    parts.append("The next edit:\n")
    parts.append(_block("before", region.text))
    parts.append(END + "\n<<<after\n")
    return "".join(parts)


# --- candidates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    text: str  # the region rewritten
    source: str  # "unchanged", "carry", "model"
    score: float = 0.0  # sum of token log-probabilities (filled in by the engine)
    n_tokens: int = 0


def _tokens(s: str) -> list[str]:
    return _WORD.findall(s)


def _substitutions(old: str, new: str) -> list[tuple[str, str]]:
    """Word-level replacements that turn ``old`` into ``new`` (pure insertions and deletions
    carry no pattern to repeat, so they give none)."""
    a, b = _tokens(old), _tokens(new)
    subs: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op != "replace":
            continue
        src, dst = "".join(a[i1:i2]).strip(), "".join(b[j1:j2]).strip()
        if src and dst and src != dst:
            subs.append((src, dst))
    return subs


def _replace_words(text: str, src: str, dst: str, *, inside: bool = False) -> str:
    """``src`` -> ``dst`` as whole words (identifiers), or also inside longer identifiers."""
    if _IDENT.match(src) and not inside:
        return re.sub(rf"(?<!\w){re.escape(src)}(?!\w)", dst, text)
    return text.replace(src, dst)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _opens_block(lines: list[str], at: int) -> bool:
    nxt = next((i for i in range(at + 1, len(lines)) if lines[i].strip()), None)
    return nxt is not None and _indent(lines[nxt]) > _indent(lines[at])


def _scope(lines: list[str], at: int) -> tuple[int, int]:
    """Lines ``a..b`` (exclusive) of the block the edit on line ``at`` belongs to: the body it
    opens (the next line is indented deeper), else the lines at its indentation or deeper."""
    ind = _indent(lines[at])
    if _opens_block(lines, at):
        b = next((i for i in range(at + 1, len(lines)) if lines[i].strip()
                  and _indent(lines[i]) <= ind), len(lines))
        return at, b
    a = next((i + 1 for i in range(at - 1, -1, -1) if lines[i].strip()
              and _indent(lines[i]) < ind), 0)
    b = next((i for i in range(at + 1, len(lines)) if lines[i].strip()
              and _indent(lines[i]) < ind), len(lines))
    return a, b


def _one_change(before: str, after: str) -> tuple[list[str], int, int, str, str] | None:
    """The single token-level insertion or deletion turning ``before`` into ``after``:
    (tokens of ``before``, where it starts, where it ends, text removed, text inserted)."""
    a, b = _tokens(before), _tokens(after)
    ops = [o for o in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
           if o[0] != "equal"]
    if len(ops) != 1 or ops[0][0] not in ("insert", "delete"):
        return None
    _, i1, i2, j1, j2 = ops[0]
    return a, i1, i2, "".join(a[i1:i2]), "".join(b[j1:j2])


def _call_edit(before: str, after: str) -> tuple[str, str, str, bool] | None:
    """A pure insertion or deletion at either end of a call's arguments, e.g. ``run(cfg)`` ->
    ``run(cfg, verbose)`` or ``fetch(a)`` -> ``fetch(ctx, a)``: (callee, text removed, text
    inserted, at the arguments' start)."""
    change = _one_change(before, after)
    if change is None:
        return None
    a, i1, i2, removed, inserted = change
    if i1 >= 2 and a[i1 - 1] == "(" and _IDENT.match(a[i1 - 2]):
        return a[i1 - 2], removed, inserted, True
    # the innermost call open at the change, and its closing parenthesis right after it
    depth, k = 0, i1 - 1
    while k >= 0:
        if a[k] == ")":
            depth += 1
        elif a[k] == "(":
            if depth == 0:
                break
            depth -= 1
        k -= 1
    if k < 1 or not _IDENT.match(a[k - 1]) or i2 >= len(a) or a[i2] != ")":
        return None
    return a[k - 1], removed, inserted, False


def _apply_call_edit(text: str, callee: str, removed: str, inserted: str,
                     at_start: bool) -> str:
    """Repeat a call edit at every call of ``callee`` in ``text`` whose arguments allow it."""
    out, pos = [], 0
    for m in re.finditer(rf"(?<![\w.]){re.escape(callee)}\(", text):
        if m.start() < pos:
            continue
        depth, k = 1, m.end()
        while k < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[k], 0)
            k += 1
        if depth:
            break
        open_, close = m.end(), k - 1  # just inside the call's "(" and at its ")"
        args = text[open_:close]
        if not args.strip():
            continue
        if at_start:
            if removed and not args.startswith(removed):
                continue
            if inserted and args.startswith(inserted):
                continue
            out.append(text[pos:open_] + inserted)
            pos = open_ + len(removed)
        else:
            if removed and not args.endswith(removed):
                continue
            if inserted and args.rstrip().endswith(inserted.strip()):
                continue
            out.append(text[pos:close - len(removed)] + inserted)
            pos = close
    out.append(text[pos:])
    return "".join(out)


def _line_start_edit(before: str, after: str) -> tuple[str, str] | None:
    """A pure insertion or deletion right after a line's indentation (``init()`` ->
    ``await init()``): (text removed, text inserted)."""
    change = _one_change(before, after)
    if change is None:
        return None
    a, i1, _, removed, inserted = change
    if i1 == 0 or (i1 == 1 and not a[0].strip()):
        if not (removed or inserted).strip():
            return None
        return removed, inserted
    return None


def _apply_line_start_edit(text: str, indent: str, removed: str, inserted: str) -> str:
    """Repeat it on the lines of ``text`` that have the same indentation."""
    out = []
    for line in split_lines(text, keepends=True):
        body = line[len(indent):]
        if (line.startswith(indent) and body.strip() and not body[0].isspace()
                and (body.startswith(removed) if removed else not body.startswith(inserted))
                and _indent(line) == len(indent)):
            line = indent + inserted + body[len(removed):]
        out.append(line)
    return "".join(out)


def carry_over_candidates(region: Region, history: Sequence[EditGroup],
                          *, skip: tuple[int, int] | None = None) -> list[str]:
    """Rewrites of the region that repeat the last groups' changes elsewhere in it: the same
    word replacements (in the edit's block, then in the whole region; a longer identifier also
    inside other identifiers, as a typo fixed once is fixed everywhere) and the same argument
    added to or removed from other calls of the same function.

    ``skip`` is the span (document offsets) of the edit itself, left as the user made it.
    The last group's candidates come first."""
    out: list[str] = []
    text = region.text
    a, b = skip if skip is not None else (0, 0)
    a, b = max(a - region.start, 0), max(min(b - region.start, len(text)), 0)
    while a > 0 and (text[a - 1].isalnum() or text[a - 1] == "_"):  # whole words
        a -= 1
    while b < len(text) and (text[b].isalnum() or text[b] == "_"):
        b += 1
    head, mid, tail = text[:a], text[a:b], text[b:]
    lines = split_lines(text, keepends=True) or [""]
    at = len(split_lines(text[:a] + "x")) - 1  # the edit's line (LSP line breaks)
    s_a, s_b = _scope(lines, min(at, len(lines) - 1))
    scope_lo = sum(len(x) for x in lines[:s_a])
    scope_hi = sum(len(x) for x in lines[:s_b])

    def add(cand: str) -> None:
        if cand != text and cand not in out:
            out.append(cand)

    def within(lo: int, hi: int, fn: Callable[[str], str]) -> str:
        """``fn`` applied to text[lo:hi] outside the edit itself."""
        pieces = [(0, lo, False), (lo, min(a, hi), True), (a, b, False),
                  (max(b, lo), hi, True), (hi, len(text), False)]
        res = []
        for p, q, apply in pieces:
            if q <= p:
                continue
            res.append(fn(text[p:q]) if apply else text[p:q])
        return "".join(res)

    for g in reversed(history[-3:]):
        subs = _substitutions(g.before, g.after)  # whole words, whatever was typed
        if subs:
            def rename(s: str, inside: bool = False, subs: list[tuple[str, str]] = subs) -> str:
                for src, dst in subs:
                    s = _replace_words(s, src, dst, inside=inside)
                return s
            add(within(scope_lo, scope_hi, rename))
            # a parameter renamed on the line that opens its function stays in that body; a
            # function's own name, a field or a local may be used anywhere in the region
            opener = _opens_block(lines, min(at, len(lines) - 1))
            named = all(re.search(rf"(?<!\w){re.escape(dst)}\s*\(", g.after) for _, dst in subs)
            if not opener or named:
                add(within(0, len(text), rename))
            if all(len(src) >= 4 and _IDENT.match(src) for src, _ in subs):
                add(within(0, len(text), lambda s: rename(s, inside=True)))
            continue
        call = _call_edit(g.before, g.after)
        if call is not None:
            add(_apply_call_edit(head, *call) + mid + _apply_call_edit(tail, *call))
            continue
        line_start = _line_start_edit(g.before, g.after)
        if line_start is not None:
            indent = g.after[: len(g.after) - len(g.after.lstrip(" \t"))]
            removed, inserted = line_start

            def prefix(s: str, i: str = indent, r: str = removed, n: str = inserted) -> str:
                return _apply_line_start_edit(s, i, r, n)

            add(within(scope_lo, scope_hi, prefix))
    return out


# --- diff and gate --------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEditSpan:
    """Replace ``text[start:end]`` (document offsets) with ``new``."""

    start: int
    end: int
    new: str


def minimal_edits(region: Region, rewrite: str) -> list[TextEditSpan]:
    """The smallest edits turning the region into ``rewrite``: a character diff whose pieces on
    one line are merged (an identifier changed in two places of a line is one edit) and whose
    ends are trimmed of what both sides share."""
    old = region.text
    if old == rewrite:
        return []
    sm = difflib.SequenceMatcher(None, old, rewrite, autojunk=False)
    spans: list[list[int]] = []  # [a1, a2, b1, b2]
    for op, a1, a2, b1, b2 in sm.get_opcodes():
        if op == "equal":
            continue
        if spans and "\n" not in old[spans[-1][1]:a1] and "\r" not in old[spans[-1][1]:a1]:
            spans[-1][1], spans[-1][3] = a2, b2
        else:
            spans.append([a1, a2, b1, b2])
    def word(c: str) -> bool:
        return c.isalnum() or c == "_"

    grown: list[list[int]] = []
    for a1, a2, b1, b2 in spans:
        # whole words read better: "w" -> "width", not "" -> "idth" after a "w"
        while a1 > 0 and b1 > 0 and word(old[a1 - 1]) and old[a1 - 1] == rewrite[b1 - 1]:
            a1, b1 = a1 - 1, b1 - 1
        while (a2 < len(old) and b2 < len(rewrite) and word(old[a2])
               and old[a2] == rewrite[b2]):
            a2, b2 = a2 + 1, b2 + 1
        if grown and a1 <= grown[-1][1]:  # grown into the previous one
            grown[-1][1], grown[-1][3] = a2, b2
        else:
            grown.append([a1, a2, b1, b2])
    out = [TextEditSpan(region.start + a1, region.start + a2, rewrite[b1:b2])
           for a1, a2, b1, b2 in grown]
    return out


@dataclass(frozen=True)
class Choice:
    candidate: Candidate | None  # None: nothing to suggest
    margin: float  # its score minus the unchanged region's (nats)
    scored: list[Candidate] = field(default_factory=list)


def choose(unchanged: Candidate, others: Iterable[Candidate], threshold: float) -> Choice:
    """The best-scoring rewrite if it beats the unchanged region by more than ``threshold``
    nats (per candidate the sum of its tokens' log-probabilities, the region's end included)."""
    scored = sorted(others, key=lambda c: c.score, reverse=True)
    best = next((c for c in scored if c.text != unchanged.text), None)
    if best is None:
        return Choice(None, 0.0, [unchanged, *scored])
    margin = best.score - unchanged.score
    return Choice(best if margin > threshold else None, margin, [unchanged, *scored])
