"""Next-edit suggestions in the server: the edit history fed by document changes, one
suggestion per request (scored by the engine, gated), its LSP shape, and the
shown / accepted / rejected counts that `gemma.status` reports.

The wire format follows copilot-language-server's `textDocument/copilotInlineEdit`: params
``{textDocument: {uri, version}, position}``, result ``{edits: [{text, range, textDocument,
command}]}`` (``newText`` too, so an edit is also a TextEdit), with `textDocument/
didShowInlineEdit` when a client shows one and the edit's command (`gemma.nextEdit.accept`)
when the user takes it; `gemma.nextEdit.reject` when they dismiss it. Each edit also carries
``parts``: the smallest edits it is made of, for clients that draw them one by one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lsprotocol import types as t

from gemma_lsp.backend import Backend, BackendError
from gemma_lsp.config import ServerOptions
from gemma_lsp.documents import Document, DocumentStore
from gemma_lsp.next_edit import (
    Candidate,
    EditHistory,
    TextEditSpan,
    carry_over_candidates,
    choose,
    editable_region,
    minimal_edits,
)

log = logging.getLogger(__name__)

ACCEPT_COMMAND = "gemma.nextEdit.accept"
REJECT_COMMAND = "gemma.nextEdit.reject"
POST_CHARS = 160  # text after the region scored with each candidate (how it reads on)


@dataclass
class Suggestion:
    id: str
    uri: str
    version: int
    spans: list[TextEditSpan]
    margin: float
    source: str
    ms: float


@dataclass
class NextEditStats:
    requests: int = 0
    suggested: int = 0  # returned to a client
    shown: int = 0
    accepted: int = 0
    rejected: int = 0
    last_ms: float = 0.0
    margins: list[float] = field(default_factory=list)
    # the last requests' engine figures: (queue ms, compute ms, tokens evaluated)
    engine: list[tuple[float, float, int]] = field(default_factory=list)

    def as_dict(self, threshold: float) -> dict[str, Any]:
        decided = self.accepted + self.rejected
        return {
            "requests": self.requests, "suggested": self.suggested, "shown": self.shown,
            "accepted": self.accepted, "rejected": self.rejected,
            "accept_rate": round(self.accepted / decided, 3) if decided else None,
            "threshold": round(threshold, 2), "last_ms": round(self.last_ms, 1),
            "engine_queue_ms_p50": _median([q for q, _, _ in self.engine]),
            "engine_compute_ms_p50": _median([c for _, c, _ in self.engine]),
            "engine_evaluated_tokens_p50": _median([float(n) for _, _, n in self.engine]),
        }


def _median(xs: list[float]) -> float | None:
    return round(sorted(xs)[len(xs) // 2], 1) if xs else None


class NextEditService:
    def __init__(self, store: DocumentStore, backend: Callable[[], Backend],
                 options: Callable[[], ServerOptions],
                 prompt_for: Callable[[Document, int], str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.backend = backend
        self.options = options
        self.prompt_for = prompt_for  # the text the model sees before an offset of a document
        self.clock = clock
        self.history = EditHistory()
        self.stats = NextEditStats()
        self._ids = itertools.count(1)
        self._last: dict[str, Suggestion] = {}  # uri -> the newest suggestion
        self._decided: dict[str, str] = {}  # suggestion id -> "accepted" / "rejected"

    # ---------------------------------------------------------------- history

    def on_edit(self, doc: Document, start: int, end: int, inserted: str) -> None:
        """A change about to be applied to ``doc`` (its text still the old one)."""
        self.history.record(doc.uri, doc.text, start, end, inserted, self.clock())
        self._last.pop(doc.uri, None)  # a suggestion for older text is stale

    def forget(self, uri: str) -> None:
        self.history.forget(uri)
        self._last.pop(uri, None)

    # ---------------------------------------------------------------- gating

    def threshold(self) -> float:
        """The configured margin, raised while users reject more than they accept."""
        base = self.options().next_edit.threshold
        s = self.stats
        decided = s.accepted + s.rejected
        if not self.options().next_edit.adaptive or decided < 5:
            return base
        reject_rate = s.rejected / decided
        return base + 4.0 * max(0.0, reject_rate - 0.5)

    # ---------------------------------------------------------------- suggest

    async def suggest(self, uri: str, version: int | None) -> Suggestion | None:
        """The next edit for ``uri``, or None. Blocks only on the engine's scoring."""
        opts = self.options().next_edit
        doc = self.store.get(uri)
        if not opts.enabled or doc is None or doc.skipped:
            return None
        if version is not None and version != doc.version:
            return None  # the client's text is not ours: a suggestion would be misplaced
        self.stats.requests += 1
        last = self._last.get(uri)
        if last is not None and last.version == doc.version:
            return last
        group = self.history.last(uri)
        if group is None or group.start < 0:
            return None
        t0 = time.perf_counter()
        text, doc_version = doc.text, doc.version
        region = editable_region(text, group.start, above=opts.lines_above,
                                 below=opts.lines_below)
        cands = carry_over_candidates(region, self.history.groups(uri),
                                      skip=(group.start, group.end))
        if not cands:
            return None
        prompt = self.prompt_for(doc, region.start)
        texts = [c + text[region.end : region.end + POST_CHARS] for c in [region.text, *cands]]
        try:
            scores = await asyncio.to_thread(self.backend().score, prompt, scored_window(texts),
                                             doc=uri)
        except BackendError as e:
            log.info("next edit for %s: %s", uri, e)
            return None
        cur = self.store.get(uri)
        if cur is None or cur.version != doc_version or cur.text != text:
            return None  # edited while the engine scored: the answer is for old text
        self.stats.engine = (self.stats.engine + [(scores.queue_ms, scores.compute_ms,
                                                   scores.evaluated_tokens)])[-50:]
        sums = [sum(lp) for lp in scores.logprobs]
        unchanged = Candidate(region.text, "unchanged", sums[0])
        others = [Candidate(c, "carry", s) for c, s in zip(cands, sums[1:], strict=True)]
        choice = choose(unchanged, others, self.threshold())
        ms = (time.perf_counter() - t0) * 1000
        self.stats.last_ms = ms
        self.stats.margins = (self.stats.margins + [choice.margin])[-50:]
        if choice.candidate is None:
            return None
        spans = minimal_edits(region, choice.candidate.text)
        if not spans:
            return None
        sug = Suggestion(f"nes-{next(self._ids)}", uri, doc_version, spans, choice.margin,
                         choice.candidate.source, ms)
        self._last[uri] = sug
        self.stats.suggested += 1
        return sug

    def current(self, uri: str, version: int) -> Suggestion | None:
        """The suggestion for exactly this text of ``uri``, if one was made."""
        s = self._last.get(uri)
        return s if s is not None and s.version == version else None

    # ---------------------------------------------------------------- feedback

    def shown(self, suggestion_id: str) -> None:
        self.stats.shown += 1

    def decide(self, suggestion_id: str, verdict: str) -> None:
        if self._decided.get(suggestion_id):
            return  # each suggestion counts once
        self._decided[suggestion_id] = verdict
        if len(self._decided) > 1000:
            self._decided.pop(next(iter(self._decided)))
        if verdict == "accepted":
            self.stats.accepted += 1
        else:
            self.stats.rejected += 1
        for uri, s in list(self._last.items()):
            if s.id == suggestion_id:
                del self._last[uri]

    # ---------------------------------------------------------------- LSP shapes

    def to_lsp(self, doc: Document, sug: Suggestion) -> dict[str, Any]:
        """One combined edit (first change to last), its parts, and the accept command."""
        a, b = sug.spans[0].start, sug.spans[-1].end
        text = doc.text
        new = []
        pos = a
        for s in sug.spans:
            new.append(text[pos:s.start])
            new.append(s.new)
            pos = s.end
        new_text = "".join(new)
        eol = doc.eol
        if eol != "\n":  # the region is the document's own text; the model's text is not
            new_text = new_text.replace("\r\n", "\n").replace("\n", eol)
        rng = _range(doc, a, b)
        parts = [{"range": _range(doc, s.start, s.end), "newText": s.new} for s in sug.spans]
        return {
            "text": new_text, "newText": new_text, "range": rng,
            "textDocument": {"uri": doc.uri, "version": sug.version},
            "command": {"title": "Accept next edit", "command": ACCEPT_COMMAND,
                        "arguments": [sug.id]},
            "parts": parts,
            "data": {"id": sug.id, "margin": round(sug.margin, 2), "source": sug.source},
        }

    def inline_insertion(self, doc: Document, offset: int) -> t.InlineCompletionItem | None:
        """The current suggestion as ghost text when it only inserts, on the cursor's line,
        at or after the cursor."""
        sug = self.current(doc.uri, doc.version)
        if sug is None or len(sug.spans) != 1:
            return None
        s = sug.spans[0]
        if s.start != s.end or s.start < offset:
            return None
        between = doc.text[offset:s.start]
        if "\n" in between or "\r" in between:
            return None
        return t.InlineCompletionItem(
            insert_text=between + s.new,
            range=t.Range(doc.position_at(offset), doc.position_at(s.start)),
            command=t.Command(title="Accept next edit", command=ACCEPT_COMMAND,
                              arguments=[sug.id]),
        )

    def status(self) -> dict[str, Any]:
        return self.stats.as_dict(self.threshold())


def scored_window(texts: list[str]) -> list[str]:
    """The texts cut where they agree again for good: after the line that follows their last
    difference (what comes later reads the same in all of them and only costs time)."""
    first = texts[0]
    same = min(_common_suffix_len(first, t) for t in texts[1:]) if len(texts) > 1 else 0
    tail = first[len(first) - same:]
    keep = 0
    for _ in range(2):  # the rest of the differing line and the line after it
        nl = tail.find("\n", keep)
        if nl < 0:
            keep = len(tail)
            break
        keep = nl + 1
    cut = same - keep
    return [t[: len(t) - cut] if cut > 0 else t for t in texts]


def _common_suffix_len(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _range(doc: Document, a: int, b: int) -> dict[str, Any]:
    p, q = doc.position_at(a), doc.position_at(b)
    return {"start": {"line": p.line, "character": p.character},
            "end": {"line": q.line, "character": q.character}}
