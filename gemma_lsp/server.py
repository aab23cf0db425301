"""The LanguageServer and its feature registrations. Handlers are thin: typed params in,
delegate to the documents / completion / actions / commands rooms, return.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from lsprotocol import types as t
from pygls.exceptions import FeatureRequestError
from pygls.lsp.server import LanguageServer

from gemma_lsp import __version__
from gemma_lsp.actions import KINDS, ActionError, ActionService
from gemma_lsp.backend import Backend, EngineBackend, UnavailableBackend
from gemma_lsp.commands import CLIENT_TOKEN, COMMANDS, CommandService
from gemma_lsp.completion import CompletionService
from gemma_lsp.config import ServerOptions, parse_options
from gemma_lsp.documents import DocumentStore
from gemma_lsp.engine_status import StartNotifier
from gemma_lsp.multimodal import MULTIMODAL_COMMANDS, MultimodalService
from gemma_lsp.next_edit_service import ACCEPT_COMMAND, REJECT_COMMAND, NextEditService
from gemma_lsp.transport import DEFAULT_MAX_FRAME_BYTES, GemmaProtocol, serve_stdio, serve_tcp

log = logging.getLogger(__name__)


class GemmaServer(LanguageServer):
    """Holds the server's state: options, documents, the backend and the services."""

    def __init__(self, backend_factory: Any = None) -> None:
        super().__init__("gemma-lsp", __version__,
                         text_document_sync_kind=t.TextDocumentSyncKind.Incremental,
                         protocol_cls=GemmaProtocol)
        self.options = ServerOptions()
        self.store = DocumentStore(max_file_bytes=self.options.max_file_bytes)
        self._backend_factory = backend_factory or _default_backend
        self._backend: Backend | None = None
        self._warned: set[str] = set()
        self.start_notifier = StartNotifier(self, self.engine_error, self._warned.clear)
        self._told_internal_error = False
        self.completion = CompletionService(
            self.store, self.backend, lambda: self.options, self.engine_error,
            root_uri=lambda: self._root_uri,
        )
        self.next_edit = NextEditService(self.store, self.backend, lambda: self.options,
                                         self._next_edit_prompt)
        self.store.on_edit = self.next_edit.on_edit
        self.actions = ActionService(self.store, self.backend, lambda: self.options)
        self.commands = CommandService(self, self.actions, self.backend, self.notify)
        self.multimodal = MultimodalService(self, self.store, self.backend, lambda: self.options,
                                            self.commands.running, self.notify)
        self._root_uri: str | None = None
        self._classic: tuple[Any, Any] | None = None  # the completion feature while hidden

    def _next_edit_prompt(self, doc: Any, offset: int) -> str:
        """What the model reads before a next-edit region: a completion's prompt for a cursor
        there (the same text, so the same cached K/V) or, for FIM templates, its plain part."""
        ctx = self.completion.context(doc, offset)
        template: Any = self.completion.template()
        if not template.is_fim:
            return self.completion.prompt(ctx)[0]
        return str(template.extras_text(ctx)) + ctx.prefix

    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = self._backend_factory(self.options)
            listen = getattr(self._backend, "listen", None)
            if listen is not None:  # the built-in engine tells how its start goes
                listen(self.start_notifier)
        return self._backend

    def apply_options(self, raw: Any, base: ServerOptions | None = None) -> None:
        new, warnings = parse_options(raw, base)
        if new.engine != self.options.engine and self._backend is not None:
            self._backend.close()
            self._backend = None
        self.options = new
        self.store.max_file_bytes = new.max_file_bytes
        for w in warnings:
            log.warning("settings: %s", w)
            self.notify(f"gemma-lsp settings: {w}", t.MessageType.Warning)

    def notify(self, message: str, kind: t.MessageType = t.MessageType.Info) -> None:
        try:
            self.window_show_message(t.ShowMessageParams(type=kind, message=message))
        except Exception:  # noqa: BLE001 - before initialize there is no client to tell
            log.info("%s", message)

    def report_server_error(self, error: Exception, source: Any) -> None:
        """pygls' out-of-band errors (a notification handler that failed): logged with their
        details; the user is told once per session, not once per keystroke."""
        detail = getattr(error, "data", None)
        log.error("internal error (%s): %s%s", getattr(source, "__name__", source), error,
                  f"\n{detail}" if isinstance(detail, str) else "")
        if source is FeatureRequestError or self._told_internal_error:
            return  # a request's error is its reply
        self._told_internal_error = True
        self.notify("gemma-lsp hit an internal error; its log has the details",
                    t.MessageType.Error)

    def hide_classic_completion(self) -> None:
        fm = self.protocol.fm
        self._classic = (fm.features.pop(t.TEXT_DOCUMENT_COMPLETION),
                         fm.feature_options.pop(t.TEXT_DOCUMENT_COMPLETION))

    def show_classic_completion(self) -> None:
        """Settings asked for classic items after initialize hid them: register them now."""
        if self._classic is None:
            return
        handler, options = self._classic
        self._classic = None
        fm = self.protocol.fm
        fm.features[t.TEXT_DOCUMENT_COMPLETION] = handler
        fm.feature_options[t.TEXT_DOCUMENT_COMPLETION] = options
        caps = self.client_capabilities.text_document
        if not (caps and caps.completion and caps.completion.dynamic_registration):
            self.notify("gemma-lsp: classic completion takes effect after a restart",
                        t.MessageType.Warning)
            return
        self.client_register_capability(t.RegistrationParams(registrations=[t.Registration(
            id="gemma-classic-completion", method=t.TEXT_DOCUMENT_COMPLETION,
            register_options=t.CompletionRegistrationOptions(
                document_selector=None, trigger_characters=options.trigger_characters),
        )]))

    def classic_completion(self) -> bool:
        """Whether `textDocument/completion` carries suggestions (see `completion.classic`)."""
        mode = self.options.completion.classic
        if mode != "auto":
            return mode == "always"
        caps = self.client_capabilities.text_document
        return caps is None or caps.inline_completion is None

    def resolves_edits(self) -> bool:
        """Whether the client fills in a code action's edit through `codeAction/resolve`
        (VS Code, Neovim, Helix, eglot 1.17; not eglot 1.9)."""
        caps = self.client_capabilities.text_document
        action = caps.code_action if caps else None
        support = action.resolve_support if action else None
        return bool(support and "edit" in support.properties)

    def applies_edits(self) -> bool:
        """Whether the client applies edits the server sends (`workspace/applyEdit`): then long
        work answers its request at once and delivers the edit later (commands.py)."""
        ws = self.client_capabilities.workspace
        return bool(ws and ws.apply_edit)

    def engine_error(self, message: str) -> None:
        """Tell the user once per distinct failure; the next request retries the engine."""
        log.warning("engine: %s", message)
        if message not in self._warned:
            self._warned.add(message)
            self.notify(f"Gemma engine: {message}", t.MessageType.Error)


def menu_items(ls: GemmaServer, doc: Any, offset: int, position: t.Position,
               texts: list[str]) -> t.CompletionList:
    """Completion-menu items: plain text of kind Text (Helix expands every item of kind Snippet
    as a snippet whatever its insertTextFormat, and re-indents its lines), inserted as is (the
    model already indented every line), replacing the word before the cursor so that the
    client's filtering keeps them."""
    line_prefix = doc.text[doc.line_start(doc.line_of_offset(offset)):offset]
    word = line_prefix[len(line_prefix.rstrip("_0123456789abcdefghijklmnopqrstuvwxyz"
                                              "ABCDEFGHIJKLMNOPQRSTUVWXYZ")):]
    start = doc.position_at(offset - len(word))
    caps = ls.client_capabilities.text_document
    item_caps = caps.completion.completion_item if caps and caps.completion else None
    markdown = bool(item_caps and item_caps.documentation_format
                    and t.MarkupKind.Markdown in item_caps.documentation_format)
    items = []
    for i, s in enumerate(texts):
        label = (word + s).strip().splitlines()[0][:60] if (word + s).strip() else s
        items.append(t.CompletionItem(
            label=label, kind=t.CompletionItemKind.Text, detail="Gemma",
            sort_text=f"0{i}", filter_text=word + s, preselect=i == 0,
            insert_text_format=t.InsertTextFormat.PlainText,
            insert_text_mode=t.InsertTextMode.AsIs,
            text_edit=t.TextEdit(range=t.Range(start, position), new_text=word + s),
            documentation=t.MarkupContent(kind=t.MarkupKind.Markdown,
                                          value=f"```{doc.language_id}\n{word + s}\n```")
            if markdown else word + s,
        ))
    return t.CompletionList(is_incomplete=True, items=items)


def _default_backend(options: ServerOptions) -> Backend:
    e = options.engine
    if e.backend == "openai":
        from gemma_lsp.openai_backend import OpenAIBackend

        try:
            return OpenAIBackend(e.url, e.model_name, e.api_key, e.request_timeout_s)
        except ValueError as err:
            return UnavailableBackend(str(err))
    if e.backend != "builtin":
        return UnavailableBackend(f"backend {e.backend!r} is not available in this version")
    return EngineBackend(socket_path=e.socket_path, autostart=e.autostart, model=e.model,
                         draft_model=e.draft_model, kernels=e.kernels, quant=e.quant)


def create_server(backend_factory: Any = None, debug_commands: bool = False) -> GemmaServer:
    """The server with its features; `debug_commands` adds `gemma.debug.document` (the
    server's copy of a document, for tests that check text sync through the real process)."""
    server = GemmaServer(backend_factory)

    @server.feature(t.INITIALIZE)
    def initialize(ls: GemmaServer, params: t.InitializeParams) -> None:
        ls._root_uri = params.root_uri
        ls.start_notifier.loop = asyncio.get_running_loop()
        ls.store.encoding = ls.workspace.position_encoding
        ls.apply_options(params.initialization_options)
        if not ls.classic_completion():
            # not even advertised: VS Code cancels a pending inline request when it asks a
            # completion provider, and then does not ask again
            ls.hide_classic_completion()

    @server.feature(t.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: GemmaServer, params: t.DidChangeConfigurationParams) -> None:
        ls.apply_options(params.settings, base=ls.options)
        if ls.classic_completion():
            ls.show_classic_completion()

    @server.feature(t.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: GemmaServer, params: t.DidOpenTextDocumentParams) -> None:
        doc = ls.store.open_item(params.text_document)
        if doc.skipped:
            log.info("not completing %s: %s", doc.uri, doc.skip_reason)
            return
        ls.completion.schedule_warm(doc.uri)

    @server.feature(t.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: GemmaServer, params: t.DidChangeTextDocumentParams) -> None:
        doc = ls.store.change(params.text_document.uri, params.text_document.version,
                              params.content_changes)
        if doc is None:
            log.warning("didChange for %s, which is not open: ignored", params.text_document.uri)
        elif not doc.skipped:
            ls.completion.schedule_warm(doc.uri)

    @server.feature(t.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: GemmaServer, params: t.DidCloseTextDocumentParams) -> None:
        ls.store.close(params.text_document.uri)
        ls.completion.forget(params.text_document.uri)
        ls.next_edit.forget(params.text_document.uri)
        ls.actions.forget(params.text_document.uri)

    @server.feature(INLINE_EDIT)
    async def inline_edit(ls: GemmaServer, params: Any) -> dict[str, Any]:
        """Copilot-style next-edit request: ``{edits: [...]}``, empty when nothing is due."""
        doc_id = _field(params, "textDocument")
        uri, version = _field(doc_id, "uri"), _field(doc_id, "version")
        if not isinstance(uri, str) or (version is not None and not isinstance(version, int)):
            from pygls.exceptions import JsonRpcInvalidParams

            raise JsonRpcInvalidParams("textDocument/copilotInlineEdit needs textDocument.uri "
                                       "(and an integer version)")
        sug = await ls.next_edit.suggest(uri, version)
        doc = ls.store.get(uri)
        if sug is None or doc is None:
            return {"edits": []}
        return {"edits": [ls.next_edit.to_lsp(doc, sug)]}

    @server.feature(DID_SHOW_INLINE_EDIT)
    def did_show_inline_edit(ls: GemmaServer, params: Any) -> None:
        ids = _field(_field(_field(params, "item"), "command"), "arguments") or []
        for sid in ids:
            if isinstance(sid, str):
                ls.next_edit.shown(sid)

    @server.command(ACCEPT_COMMAND)
    def accept_next_edit(ls: GemmaServer, *args: Any) -> None:
        for sid in args:
            if isinstance(sid, str):
                ls.next_edit.decide(sid, "accepted")

    @server.command(REJECT_COMMAND)
    def reject_next_edit(ls: GemmaServer, *args: Any) -> None:
        for sid in args:
            if isinstance(sid, str):
                ls.next_edit.decide(sid, "rejected")

    @server.feature(t.TEXT_DOCUMENT_INLINE_COMPLETION, t.InlineCompletionOptions())
    async def inline_completion(
        ls: GemmaServer, params: t.InlineCompletionParams
    ) -> t.InlineCompletionList | None:
        doc = ls.store.get(params.text_document.uri)
        if doc is None:
            return None
        offset = doc.offset_at(params.position)
        insertion = ls.next_edit.inline_insertion(doc, offset)
        if insertion is not None:  # a next edit that only adds text after the cursor
            return t.InlineCompletionList(items=[insertion])
        texts = await ls.completion.complete(doc.uri, offset)
        here = t.Range(params.position, params.position)
        return t.InlineCompletionList(
            items=[t.InlineCompletionItem(insert_text=s, range=here) for s in texts]
        )

    @server.feature(t.TEXT_DOCUMENT_COMPLETION,
                    t.CompletionOptions(trigger_characters=[".", "(", " ", "\n"]))
    async def completion(ls: GemmaServer, params: t.CompletionParams) -> t.CompletionList | None:
        doc = ls.store.get(params.text_document.uri)
        if doc is None or not ls.classic_completion():
            return None
        offset = doc.offset_at(params.position)
        # a menu item is accepted once, never re-asked like ghost text: complete units only
        texts = await ls.completion.complete(doc.uri, offset, unit=True)
        return menu_items(ls, doc, offset, params.position, texts)

    @server.feature(
        t.TEXT_DOCUMENT_CODE_ACTION,
        t.CodeActionOptions(resolve_provider=True,
                            code_action_kinds=sorted({k for _, k in KINDS.values()})),
    )
    def code_action(ls: GemmaServer, params: t.CodeActionParams) -> list[t.CodeAction]:
        actions = ls.actions.offer(params, lazy=ls.resolves_edits() and not ls.applies_edits())
        if actions:
            ls.actions.schedule_warm(params)
        return actions

    @server.feature(t.CODE_ACTION_RESOLVE)
    async def code_action_resolve(ls: GemmaServer, action: t.CodeAction) -> t.CodeAction:
        try:
            return await ls.actions.resolve(action)
        except ActionError as e:
            from pygls.exceptions import JsonRpcContentModified

            raise JsonRpcContentModified(str(e)) from e

    builtin = server.protocol.fm.builtin_features[t.WORKSPACE_EXECUTE_COMMAND]

    def execute_command(params: t.ExecuteCommandParams) -> Any:
        # pygls hands a command its arguments only: keep the client's workDoneToken for it
        CLIENT_TOKEN.set(params.work_done_token)
        return (yield from builtin(params))

    server.protocol.fm.builtin_features[t.WORKSPACE_EXECUTE_COMMAND] = execute_command

    for name in COMMANDS + MULTIMODAL_COMMANDS:
        def make(cmd: str) -> Any:
            async def run(ls: GemmaServer, *args: Any) -> Any:
                service = ls.multimodal if cmd in MULTIMODAL_COMMANDS else ls.commands
                try:
                    return await service.execute(t.ExecuteCommandParams(
                        command=cmd, arguments=list(args), work_done_token=CLIENT_TOKEN.get()))
                except ActionError as e:
                    from pygls.exceptions import JsonRpcInvalidParams

                    raise JsonRpcInvalidParams(str(e)) from e
            return run
        server.command(name)(make(name))

    if debug_commands:
        @server.command("gemma.debug.document")
        def debug_document(ls: GemmaServer, uri: str) -> dict[str, Any] | None:
            doc = ls.store.get(uri)
            return None if doc is None else {"uri": doc.uri, "version": doc.version,
                                             "text": doc.text, "encoding": doc.encoding.value}

    @server.feature(t.WINDOW_WORK_DONE_PROGRESS_CANCEL)
    def progress_cancel(ls: GemmaServer, params: t.WorkDoneProgressCancelParams) -> None:
        ls.commands.cancel_progress(params.token)

    @server.feature(t.SHUTDOWN)
    def shutdown(ls: GemmaServer, *args: Any) -> None:
        ls.commands.cancel_all()
        if ls._backend is not None:
            ls._backend.close()  # the engine itself stays up for other editors

    return server


INLINE_EDIT = "textDocument/copilotInlineEdit"
DID_SHOW_INLINE_EDIT = "textDocument/didShowInlineEdit"


def _field(obj: Any, name: str) -> Any:
    """A field of custom-method params (pygls hands them over as namedtuples or dicts)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def serve(tcp: str | None = None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
          debug_commands: bool = False) -> int:
    server = create_server(debug_commands=debug_commands)
    if tcp:
        host, _, port = tcp.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"--tcp wants HOST:PORT, got {tcp!r}")
        # pygls ends the process on `exit` with SystemExit, which asyncio's TCP callback logs
        # as an unhandled error before it propagates: not an error, drop that record
        logging.getLogger("asyncio").addFilter(
            lambda r: not (r.exc_info and isinstance(r.exc_info[1], SystemExit)))
        serve_tcp(server, host or "127.0.0.1", int(port), max_frame_bytes)
        return 0
    return serve_stdio(server, max_frame_bytes)
