"""Commands that send an image or a recording with the prompt: gemma.explainImage,
gemma.codeFromImage, gemma.voiceInstruction.

The image or WAV file is the first argument (a path, relative to the document or the first
workspace folder, or a `file:` URI); without one, the image link under the cursor in Markdown,
HTML or reStructuredText. Files outside the workspace folders are refused. Answers stream as
`$/progress` like gemma.explain; code goes in through `workspace/applyEdit`. Prompts use Gemma
4's turn format (the engine reads media only with Gemma 4 unified models; the openai backend
turns them into OpenAI content parts).
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lsprotocol import types as t
from pygls.lsp.server import LanguageServer

from gemma_lsp.actions import (
    ACTION_PRIORITY,
    ActionError,
    CancelScope,
    minimal_edit,
    range_from_json,
    reindent,
    select_lines,
)
from gemma_lsp.backend import Backend, BackendError, astart, astream
from gemma_lsp.commands import SHORT_EXPLANATION, Progress
from gemma_lsp.config import ServerOptions
from gemma_lsp.documents import Document, DocumentStore
from gemma_lsp.prompts import extract_code_block

MULTIMODAL_COMMANDS = ("gemma.explainImage", "gemma.codeFromImage", "gemma.voiceInstruction")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
AUDIO_SUFFIXES = (".wav", ".wave")
MAX_IMAGE_BYTES = 16 * 1024 * 1024  # the engine's limits (checked again there)
MAX_AUDIO_BYTES = 24 * 1024 * 1024
EXCERPT_LINES = 40  # document lines shown around the cursor
EXCERPT_CHARS = 4000
STOP = ["<turn|>", "<|turn>", "<eos>", "<end_of_turn>"]
_TURN = "<|turn>user\n{body}<turn|>\n<|turn>model\n"

# links whose target is a file: Markdown ![alt](src "title") and [text](src), HTML src= /
# href=, reStructuredText `.. image:: src` / `.. figure:: src`
_LINKS = (
    re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)"),
    re.compile(r"\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE),
    re.compile(r"^\s*\.\.\s+(?:image|figure)::\s*(\S+)"),
)


def link_at(line: str, column: int) -> str | None:
    """The link target under `column` of `line` (or the only link on the line)."""
    found: list[tuple[int, int, str]] = []
    for pattern in _LINKS:
        for m in pattern.finditer(line):
            found.append((m.start(), m.end(), m.group(1)))
    for start, end, target in found:
        if start <= column <= end:
            return target
    return found[0][2] if len(found) == 1 else None


class MultimodalService:
    def __init__(self, ls: LanguageServer, store: DocumentStore,
                 backend: Callable[[], Backend], options: Callable[[], ServerOptions],
                 running: dict[str, CancelScope],
                 notify: Callable[[str, t.MessageType], None]) -> None:
        self.ls = ls
        self.store = store
        self.backend = backend
        self.options = options
        self.running = running  # shared with gemma.cancel and $/progress cancel
        self.notify = notify

    async def execute(self, params: t.ExecuteCommandParams) -> Any:
        name = params.command
        target, uri, where = _args(list(params.arguments or []))
        doc = self.store.get(uri) if uri else None
        if uri and doc is None:
            raise ActionError(f"{uri} is not open")
        audio = name == "gemma.voiceInstruction"
        path = self.resolve(target, doc, where, audio)
        data = self.read(path, audio)
        title = {"gemma.explainImage": "Gemma: reading the image",
                 "gemma.codeFromImage": "Gemma: writing code for the image",
                 "gemma.voiceInstruction": "Gemma: following the recording"}[name]
        progress = await Progress.start(self.ls, title, params.work_done_token)
        scope = CancelScope()
        key = str(progress.token) if progress.token is not None else uuid.uuid4().hex
        self.running[key] = scope
        try:
            if name == "gemma.explainImage":
                result: Any = await self.explain_image(path, data, doc, where, progress, scope)
            elif name == "gemma.codeFromImage":
                result = await self.code_from_image(path, data, doc, where, progress, scope)
            else:
                result = await self.voice(data, doc, where, progress, scope)
            progress.end("done")
            return result
        except asyncio.CancelledError:
            progress.end("cancelled")
            raise
        except ActionError as e:
            progress.end(str(e))
            self.notify(str(e), t.MessageType.Warning)
            raise
        finally:
            self.running.pop(key, None)

    # ------------------------------------------------------------------ the three commands

    async def explain_image(self, path: Path, data: bytes, doc: Document | None,
                            where: t.Range | None, progress: Progress,
                            scope: CancelScope) -> str:
        body = ("<|image|>What does this screenshot or diagram show, and which code does it "
                "relate to?" + self.context(doc, where, f"The image {self.rel(path)}"))
        text = (await self.generate(_TURN.format(body=body), _image(data), progress,
                                    scope)).strip()
        self.show(text)
        return text

    async def code_from_image(self, path: Path, data: bytes, doc: Document | None,
                              where: t.Range | None, progress: Progress,
                              scope: CancelScope) -> dict[str, Any]:
        if doc is None or where is None:
            raise ActionError("gemma.codeFromImage needs the document and cursor to insert "
                              "the code at: arguments [image, uri, position]")
        lang = doc.language_id or "text"
        at = doc.offset_at(where.start)
        before = doc.text[max(0, at - EXCERPT_CHARS):at]
        body = (f"<|image|>Write {lang} code that implements this UI mock-up or diagram. It "
                f"goes into {self.rel(Path(_path_of(doc.uri)))} at the cursor; the code before "
                f"it:\n```{lang}\n{before}\n```\nAnswer with one ```{lang} code block only.")
        version = doc.version
        answer = await self.generate(_TURN.format(body=body), _image(data), progress,
                                     scope)
        code = extract_code_block(answer)
        if not code.strip():
            raise ActionError("Gemma returned no code for this image")
        self._same_version(doc, version)
        if not code.endswith("\n"):
            code += "\n"
        here = doc.position_at(at)
        edit = t.WorkspaceEdit(document_changes=[t.TextDocumentEdit(
            text_document=t.OptionalVersionedTextDocumentIdentifier(uri=doc.uri,
                                                                    version=version),
            edits=[t.TextEdit(range=t.Range(here, here), new_text=code)])])
        res = await self.ls.workspace_apply_edit_async(
            t.ApplyWorkspaceEditParams(edit=edit, label="Gemma: code from image"))
        return {"applied": bool(res.applied), "edit": edit}

    async def voice(self, data: bytes, doc: Document | None, where: t.Range | None,
                    progress: Progress, scope: CancelScope) -> dict[str, Any]:
        if doc is None or where is None:
            raise ActionError("gemma.voiceInstruction needs the document and the selection the "
                              "instruction is about: arguments [wav, uri, range]")
        sel = select_lines(doc, where)
        lang = doc.language_id or "text"
        body = (f"<|audio|>The recording is a spoken instruction about this {lang} code from "
                f"{self.rel(Path(_path_of(doc.uri)))}:\n```{lang}\n{sel.text}```\nIf it asks "
                f"for a change, answer with the whole rewritten code in one ```{lang} block; if "
                "it asks a question, answer it in prose.")
        version = doc.version
        answer = await self.generate(_TURN.format(body=body), [{"kind": "audio", "data": data}],
                                     progress, scope)
        if "```" not in answer:  # a question: the answer is the result
            self.show(answer.strip())
            return {"answer": answer.strip()}
        self._same_version(doc, version)
        code = reindent(extract_code_block(answer), sel.text)
        if sel.text.endswith("\n") and not code.endswith("\n"):
            code += "\n"
        text_edit = minimal_edit(doc, sel.start, sel.end, code)
        if text_edit is None:
            return {"answer": answer.strip(), "applied": False}
        edit = t.WorkspaceEdit(document_changes=[t.TextDocumentEdit(
            text_document=t.OptionalVersionedTextDocumentIdentifier(uri=doc.uri,
                                                                    version=version),
            edits=[text_edit])])
        res = await self.ls.workspace_apply_edit_async(
            t.ApplyWorkspaceEditParams(edit=edit, label="Gemma: voice instruction"))
        return {"applied": bool(res.applied), "edit": edit, "answer": answer.strip()}

    # ------------------------------------------------------------------ pieces

    def folders(self) -> list[Path]:
        ws = self.ls.workspace
        uris = [f.uri for f in ws.folders.values()] or ([ws.root_uri] if ws.root_uri else [])
        return [Path(_path_of(u)).resolve() for u in uris if u.startswith("file:")]

    def resolve(self, target: str | None, doc: Document | None, where: t.Range | None,
                audio: bool) -> Path:
        """The file the command reads: the argument, else the link under the cursor; refused
        if it is outside every workspace folder or of the wrong kind."""
        what = "a WAV recording" if audio else "an image (PNG, JPEG, WebP, GIF)"
        if not target:
            if doc is None or where is None:
                raise ActionError(f"give {what}: its path or file: URI as the first argument, "
                                  "or run the command on a link to it")
            line = doc.line_of_offset(doc.offset_at(where.start))
            text = doc.text[doc.line_start(line):doc.line_end(line)]
            column = doc.offset_at(where.start) - doc.line_start(line)
            target = link_at(text, column)
            if target is None:
                raise ActionError(f"no link under the cursor: give {what} (a path or file: URI)")
        if re.match(r"^[a-z][a-z0-9+.-]*://", target, re.IGNORECASE) and not \
                target.lower().startswith("file:"):
            raise ActionError(f"{target}: only local files are read (nothing is downloaded)")
        if target.lower().startswith("file:"):
            path = Path(_path_of(target))
        else:
            path = Path(urllib.parse.unquote(target)).expanduser()
            if not path.is_absolute():
                base = (Path(_path_of(doc.uri)).parent if doc is not None and
                        doc.uri.startswith("file:") else next(iter(self.folders()), None))
                if base is None:
                    raise ActionError(f"{target}: a relative path needs a workspace folder")
                path = base / path
        path = path.resolve()
        folders = self.folders()
        if not any(path == f or f in path.parents for f in folders):
            raise ActionError(f"{path} is outside the workspace folders "
                              f"({', '.join(map(str, folders)) or 'none open'}): refused")
        suffixes = AUDIO_SUFFIXES if audio else IMAGE_SUFFIXES
        if path.suffix.lower() not in suffixes:
            raise ActionError(f"{path.name} is not {what} ({', '.join(suffixes)})")
        return path

    @staticmethod
    def read(path: Path, audio: bool) -> bytes:
        limit = MAX_AUDIO_BYTES if audio else MAX_IMAGE_BYTES
        try:
            size = path.stat().st_size
            if size > limit:
                raise ActionError(f"{path.name} is {size} bytes; the limit is {limit} bytes")
            return path.read_bytes()
        except OSError as e:
            raise ActionError(f"cannot read {path}: {e.strerror or e}") from None

    def rel(self, path: Path) -> str:
        for f in self.folders():
            if f in path.parents:
                return str(path.relative_to(f))
        return path.name

    def context(self, doc: Document | None, where: t.Range | None, subject: str) -> str:
        """Where the image is linked from: the document's name and the lines around it."""
        if doc is None:
            return ""
        at = doc.offset_at(where.start) if where is not None else 0
        line = doc.line_of_offset(at)
        first = max(0, line - EXCERPT_LINES // 2)
        last = min(doc.line_of_offset(len(doc.text)), first + EXCERPT_LINES)
        excerpt = doc.text[doc.line_start(first):doc.line_end(last)][-EXCERPT_CHARS:]
        lang = doc.language_id or "text"
        return (f"\n\n{subject} is linked from {self.rel(Path(_path_of(doc.uri)))} ({lang}); "
                f"the text around the link:\n```{lang}\n{excerpt}\n```")

    async def generate(self, prompt: str, media: list[dict[str, Any]], progress: Progress,
                       scope: CancelScope) -> str:
        opts = self.options().actions
        try:
            stream = await astart(self.backend(), prompt, max_tokens=opts.max_tokens,
                                  temperature=opts.temperature, stop=STOP,
                                  priority=ACTION_PRIORITY, media=media)
            scope.streams.add(stream)
            if scope.cancelled:
                stream.cancel()
            text = ""
            async for piece in astream(stream):
                text += piece
                if piece:
                    progress.text(text)
        except BackendError as e:
            raise ActionError(f"the model backend failed: {e}") from e
        finally:
            scope.streams.clear()
        if scope.cancelled:
            raise ActionError("cancelled")
        return text

    def show(self, text: str) -> None:
        caps = self.ls.client_capabilities.window
        if len(text) <= SHORT_EXPLANATION or caps is None or not caps.show_document:
            self.notify(text or "(no answer)", t.MessageType.Info)
            return
        out = Path(tempfile.gettempdir()) / f"gemma-image-{uuid.uuid4().hex[:8]}.md"
        out.write_text(text + "\n")
        self.ls.window_show_document(t.ShowDocumentParams(uri=out.as_uri(), take_focus=False))

    def _same_version(self, doc: Document, version: int) -> None:
        now = self.store.get(doc.uri)
        if now is None or now.version != version:
            raise ActionError(f"{doc.uri} changed while Gemma was answering; run it again")


def _image(data: bytes) -> list[dict[str, Any]]:
    return [{"kind": "image", "data": data}]


def _path_of(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    return urllib.request.url2pathname(urllib.parse.unquote(parts.path)) if parts.scheme \
        else uri


def _args(args: list[Any]) -> tuple[str | None, str | None, t.Range | None]:
    """[target?], [target | null, uri, position | range] or [{"path", "uri", "position" |
    "range"}] -> (target, document uri, range)."""
    if len(args) == 1 and isinstance(args[0], dict):
        d = args[0]
        target = d.get("path") or d.get("image") or d.get("wav")
        args = [target, d.get("uri"), d.get("range") or d.get("position")]
    target = args[0] if args else None
    if target is not None and not isinstance(target, str):
        raise ActionError("the first argument must be a path or a file: URI")
    uri = args[1] if len(args) > 1 else None
    if uri is not None and not isinstance(uri, str):
        raise ActionError("the second argument must be the document URI")
    where = None
    if len(args) > 2 and args[2] is not None:
        raw = args[2]
        if isinstance(raw, dict) and "line" in raw:  # a position
            raw = {"start": raw, "end": raw}
        where = range_from_json(raw)
    return target or None, uri or None, where
