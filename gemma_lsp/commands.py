"""workspace/executeCommand handlers and `$/progress` streaming for long work.

gemma.explain / gemma.refactor / gemma.docstring run through the ActionService and report the
text so far as work-done progress (cancellable from the client); gemma.cancel stops every
running request; gemma.status and gemma.restartEngine talk to the backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lsprotocol import types as t
from pygls.lsp.server import LanguageServer

from engine.protocol import ensure_runtime_dir, runtime_dir
from gemma_lsp.actions import ActionError, ActionService, CancelScope, range_from_json
from gemma_lsp.backend import Backend, BackendError, BackendStarting

log = logging.getLogger(__name__)

COMMANDS = (
    "gemma.explain",
    "gemma.refactor",
    "gemma.docstring",
    "gemma.fix",
    "gemma.cancel",
    "gemma.status",
    "gemma.restartEngine",
)
SHORT_EXPLANATION = 400  # characters: shown as a message; longer ones open as a document
REPORT_EVERY_S = 0.15


class Progress:
    """Work-done progress for one command; a no-op when the client cannot show it."""

    def __init__(self, ls: LanguageServer, title: str, token: t.ProgressToken | None) -> None:
        self.ls = ls
        self.title = title
        self.token = token
        self._last = 0.0
        self._pending: str | None = None
        self.reports = 0

    @classmethod
    async def start(cls, ls: LanguageServer, title: str,
                    token: t.ProgressToken | None) -> Progress:
        caps = ls.client_capabilities.window
        if token is None and caps is not None and caps.work_done_progress:
            token = f"gemma-{uuid.uuid4().hex[:12]}"
            try:
                await ls.work_done_progress.create_async(token)
            except Exception:  # noqa: BLE001 - a client that refuses gets no progress
                token = None
        p = cls(ls, title, token)
        if token is not None:
            ls.work_done_progress.begin(token, t.WorkDoneProgressBegin(
                title=title, cancellable=True, message="waiting for the model…"))
        return p

    def text(self, so_far: str) -> None:
        """Report the text so far, at most every REPORT_EVERY_S."""
        if self.token is None:
            return
        now = time.monotonic()
        if now - self._last < REPORT_EVERY_S:
            self._pending = so_far
            return
        self._send(so_far)

    def _send(self, so_far: str) -> None:
        assert self.token is not None
        self._last = time.monotonic()
        self._pending = None
        self.reports += 1
        self.ls.work_done_progress.report(self.token, t.WorkDoneProgressReport(message=so_far))

    def end(self, message: str) -> None:
        if self.token is None:
            return
        if self._pending is not None:
            self._send(self._pending)
        self.ls.work_done_progress.end(self.token, t.WorkDoneProgressEnd(message=message))


class CommandService:
    def __init__(self, ls: LanguageServer, actions: ActionService,
                 backend: Callable[[], Backend], notify: Callable[[str, t.MessageType], None]
                 ) -> None:
        self.ls = ls
        self.actions = actions
        self.backend = backend
        self.notify = notify
        self.running: dict[str, CancelScope] = {}  # progress token (or an id) -> its work

    async def execute(self, params: t.ExecuteCommandParams) -> Any:
        name = params.command
        args = list(params.arguments or [])
        if name == "gemma.cancel":
            return {"cancelled": self.cancel_all()}
        if name == "gemma.status":
            return await self.status()
        if name == "gemma.restartEngine":
            await asyncio.to_thread(self.backend().restart)
            self.notify("Gemma engine restarted", t.MessageType.Info)
            return {"restarted": True}
        title = {"gemma.explain": "Gemma: explaining", "gemma.refactor": "Gemma: refactoring",
                 "gemma.docstring": "Gemma: writing a docstring",
                 "gemma.fix": "Gemma: fixing"}.get(name)
        if title is None:
            raise ActionError(f"unknown command {name!r}")
        uri, rng, extra = _location_args(args)
        diagnostics = _diagnostics_arg(args)
        # a code action's data pins the document version it was offered for
        version = args[0].get("version") if len(args) == 1 and isinstance(args[0], dict) else None
        progress = await Progress.start(self.ls, title, params.work_done_token)
        scope = CancelScope()
        key = str(progress.token) if progress.token is not None else uuid.uuid4().hex
        self.running[key] = scope
        try:
            if name == "gemma.explain":
                text = await self.actions.explain(uri, rng, on_text=progress.text, scope=scope)
                progress.end("done")
                self._show_explanation(text)
                return text
            kind = name.removeprefix("gemma.")
            edit = await self.actions.edit(kind, uri, rng, version=version, instruction=extra,
                                           diagnostics=diagnostics, on_text=progress.text,
                                           scope=scope)
            progress.end("done")
            result = await self.ls.workspace_apply_edit_async(
                t.ApplyWorkspaceEditParams(edit=edit, label=title))
            return {"applied": bool(result.applied), "edit": edit}
        except asyncio.CancelledError:
            progress.end("cancelled")
            raise
        except ActionError as e:
            progress.end(str(e))
            self.notify(str(e), t.MessageType.Warning)
            raise
        finally:
            self.running.pop(key, None)

    def cancel_progress(self, token: t.ProgressToken) -> None:
        scope = self.running.get(str(token))
        if scope is not None:
            scope.cancel()

    def cancel_all(self) -> int:
        scopes = list(self.running.values())
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    async def status(self) -> dict[str, Any]:
        try:
            info = await asyncio.to_thread(self.backend().status)
        except BackendStarting as e:
            info = {"state": "starting", "error": str(e)}
        except BackendError as e:
            info = {"state": "unreachable", "error": str(e)}
        else:
            info["state"] = "running"
        info.setdefault("backend", "builtin")
        completion = getattr(self.ls, "completion", None)
        if completion is not None:
            info["lsp"] = dataclasses.asdict(completion.stats) | {
                "last_latency_ms": round(completion.last_latency_ms, 1)}
        next_edit = getattr(self.ls, "next_edit", None)
        if next_edit is not None:
            info["next_edit"] = next_edit.status()
        return info

    def _show_explanation(self, text: str) -> None:
        caps = self.ls.client_capabilities.window
        if len(text) <= SHORT_EXPLANATION or caps is None or not caps.show_document:
            self.notify(text or "(no explanation)", t.MessageType.Info)
            return
        out = write_private_explanation(text)
        if out is None:
            self.notify(text, t.MessageType.Info)
            return
        self.ls.window_show_document(t.ShowDocumentParams(uri=out.as_uri(), take_focus=False))


KEEP_EXPLANATIONS = 20


def write_private_explanation(text: str, directory: Path | None = None) -> Path | None:
    """Write an explanation for the editor to open: a 0600 file in a 0700 directory of the
    user's runtime dir (the user's code must not be readable by other users); the oldest
    beyond KEEP_EXPLANATIONS are removed. None if no private directory is available."""
    try:
        if directory is None:
            ensure_runtime_dir(runtime_dir())
            directory = runtime_dir() / "explanations"
        if not os.path.lexists(directory):
            os.mkdir(directory, 0o700)
        ensure_runtime_dir(directory)
        out = directory / f"explain-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.md"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        old = sorted(directory.glob("explain-*.md"), key=lambda p: p.stat().st_mtime)
        for stale in old[:-KEEP_EXPLANATIONS]:
            stale.unlink(missing_ok=True)
        return out
    except (OSError, ValueError) as e:
        log.warning("cannot write the explanation to a private file: %s", e)
        return None


def _diagnostics_arg(args: list[Any]) -> list[str]:
    """The diagnostics a fix is for: the "diagnostics" of a dict argument, else a 4th one."""
    if len(args) == 1 and isinstance(args[0], dict):
        found = args[0].get("diagnostics") or []
    else:
        found = args[3] if len(args) > 3 and isinstance(args[3], list) else []
    return [str(d) for d in found]


def _location_args(args: list[Any]) -> tuple[str, t.Range, str]:
    """Accept [uri, range, extra?] or [{"uri", "range", "instruction"?}] (a code action's data)."""
    if len(args) == 1 and isinstance(args[0], dict):
        d = args[0]
        return (str(d.get("uri", "")), range_from_json(d.get("range")),
                str(d.get("instruction", "")))
    if len(args) >= 2 and isinstance(args[0], str):
        extra = str(args[2]) if len(args) > 2 and args[2] is not None else ""
        return args[0], range_from_json(args[1]), extra
    raise ActionError("expected arguments [uri, range] or [{uri, range}]")
