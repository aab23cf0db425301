"""workspace/executeCommand handlers and `$/progress` streaming for long work.

gemma.explain / gemma.refactor / gemma.docstring / gemma.fix run through the ActionService and
report the text so far as work-done progress (cancellable from the client); gemma.cancel stops
every running request; gemma.status and gemma.restartEngine talk to the backend.

Long work never holds a request open unless the client asks it to. Without a client
`workDoneToken` the command checks its arguments, answers at once (``{"started": ...,
"token": ...}``) and the work goes on: progress on a token the server creates (when the client
shows progress), then the result through the channel the client has: the edit with
`workspace/applyEdit`, an explanation with `window/showMessage` (short) or
`window/showDocument` (long, when supported); failures as a warning message. Cancelling the
progress (`window/workDoneProgress/cancel`) or `gemma.cancel` stops it. A client that passes
its own `workDoneToken` (our VS Code and Neovim plugins for Explain) shows that progress and
waits for the answer: the text, or ``{"applied", "edit"}``. So does a client that cannot apply
a server's edit, for edits.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
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
# the workDoneToken of the workspace/executeCommand being dispatched (pygls passes a command
# handler its arguments only); set by `server.create_server`'s wrapper of the dispatch
CLIENT_TOKEN: contextvars.ContextVar[t.ProgressToken | None] = contextvars.ContextVar(
    "gemma_client_work_done_token", default=None)
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
    async def start(cls, ls: LanguageServer, title: str, token: t.ProgressToken | None,
                    create: bool = False) -> Progress:
        """Begin progress on the client's `token`; without one (or with `create`: a token the
        server chose) create it first, when the client shows progress at all."""
        caps = ls.client_capabilities.window
        if (token is None or create) and caps is not None and caps.work_done_progress:
            token = token or new_token()
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


def new_token() -> str:
    return f"gemma-{uuid.uuid4().hex[:12]}"


TITLES = {"gemma.explain": "Gemma: explaining", "gemma.refactor": "Gemma: refactoring",
          "gemma.docstring": "Gemma: writing a docstring", "gemma.fix": "Gemma: fixing"}


@dataclass(frozen=True)
class _Job:
    """One long command, its arguments checked."""

    name: str
    uri: str
    rng: t.Range
    extra: str
    diagnostics: list[str]
    version: int | None

    @property
    def title(self) -> str:
        return TITLES[self.name]


class CommandService:
    def __init__(self, ls: LanguageServer, actions: ActionService,
                 backend: Callable[[], Backend], notify: Callable[[str, t.MessageType], None]
                 ) -> None:
        self.ls = ls
        self.actions = actions
        self.backend = backend
        self.notify = notify
        self.running: dict[str, CancelScope] = {}  # progress token (or an id) -> its work
        self._tasks: set[asyncio.Task[Any]] = set()  # work answered already, still running

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
        if name not in TITLES:
            raise ActionError(f"unknown command {name!r}")
        job = self._job(name, args)
        edits = name != "gemma.explain"
        if params.work_done_token is not None or (edits and not self._applies_edits()):
            return await self._run(job, params.work_done_token, create=False, answered=False)
        caps = self.ls.client_capabilities.window
        token = new_token() if caps is not None and caps.work_done_progress else None
        key = token or uuid.uuid4().hex
        self.running[key] = CancelScope()  # gemma.cancel reaches it from now on
        task = asyncio.get_running_loop().create_task(
            self._run(job, token, create=True, answered=True, key=key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"started": name, "token": token}

    def _job(self, name: str, args: list[Any]) -> _Job:
        """The command's arguments, checked now: a bad or stale request is refused in its
        answer, not later."""
        uri, rng, extra = _location_args(args)
        # a code action's data pins the document version it was offered for
        version = args[0].get("version") if len(args) == 1 and isinstance(args[0], dict) else None
        self.actions._doc(uri, version)
        return _Job(name, uri, rng, extra, _diagnostics_arg(args), version)

    def _applies_edits(self) -> bool:
        ws = self.ls.client_capabilities.workspace
        return bool(ws and ws.apply_edit)

    async def _run(self, job: _Job, token: t.ProgressToken | None, *, create: bool,
                   answered: bool, key: str | None = None) -> Any:
        """Do the work of `job`, reporting progress on `token`. `answered`: the request was
        answered already, so the result and any failure go to the user as messages."""
        scope = self.running.get(key) if key else None
        progress = await Progress.start(self.ls, job.title, token, create=create)
        if scope is None:
            scope = CancelScope()
            key = str(progress.token) if progress.token is not None else uuid.uuid4().hex
            self.running[key] = scope
        elif progress.token is not None and str(progress.token) != key:
            self.running[str(progress.token)] = scope
        try:
            if scope.cancelled:
                raise ActionError("cancelled")
            if job.name == "gemma.explain":
                text = await self.actions.explain(job.uri, job.rng, on_text=progress.text,
                                                  scope=scope)
                progress.end("done")
                if answered:  # else the client asked for the text as the answer
                    self._show_explanation(text)
                return text
            kind = job.name.removeprefix("gemma.")
            edit = await self.actions.edit(kind, job.uri, job.rng, version=job.version,
                                           instruction=job.extra, diagnostics=job.diagnostics,
                                           on_text=progress.text, scope=scope)
            progress.end("done")
            if not self._applies_edits():
                return {"applied": False, "edit": edit}
            result = await self.ls.workspace_apply_edit_async(
                t.ApplyWorkspaceEditParams(edit=edit, label=job.title))
            if answered and not result.applied:
                self.notify(f"{job.title}: the editor did not apply the edit"
                            + (f" ({result.failure_reason})" if result.failure_reason else ""),
                            t.MessageType.Warning)
            return {"applied": bool(result.applied), "edit": edit}
        except asyncio.CancelledError:
            progress.end("cancelled")
            raise
        except ActionError as e:
            progress.end(str(e))
            self.notify(f"{job.title}: {e}" if answered else str(e), t.MessageType.Warning)
            if answered:
                return None
            raise
        finally:
            for k in [k for k, v in self.running.items() if v is scope]:
                del self.running[k]

    def cancel_progress(self, token: t.ProgressToken) -> None:
        scope = self.running.get(str(token))
        if scope is not None:
            scope.cancel()

    def cancel_all(self) -> int:
        scopes = {id(s): s for s in self.running.values()}.values()
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
