"""Code actions: Explain, Refactor, Add docstring, Fix with Gemma. Listing is instant and every
action carries the command that runs it (Helix 25.01 runs the command of the action it listed,
not of the resolved one); the model runs in that command, which answers at once and delivers
its edit with `workspace/applyEdit` (see commands.py). Only a client that cannot apply edits
sent by the server gets lazy actions whose edit `codeAction/resolve` computes. Edits are
minimal and versioned. While the user reads the list, the prompt of the action they most
likely pick is prefilled in the engine (`schedule_warm`), so its first text comes soon.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lsprotocol import types as t

from gemma_lsp.backend import Backend, BackendError, astart, astream
from gemma_lsp.config import ServerOptions
from gemma_lsp.context import CompletionContext, build_context
from gemma_lsp.documents import Document, DocumentStore, convert_eol, split_lines
from gemma_lsp.prompts import (
    Example,
    Insertion,
    InstructionTemplates,
    copies_example,
    docstring_insertion,
    docstring_prompt,
    explain_insertion,
    explain_prompt,
    explanation_text,
    extract_code_block,
    fix_prompt,
    pick_examples,
    refactor_prompt,
)

log = logging.getLogger(__name__)

KINDS = {
    "explain": ("Explain with Gemma", t.CodeActionKind.Empty),
    "refactor": ("Refactor with Gemma", t.CodeActionKind.RefactorRewrite),
    "docstring": ("Add docstring with Gemma", t.CodeActionKind.RefactorRewrite),
    "fix": ("Fix with Gemma", t.CodeActionKind.QuickFix),
}
ACTION_PRIORITY = 10  # below completions in the engine's queue
COPIED = "Gemma answered about an example of its prompt, not about this code"
NOT_A_FIX = "Gemma's answer does not look like the selected code fixed"
MIN_FIX_SIMILARITY = 0.4  # difflib ratio between the selection and its fixed version
NO_CHANGE = "Gemma suggested no change"  # a rewrite equal to the selection (clients may match it)


class ActionError(Exception):
    """A user-facing refusal (stale document, nothing to change, backend down, cancelled)."""


class CancelScope:
    """The engine streams one command started; cancelling it stops them all."""

    def __init__(self) -> None:
        self.streams: set[Any] = set()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        for s in list(self.streams):
            s.cancel()


@dataclass
class Selection:
    doc: Document
    start: int  # string offsets, expanded to whole lines
    end: int

    @property
    def text(self) -> str:
        return self.doc.text[self.start : self.end]

    @property
    def eol(self) -> str:
        """The line break the selection uses (edits for a CRLF document use CRLF)."""
        return self.doc.eol_at(self.start)


ACTION_COMMANDS = {"explain": "gemma.explain", "refactor": "gemma.refactor",
                   "docstring": "gemma.docstring", "fix": "gemma.fix"}


def _action(title: str, kind: str, data: dict[str, Any], lazy: bool,
            diagnostics: list[t.Diagnostic] | None = None) -> t.CodeAction:
    """A lazy action (data only: `codeAction/resolve` computes its edit), or one that carries
    its command (and the same data, so that resolving it is harmless and instant)."""
    if lazy:
        return t.CodeAction(title=title, kind=kind, diagnostics=diagnostics, data=data)
    command = t.Command(title, ACTION_COMMANDS[data["kind"]], arguments=[data])
    return t.CodeAction(title=title, kind=kind, diagnostics=diagnostics, command=command,
                        data=data)


def select_lines(doc: Document, rng: t.Range) -> Selection:
    """The selection grown to whole lines (the cursor's line when it is empty)."""
    a, b = doc.range_offsets(rng)
    first = doc.line_of_offset(a)
    last = doc.line_of_offset(b)
    if b > a and last > first and b == doc.line_start(last):
        last -= 1  # a selection ending at column 0 does not include that line
    return Selection(doc, doc.line_start(first), doc.line_end(last, include_eol=True))


def is_chat_model(name: str) -> bool:
    """Instruction-tuned checkpoints get the chat template; base models the few-shot form."""
    n = name.lower()
    return any(k in n for k in ("-it", "_it", "instruct", "chat"))


class ActionService:
    def __init__(self, store: DocumentStore, backend: Callable[[], Backend],
                 options: Callable[[], ServerOptions]) -> None:
        self.store = store
        self.backend = backend
        self.options = options
        self._warm_tasks: dict[str, asyncio.Task[None]] = {}
        self._warmed: dict[str, str] = {}  # uri -> the action prompt last warmed

    # ------------------------------------------------------------------ listing

    def offer(self, params: t.CodeActionParams, lazy: bool = False) -> list[t.CodeAction]:
        """The actions for a range. Each carries a command that computes and applies its
        edit; `lazy` (a client that resolves edits but cannot apply a server's edit): data
        only, the edit comes from `codeAction/resolve`."""
        doc = self.store.get(params.text_document.uri)
        if doc is None or doc.skipped or not self.options().actions.enabled:
            return []
        base = {"uri": doc.uri, "version": doc.version, "range": range_to_json(params.range)}
        out = []
        only = params.context.only
        for kind in ("explain", "refactor", "docstring"):
            title, code_kind = KINDS[kind]
            if only and not any(str(code_kind).startswith(str(k)) for k in only):
                continue
            out.append(_action(title, code_kind, base | {"kind": kind}, lazy))
        for diag in params.context.diagnostics:
            if only and t.CodeActionKind.QuickFix not in only:
                break
            out.append(_action(
                f"Fix with Gemma: {diag.message.splitlines()[0][:60]}", t.CodeActionKind.QuickFix,
                base | {"kind": "fix", "range": range_to_json(diag.range),
                        "diagnostics": [diag.message]}, lazy, diagnostics=[diag],
            ))
        return out

    # ------------------------------------------------------------------ warming

    def schedule_warm(self, params: t.CodeActionParams) -> None:
        """A moment after a code-action list is asked for, prefill the prompt of the action the
        user most likely picks: Fix for the first diagnostic, else Explain (the file through
        the selection: also the head of Refactor's and Fix's prompts and most of Add
        docstring's). VS Code asks on every cursor move: an automatic request with nothing
        selected and no diagnostic warms nothing. A newer list for the document replaces the
        warm of the older one, in the server and in the engine."""
        delay = self.options().actions.warm_after_ms
        ctx, rng = params.context, params.range
        if delay <= 0 or (ctx.trigger_kind == t.CodeActionTriggerKind.Automatic
                          and rng.start == rng.end and not ctx.diagnostics):
            return
        uri = params.text_document.uri
        old = self._warm_tasks.pop(uri, None)
        if old is not None:
            old.cancel()
        diag = ctx.diagnostics[0] if ctx.diagnostics else None
        try:
            self._warm_tasks[uri] = asyncio.get_running_loop().create_task(self._warm_later(
                uri, diag.range if diag else rng, [diag.message] if diag else [], delay / 1000))
        except RuntimeError:  # no running loop (unit tests calling handlers directly)
            pass

    async def _warm_later(self, uri: str, rng: t.Range, diagnostics: list[str],
                          delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            prompt = self.likely_prompt(uri, rng, diagnostics)
            if self._warmed.get(uri) == prompt:
                return  # asked again for the same selection (VS Code: on selecting, on Ctrl+.)
            await asyncio.to_thread(self.backend().warm, prompt, uri + "#actions")
            self._warmed[uri] = prompt  # sent (a failed warm is tried again next time)
        except (ActionError, BackendError) as e:
            log.info("warming an action for %s failed: %s", uri, e)

    def likely_prompt(self, uri: str, rng: t.Range, diagnostics: list[str]) -> str:
        """The prompt Fix (with `diagnostics`) or Explain (without) sends for `rng`."""
        sel = select_lines(self._doc(uri, None), rng)
        if diagnostics:
            return self.prompt("fix", sel, "", diagnostics)[0]
        ins = self._explain_insertion(sel)
        return ins.prompt if ins is not None else self.prompt("explain", sel, "", [])[0]

    def forget(self, uri: str) -> None:
        self._warmed.pop(uri, None)
        task = self._warm_tasks.pop(uri, None)
        if task is not None:
            task.cancel()

    # ------------------------------------------------------------------ resolving

    async def resolve(self, action: t.CodeAction) -> t.CodeAction:
        data = action.data
        if not isinstance(data, dict) or data.get("kind") not in KINDS:
            return action  # not ours, or nothing to compute (Neovim resolves every action)
        if action.command is not None:
            return action  # its command does the work (and answers at once): nothing to wait for
        uri = str(data.get("uri", ""))
        rng = range_from_json(data.get("range"))
        if data["kind"] == "explain":
            action.command = t.Command(KINDS["explain"][0], "gemma.explain",
                                       arguments=[uri, data["range"]])
            return action
        edit = await self.edit(
            data["kind"], uri, rng, version=data.get("version"),
            instruction=str(data.get("instruction", "")),
            diagnostics=[str(d) for d in data.get("diagnostics", [])],
        )
        action.edit = edit
        return action

    async def edit(
        self,
        kind: str,
        uri: str,
        rng: t.Range,
        *,
        version: int | None = None,
        instruction: str = "",
        diagnostics: list[str] | None = None,
        on_text: Callable[[str], None] | None = None,
        scope: CancelScope | None = None,
    ) -> t.WorkspaceEdit:
        """Run a rewrite (refactor, docstring, fix) and return a minimal versioned edit."""
        doc = self._doc(uri, version)
        sel = select_lines(doc, rng)
        insertion = (docstring_insertion(self.context(sel), sel.text, doc.language_id)
                     if kind == "docstring" else None)
        if insertion is not None:  # write the doc comment in place: reliable even for base models
            answer = await self.generate(insertion.prompt, insertion.stop, on_text, scope,
                                         kind=kind)
            doc = self._doc(uri, sel.doc.version)
            if not answer.strip():
                raise ActionError("Gemma wrote no documentation for this selection")
            lines = split_lines(sel.text, keepends=True)
            comment = convert_eol(insertion.head + answer.strip() + insertion.tail, sel.eol)
            code = "".join(lines[: insertion.at_line]) + comment + "".join(
                lines[insertion.at_line :])
            edit = minimal_edit(doc, sel.start, sel.end, code)
            assert edit is not None
            return self._versioned(uri, doc, edit)
        answer = await self.answer(kind, sel, instruction, diagnostics or [], on_text, scope)
        doc = self._doc(uri, sel.doc.version)  # refuse if the user edited meanwhile
        code = convert_eol(reindent(extract_code_block(answer), sel.text), sel.eol)
        if not code.strip():
            raise ActionError("Gemma returned no code for this selection")
        if kind == "fix" and difflib.SequenceMatcher(
                None, code.strip(), sel.text.strip()).ratio() < MIN_FIX_SIMILARITY:
            raise ActionError(NOT_A_FIX)
        if sel.text.endswith(("\n", "\r")) and not code.endswith(("\n", "\r")):
            code += sel.eol
        edit = minimal_edit(doc, sel.start, sel.end, code)
        if edit is None:
            raise ActionError(NO_CHANGE)
        return self._versioned(uri, doc, edit)

    @staticmethod
    def _versioned(uri: str, doc: Document, edit: t.TextEdit) -> t.WorkspaceEdit:
        return t.WorkspaceEdit(document_changes=[t.TextDocumentEdit(
            text_document=t.OptionalVersionedTextDocumentIdentifier(uri=uri, version=doc.version),
            edits=[edit],
        )])

    def context(self, sel: Selection) -> CompletionContext:
        """The file around the selection: prefix before it, suffix after it (not through it)."""
        opts = self.options()
        budgets = dataclasses.replace(opts.completion.budgets(),
                                      prefix_tokens=opts.actions.prefix_tokens,
                                      suffix_tokens=opts.actions.suffix_tokens,
                                      extras_tokens=opts.actions.extras_tokens)
        ctx = build_context(sel.doc, sel.start, self.store, budgets)
        end = min(len(sel.doc.text), sel.end + len(ctx.suffix))
        return dataclasses.replace(ctx, suffix=sel.doc.text[sel.end : end])

    async def explain(self, uri: str, rng: t.Range,
                      on_text: Callable[[str], None] | None = None,
                      scope: CancelScope | None = None) -> str:
        doc = self._doc(uri, None)
        sel = select_lines(doc, rng)
        ins = self._explain_insertion(sel)
        if ins is None:
            return (await self.answer("explain", sel, "", [], on_text, scope)).strip()
        lang = sel.doc.language_id or "text"

        def shown(so_far: str) -> None:
            if on_text is not None:
                on_text(explanation_text(ins, so_far, lang))

        answer = await self.generate(ins.prompt, ins.stop, shown, scope, kind="explain")
        text = explanation_text(ins, answer, lang)
        if not answer.strip():
            raise ActionError("Gemma wrote no explanation for this selection")
        return text

    def _explain_insertion(self, sel: Selection) -> Insertion | None:
        """A base model explains best the way it writes a comment after the code; a chat model
        (or a user's few-shot template) is asked instead (None)."""
        opts = self.options()
        chat = is_chat_model(opts.engine.model_name or self.backend().model_name)
        if chat or "explain_fewshot" in opts.templates:
            return None
        return explain_insertion(self.context(sel), sel.text, sel.doc.language_id or "text")

    async def answer(self, kind: str, sel: Selection, instruction: str, diagnostics: list[str],
                     on_text: Callable[[str], None] | None, scope: CancelScope | None,
                     tries: int = 2) -> str:
        """The model's answer for `kind`. A base model's answer that copies an example of the
        few-shot prompt is asked again with other examples, then refused."""
        for attempt in range(tries):
            prompt, stop, examples = self.prompt(kind, sel, instruction, diagnostics, attempt)
            text = await self.generate(prompt, stop, on_text, scope, kind=kind)
            own = sel.doc.text[max(0, sel.start - 4000): sel.end + 4000]
            if not examples or copies_example(text, examples, own) is None:
                return text
        raise ActionError(COPIED)

    def prompt(self, kind: str, sel: Selection, instruction: str, diagnostics: list[str],
               attempt: int = 0) -> tuple[str, list[str], list[Example]]:
        """The prompt, its stop strings and the examples it shows (none for chat models)."""
        opts = self.options()
        templates = InstructionTemplates().with_overrides(opts.templates)
        ctx = self.context(sel)
        chat = is_chat_model(opts.engine.model_name or self.backend().model_name)
        lang = sel.doc.language_id or "text"
        shows = not chat and "{examples}" in getattr(templates, f"{kind}_fewshot")
        examples = pick_examples(kind, lang, sel.text, skip=attempt) if shows else []
        if kind == "explain":
            p = explain_prompt(ctx, sel.text, lang, chat, templates, examples)
        elif kind == "refactor":
            p = refactor_prompt(ctx, sel.text, lang, chat, instruction, templates, examples)
        elif kind == "docstring":
            p = docstring_prompt(ctx, sel.text, lang, chat, templates, examples)
        else:
            p = fix_prompt(ctx, sel.text, lang, chat, diagnostics, templates, examples)
        return p[0], p[1], examples

    async def generate(self, prompt: str, stop: list[str],
                       on_text: Callable[[str], None] | None,
                       scope: CancelScope | None = None, kind: str = "") -> str:
        opts = self.options().actions
        scope = scope or CancelScope()
        try:
            stream = await astart(
                self.backend(), prompt, max_tokens=opts.max_tokens,
                temperature=opts.temperature, stop=stop, priority=ACTION_PRIORITY, kind=kind,
            )
            scope.streams.add(stream)
            if scope.cancelled:
                stream.cancel()
            text = ""
            async for piece in astream(stream):
                text += piece
                if on_text is not None and piece:
                    on_text(text)
        except BackendError as e:
            raise ActionError(f"the model backend failed: {e}") from e
        finally:
            scope.streams.clear()
        if scope.cancelled:
            raise ActionError("cancelled")
        return text

    def _doc(self, uri: str, version: Any) -> Document:
        doc = self.store.get(uri)
        if doc is None:
            raise ActionError(f"{uri} is not open")
        if doc.skipped:
            raise ActionError(f"{uri} is skipped ({doc.skip_reason})")
        if version is not None and doc.version != version:
            raise ActionError(
                f"{uri} changed since the action was offered (version {version}, now "
                f"{doc.version}); run it again"
            )
        return doc


def reindent(code: str, original: str) -> str:
    """Give `code` the original selection's base indentation if the model dropped it."""
    def base(text: str) -> str:
        lines = [ln for ln in split_lines(text) if ln.strip()]
        if not lines:
            return ""
        return min((ln[: len(ln) - len(ln.lstrip(" \t"))] for ln in lines), key=len)

    want, have = base(original), base(code)
    if not want or have == want or len(have) > len(want) or not want.startswith(have):
        return code
    pad = want[len(have):]
    return "".join(pad + ln if ln.strip() else ln for ln in split_lines(code, keepends=True))


def minimal_edit(doc: Document, start: int, end: int, new: str) -> t.TextEdit | None:
    """One TextEdit covering only the lines that differ between doc[start:end] and `new`."""
    old_lines = split_lines(doc.text[start:end], keepends=True)
    new_lines = split_lines(new, keepends=True)
    p = 0
    while p < min(len(old_lines), len(new_lines)) and old_lines[p] == new_lines[p]:
        p += 1
    s = 0
    while (s < min(len(old_lines), len(new_lines)) - p
           and old_lines[-1 - s] == new_lines[-1 - s]):
        s += 1
    a = start + sum(len(x) for x in old_lines[:p])
    b = end - sum(len(x) for x in old_lines[len(old_lines) - s:])
    text = "".join(new_lines[p: len(new_lines) - s])
    if a == b and not text:
        return None
    return t.TextEdit(range=doc.range_of(a, b), new_text=text)


def range_to_json(r: t.Range) -> dict[str, Any]:
    return {"start": {"line": r.start.line, "character": r.start.character},
            "end": {"line": r.end.line, "character": r.end.character}}


def range_from_json(raw: Any) -> t.Range:
    try:
        s, e = raw["start"], raw["end"]
        return t.Range(t.Position(int(s["line"]), int(s["character"])),
                       t.Position(int(e["line"]), int(e["character"])))
    except (KeyError, TypeError, ValueError) as err:
        raise ActionError(f"bad range {raw!r}") from err

