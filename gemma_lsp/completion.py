"""Inline completion: debounce, typed-ahead reuse, streaming with early stops, warming.

One `CompletionService` per server. A request waits out the debounce (a newer request for the
same document wins), reuses the shown suggestion when the user typed its first characters,
otherwise streams a completion from the backend and stops it as soon as a quality rule fires.
After an idle pause it asks the backend to prefill the region last edited so the next request
is cheap.

Two kinds of answer: inline ghost text (re-asked on every keystroke, so past the latency
budget it may answer with the text so far) and completion-menu items (`unit=True`: accepted
once, so only complete units, `postprocess.complete_unit`, waited for up to
`completion.menuWaitMs`, or nothing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from gemma_lsp.backend import Backend, BackendError, BackendStarting, astart, astream
from gemma_lsp.config import ServerOptions
from gemma_lsp.context import CompletionContext, build_context
from gemma_lsp.documents import Document, DocumentStore, convert_eol
from gemma_lsp.postprocess import (
    complete_unit,
    dedupe,
    finalize,
    should_stop_early,
    trim_completion,
    typed_ahead,
)
from gemma_lsp.prompts import completion_prompt, custom_fim_template, template_for_model

log = logging.getLogger(__name__)


@dataclass
class _Shown:
    """The last suggestion returned for a document, for typed-ahead reuse."""

    prefix: str  # document text before the cursor when it was made
    texts: list[str]
    units: list[str]  # the complete units among them (menu items)


@dataclass
class _Candidate:
    """One decoded suggestion; `closed`: its last line is known to be complete (the model
    ended it, or decoding went on past it)."""

    text: str
    closed: bool


@dataclass
class _Result:
    texts: list[str]  # inline suggestions
    units: list[str]  # completion-menu items: complete units only


@dataclass
class _Inflight:
    """A completion being computed, shared by every request for the same text and cursor."""

    key: tuple[int, int, int]  # document version, cursor offset, text length
    task: asyncio.Task[_Result] | None = None
    waiters: int = 0
    unit: bool = False  # a completion menu waits for it: no latency-budget cut mid-unit


@dataclass
class Stats:
    requests: int = 0
    typed_ahead: int = 0
    engine_calls: int = 0
    superseded: int = 0


def _ended_by_model(stream: Any) -> bool:
    """Whether the model ended the text itself (end of text or a stop string), so that its
    last line is complete; not when it was cut at the token limit."""
    finish = getattr(stream, "finish", None)
    return finish is not None and finish.reason in ("stop", "stop_string")


class CompletionService:
    def __init__(
        self,
        store: DocumentStore,
        backend: Callable[[], Backend],
        options: Callable[[], ServerOptions],
        on_error: Callable[[str], None],
        root_uri: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.options = options
        self.on_error = on_error
        self.root_uri = root_uri
        self.stats = Stats()
        self._generation: dict[str, int] = {}  # uri -> newest request number
        self._shown: dict[str, _Shown] = {}
        self._inflight: dict[str, _Inflight] = {}
        self._warm_tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # uri -> (text before the cursor, task) of a suggestion still decoding after its answer
        self._continuing: dict[str, tuple[str, asyncio.Task[Any]]] = {}
        self.last_latency_ms = 0.0

    def template(self) -> object:
        opts = self.options()
        if opts.fim_template and "{" in opts.fim_template:
            return custom_fim_template(opts.fim_template)
        name = opts.engine.model_name or self.backend().model_name
        return template_for_model(name, opts.fim_template)

    def context(self, doc: Document, offset: int) -> CompletionContext:
        budgets = self.options().completion.budgets()
        return build_context(doc, offset, self.store, budgets, root_uri=self.root_uri())

    def prompt(self, ctx: CompletionContext) -> tuple[str, list[str]]:
        return completion_prompt(ctx, self.template())  # type: ignore[arg-type]

    async def complete(self, uri: str, offset: int, unit: bool = False) -> list[str]:
        """Suggestions for the cursor at `offset` of `uri` (empty when there is nothing good);
        with `unit`, complete units for a completion menu (see the module docstring).

        Requests for the same document text and cursor share one computation: editors send
        `inlineCompletion` and `completion` for the same keystroke, and re-ask after a
        cancel; neither may supersede the other. A request for a newer state of the
        document cancels the work nobody waits for any more."""
        doc = self.store.get(uri)
        if doc is None or doc.skipped or not self.options().completion.enabled_for(
            doc.language_id
        ):
            return []
        key = (doc.version, offset, len(doc.text))
        flight = self._inflight.get(uri)
        if flight is None or flight.key != key or flight.task is None or flight.task.done():
            if flight is not None and flight.waiters == 0 and flight.task is not None:
                flight.task.cancel()  # abandoned work for an older state of the document
            self.stats.requests += 1
            flight = _Inflight(key, unit=unit)
            flight.task = asyncio.get_running_loop().create_task(
                self._complete(uri, offset, flight))
            self._inflight[uri] = flight
        flight.unit = flight.unit or unit
        flight.waiters += 1
        t0 = time.perf_counter()
        eol = doc.eol_at(offset)  # a multi-line suggestion for a CRLF document uses CRLF
        task = flight.task
        try:
            done = await asyncio.shield(task)
            result = [convert_eol(s, eol) for s in (done.units if unit else done.texts)]
            log.info("completion %s@%d: %d suggestion(s) in %.0f ms%s", uri, offset,
                     len(result), (time.perf_counter() - t0) * 1000,
                     " (shared)" if flight.waiters > 1 else "")
            return result
        except asyncio.CancelledError:
            # The work goes on while this is still the document's newest request: editors
            # cancel requests they will ask again (VS Code does when its widgets change), and
            # the next ask, or the user typing the suggestion, then gets it at once.
            log.info("completion %s@%d: cancelled by the client", uri, offset)
            raise
        finally:
            flight.waiters -= 1
            if self._inflight.get(uri) is flight and task.done():
                del self._inflight[uri]

    async def _complete(self, uri: str, offset: int, flight: _Inflight) -> _Result:
        opts = self.options().completion
        doc = self.store.get(uri)
        if doc is None:
            return _Result([], [])
        t_start = time.perf_counter()
        gen = self._generation[uri] = self._generation.get(uri, 0) + 1
        before = doc.text[:offset]

        # typed-ahead: the user is typing what we already suggested
        shown = self._shown.get(uri)
        if shown is not None:
            rest = [r for t in shown.texts if (r := typed_ahead(t, shown.prefix, before))]
            units = [r for t in shown.units if (r := typed_ahead(t, shown.prefix, before))]
            if rest and (units or not flight.unit):
                self.stats.typed_ahead += 1
                self._shown[uri] = _Shown(before, rest, units)
                return _Result(rest, units)

        # decoding for this text goes on in the background (a menu's wait ran out): wait for it
        # rather than start over (a new request would supersede it in the engine)
        going = self._continuing.get(uri)
        if going is not None and not going[1].done() and before.startswith(going[0]) \
                and _diverged(self._shown.get(uri), before):
            going[1].cancel()  # the user typed something else than it decodes: start afresh
            self._continuing.pop(uri, None)
            going = None
        if going is not None and not going[1].done() and before.startswith(going[0]):
            left = t_start + opts.menu_wait_ms / 1000 - time.perf_counter()
            await asyncio.wait({going[1]}, timeout=max(0.0, left))
            shown = self._shown.get(uri)
            if shown is not None:
                rest = [r for t in shown.texts if (r := typed_ahead(t, shown.prefix, before))]
                units = [r for t in shown.units if (r := typed_ahead(t, shown.prefix, before))]
                if rest:
                    return _Result(rest, units)
            if not going[1].done():
                return _Result([], [])  # still decoding: the next ask gets it

        # debounce: only the newest request for a document goes to the model
        await asyncio.sleep(opts.debounce_ms / 1000)
        if self._generation.get(uri) != gen:
            self.stats.superseded += 1
            log.info("completion %s@%d: superseded by a newer request", uri, offset)
            return _Result([], [])
        doc = self.store.get(uri)
        if doc is None or doc.text[:offset] != before:
            log.info("completion %s@%d: the document changed meanwhile", uri, offset)
            return _Result([], [])  # the client will ask again

        ctx = self.context(doc, offset)
        prompt, stop = self.prompt(ctx)
        found: list[_Candidate] = []
        for i in range(max(1, opts.candidates)):
            temperature = opts.temperature if i == 0 else max(opts.temperature, 0.7)
            got = await self._one(prompt, stop, ctx, uri, before, temperature, i or None,
                                  flight, t_start)
            if got is None:
                break
            found.append(got)
        result = finalize([c.text for c in found], ctx, opts.max_lines)
        units = self._units(found, ctx)
        if result:
            self._shown[uri] = _Shown(before, result, units)
        else:
            self._shown.pop(uri, None)
        return _Result(result, units)

    def _units(self, found: list[_Candidate], ctx: CompletionContext) -> list[str]:
        """The complete units of the candidates (a rule's cut ends a line: it is closed)."""
        max_lines = self.options().completion.max_lines
        out = []
        for c in found:
            trimmed = trim_completion(c.text, ctx, max_lines)
            closed = c.closed or len(trimmed) < len(c.text.rstrip())
            unit = complete_unit(trimmed, ctx, final=closed)
            if unit is not None:
                out.append(unit)
        return dedupe(out)

    async def _one(self, prompt: str, stop: list[str], ctx: CompletionContext, uri: str,
                   before: str, temperature: float, seed: int | None, flight: _Inflight,
                   t_start: float) -> _Candidate | None:
        """One suggestion. Past the latency budget an inline-only request answers at the next
        line end and keeps decoding in the background, so the typed-ahead path can serve the
        longer text. A menu request answers past the budget only with a complete unit in
        hand, and at `menu_wait_ms` after it arrived with what it has (maybe nothing) while
        decoding goes on in the background for the client's next ask."""
        opts = self.options().completion
        t0 = time.perf_counter()
        budget = opts.latency_budget_ms / 1000 if opts.latency_budget_ms else float("inf")
        hard = t_start + opts.menu_wait_ms / 1000 if opts.menu_wait_ms else float("inf")
        pieces: AsyncGenerator[str, None] | None = None
        closed = False
        text = ""
        try:
            stream = await astart(
                self.backend(), prompt, max_tokens=opts.max_tokens,
                temperature=temperature, stop=stop, doc=uri, priority=0, seed=seed,
                kind="completion",
            )
            self.stats.engine_calls += 1
            pieces = astream(stream)
            while True:
                nxt = asyncio.ensure_future(anext(pieces, None))
                if flight.unit and hard != float("inf"):
                    await asyncio.wait({nxt}, timeout=max(0.0, hard - time.perf_counter()))
                    if not nxt.done():  # the menu's wait is over: answer, decode on
                        log.info("completion %s: menu wait over (%d ms)", uri, opts.menu_wait_ms)
                        task = self._spawn(self._finish_later(uri, ctx, before, pieces, text,
                                                              stream, nxt))
                        self._continuing[uri] = (before, task)
                        pieces = None
                        break
                piece = await nxt
                if piece is None:
                    closed = _ended_by_model(stream)
                    break
                text += piece
                if should_stop_early(text, ctx, opts.max_lines):
                    closed = True
                    break
                waited = time.perf_counter() - t0
                if waited <= budget or not text.strip() or temperature != 0:
                    continue
                if flight.unit:
                    if text.endswith("\n") and complete_unit(
                            trim_completion(text, ctx, opts.max_lines), ctx) is not None:
                        closed = True
                        break  # a unit in hand, the budget spent: answer with it
                    continue
                if text.endswith("\n") or waited > 2 * budget:
                    task = self._spawn(self._finish_later(uri, ctx, before, pieces, text,
                                                          stream))
                    self._continuing[uri] = (before, task)
                    pieces = None  # the background task owns (and closes) the stream now
                    closed = text.endswith("\n")
                    break
        except BackendStarting:  # its progress is on show: answer empty, say nothing
            return None
        except BackendError as e:
            self.on_error(str(e))
            return None
        finally:
            if pieces is not None:
                await pieces.aclose()  # cancels the engine work if it is still running
        self.last_latency_ms = (time.perf_counter() - t0) * 1000
        return _Candidate(text, closed)

    async def _finish_later(self, uri: str, ctx: CompletionContext, before: str,
                            pieces: AsyncGenerator[str, None], text: str, stream: Any,
                            pending: asyncio.Future[str | None] | None = None) -> None:
        """Keep decoding a suggestion already answered; extend it (or, when nothing could be
        shown, offer it) while the user has not moved."""
        opts = self.options().completion
        closed = False
        try:
            while True:
                piece = await (pending if pending is not None else anext(pieces, None))
                pending = None
                if piece is None:
                    closed = _ended_by_model(stream)
                    break
                text += piece
                if should_stop_early(text, ctx, opts.max_lines):
                    closed = True
                    break
        except BackendError:
            return
        finally:
            await pieces.aclose()
        shown = self._shown.get(uri)
        longer = finalize([text], ctx, opts.max_lines)
        units = self._units([_Candidate(text, closed)], ctx)
        if not longer:
            return
        if shown is None:
            self._shown[uri] = _Shown(before, longer, units)
            return
        if shown.prefix != before and not shown.prefix.startswith(before):
            return
        # the user may have typed some of it meanwhile: keep what is still ahead of them
        rest = [r for t in longer if (r := typed_ahead(t, before, shown.prefix))]
        units = [r for t in units if (r := typed_ahead(t, before, shown.prefix))]
        if rest:
            self._shown[uri] = _Shown(shown.prefix, rest, units)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run `coro` in the background (kept referenced until it ends)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ warming

    def schedule_warm(self, uri: str) -> None:
        """(Re)start the idle timer after which the document is prefilled in the engine."""
        old = self._warm_tasks.pop(uri, None)
        if old is not None:
            old.cancel()
        delay = self.options().completion.warm_after_ms
        if delay <= 0:
            return
        try:
            self._warm_tasks[uri] = asyncio.get_running_loop().create_task(
                self._warm_later(uri, delay / 1000)
            )
        except RuntimeError:  # no running loop (unit tests calling handlers directly)
            pass

    async def _warm_later(self, uri: str, delay: float) -> None:
        await asyncio.sleep(delay)
        doc = self.store.get(uri)
        if doc is None or doc.skipped or not self.options().completion.enabled_for(
            doc.language_id
        ):
            return
        at = self.warm_offset(doc)
        if at is None:
            return
        prompt, _ = self.prompt(self.context(doc, at))
        try:
            await asyncio.to_thread(self.backend().warm, prompt, uri)
        except BackendError as e:
            log.info("warming %s failed: %s", uri, e)

    def warm_offset(self, doc: Document) -> int | None:
        """Where the next completion is likely: a document that fits the prefix budget is warmed
        for a cursor at its end (for a prefix-only template that prompt contains the prompt of
        every cursor position); a larger one at the end of its last edited region (its end
        has nothing to do with the cursor, and its prompt would share nothing with the next
        one), and not at all before its first edit."""
        budget = self.options().completion.budgets().prefix_chars
        if len(doc.text) <= budget:
            return len(doc.text)
        edits = doc.recent_edits()
        if not edits:
            return None
        return doc.line_end(edits[0].end_line)

    def forget(self, uri: str) -> None:
        self._shown.pop(uri, None)
        self._continuing.pop(uri, None)
        flight = self._inflight.pop(uri, None)
        if flight is not None and flight.task is not None:
            flight.task.cancel()
        self._generation.pop(uri, None)
        task = self._warm_tasks.pop(uri, None)
        if task is not None:
            task.cancel()


def _diverged(shown: _Shown | None, before: str) -> bool:
    """The user typed, since ``shown`` was answered, characters that none of its texts has
    there: decoding on from that answer can no longer give them anything."""
    if shown is None or not before.startswith(shown.prefix) or before == shown.prefix:
        return False
    typed = before[len(shown.prefix):]
    return all(not t.startswith(typed) and not typed.startswith(t) for t in shown.texts)
