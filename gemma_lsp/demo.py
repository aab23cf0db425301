"""`gemma-lsp demo [FILE]`: the real server over stdio, driven by a scripted LSP client.

What a newcomer sees before wiring up an editor: the file is opened, an inline completion is
asked at the cursor (the end of the file unless --line/--col), a refactor and a docstring are
computed and shown as diffs, and an explanation is printed as its `$/progress` reports stream
in. Every step reports its own failure and the demo goes on.
"""

from __future__ import annotations

import asyncio
import difflib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsprotocol import types as t
from pygls.lsp.client import LanguageClient

from gemma_lsp.actions import NO_CHANGE

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample.py"
LANGUAGES = {".py": "python", ".js": "javascript", ".ts": "typescript", ".rs": "rust",
             ".go": "go", ".c": "c", ".cpp": "cpp", ".java": "java", ".lua": "lua",
             ".rb": "ruby", ".sh": "shellscript"}
_BLOCK_START = re.compile(r"^(\s*)(async\s+def|def|class|function|fn|func)\b")


@dataclass
class DemoOptions:
    file: Path
    line: int | None = None  # 0-based cursor; None: the end of the file
    col: int | None = None
    max_tokens: int = 48
    instruction: str = "use a guard clause"


def block_before(text: str, cursor_line: int) -> tuple[int, int] | None:
    """Lines [start, end) of the last complete def/class/function block above the cursor."""
    lines = text.split("\n")
    found = None
    for i, line in enumerate(lines[:cursor_line]):
        m = _BLOCK_START.match(line)
        if not m:
            continue
        indent = len(m.group(1))
        end = i + 1
        while end < len(lines) and (not lines[end].strip()
                                    or len(lines[end]) - len(lines[end].lstrip()) > indent):
            end += 1
        while end > i + 1 and not lines[end - 1].strip():
            end -= 1
        if end > i + 1 and end <= cursor_line:
            found = (i, end)
    return found


def apply_edit(text: str, edit: t.WorkspaceEdit) -> str:
    """The text after a single-document workspace edit (what an editor would do)."""
    from gemma_lsp.documents import Document

    edits: list[t.TextEdit] = []
    for change in edit.document_changes or []:
        if isinstance(change, t.TextDocumentEdit):
            edits += [e for e in change.edits if isinstance(e, t.TextEdit)]
    for changes in (edit.changes or {}).values():
        edits += changes
    doc = Document("file:///demo", text)
    spans = sorted((doc.range_offsets(e.range), e.new_text) for e in edits)
    for (a, b), new in reversed(spans):
        text = text[:a] + new + text[b:]
    return text


class _Printer:
    def __init__(self) -> None:
        self.progress: dict[str, str] = {}  # token -> text printed so far

    def report(self, token: str, message: str) -> None:
        seen = self.progress.get(token, "")
        if message.startswith(seen):
            sys.stdout.write(message[len(seen):])
        else:
            sys.stdout.write("\n" + message)
        sys.stdout.flush()
        self.progress[token] = message


async def run_demo(opts: DemoOptions) -> int:
    text = opts.file.read_text(encoding="utf-8")
    uri = opts.file.resolve().as_uri()
    lines = text.split("\n")
    line = len(lines) - 1 if opts.line is None else min(max(opts.line, 0), len(lines) - 1)
    col = len(lines[line]) if opts.col is None else min(max(opts.col, 0), len(lines[line]))
    printer = _Printer()
    client = LanguageClient("gemma-lsp-demo", "1")

    @client.feature(t.WINDOW_WORK_DONE_PROGRESS_CREATE)
    def _create(params: t.WorkDoneProgressCreateParams) -> None:
        return None

    @client.feature(t.PROGRESS)
    def _progress(params: t.ProgressParams) -> None:
        value = params.value
        if isinstance(value, dict) and value.get("kind") == "report" and value.get("message"):
            printer.report(str(params.token), str(value["message"]))

    @client.feature(t.WINDOW_SHOW_MESSAGE)
    def _message(params: t.ShowMessageParams) -> None:
        if params.type in (t.MessageType.Error, t.MessageType.Warning):
            print(f"\n[server] {params.message}")

    @client.feature(t.WORKSPACE_APPLY_EDIT)
    def _apply(params: t.ApplyWorkspaceEditParams) -> t.ApplyWorkspaceEditResult:
        return t.ApplyWorkspaceEditResult(applied=True)  # shown as a diff, file untouched

    @client.feature(t.WINDOW_SHOW_DOCUMENT)
    def _show(params: t.ShowDocumentParams) -> t.ShowDocumentResult:
        return t.ShowDocumentResult(success=True)  # the explanation was streamed already

    await client.start_io(sys.executable, "-m", "gemma_lsp")
    caps = t.ClientCapabilities(
        text_document=t.TextDocumentClientCapabilities(
            inline_completion=t.InlineCompletionClientCapabilities(),
            code_action=t.CodeActionClientCapabilities(
                resolve_support=t.ClientCodeActionResolveOptions(properties=["edit"])),
        ),
        window=t.WindowClientCapabilities(work_done_progress=True),
    )
    init = {"gemma": {"completion": {"debounceMs": 0, "latencyBudgetMs": 0,
                                     "maxTokens": opts.max_tokens},
                      "actions": {"temperature": 0}}}
    failures = 0
    try:
        await client.initialize_async(t.InitializeParams(
            capabilities=caps, initialization_options=init,
            root_uri=opts.file.resolve().parent.as_uri()))
        client.initialized(t.InitializedParams())
        client.text_document_did_open(t.DidOpenTextDocumentParams(t.TextDocumentItem(
            uri=uri, language_id=LANGUAGES.get(opts.file.suffix, "plaintext"), version=1,
            text=text)))
        status = await client.workspace_execute_command_async(
            t.ExecuteCommandParams(command="gemma.status"))
        said = ""
        while isinstance(status, dict) and status.get("state") == "starting":  # a first build
            if status.get("error") != said:
                said = str(status.get("error"))
                print(f"== {said}")
            await asyncio.sleep(1.0)
            status = await client.workspace_execute_command_async(
                t.ExecuteCommandParams(command="gemma.status"))
        if isinstance(status, dict) and status.get("state") == "running":
            print(f"== engine: {status.get('model', '?')} (pid {status.get('pid', '?')}); it "
                  "stays resident for the next editor window")
        else:
            print(f"== engine unreachable: {status}")

        # 1. inline completion at the cursor
        print(f"\n== inline completion at {opts.file.name}:{line + 1}:{col + 1}")
        t0 = time.perf_counter()
        res = await client.text_document_inline_completion_async(t.InlineCompletionParams(
            text_document=t.TextDocumentIdentifier(uri), position=t.Position(line, col),
            context=t.InlineCompletionContext(t.InlineCompletionTriggerKind.Invoked)))
        ms = (time.perf_counter() - t0) * 1000
        items = list(res.items if isinstance(res, t.InlineCompletionList) else res or [])
        if items:
            print(lines[line][:col] + f"\x1b[2m{items[0].insert_text}\x1b[0m")
            print(f"   ({ms:.0f} ms, the first request includes reading the file)")
        else:
            failures += 1
            print(f"   (no suggestion, {ms:.0f} ms)")

        # 2. a refactor and a docstring for the last complete block above the cursor, as diffs
        block = block_before(text, line)
        if block is None:
            print("\n== no complete function above the cursor to refactor or explain")
            return 0 if failures == 0 else 1
        rng = t.Range(t.Position(block[0], 0), t.Position(block[1], 0))
        where = {"uri": uri, "range": client.protocol._converter.unstructure(rng)}
        print(f"\n== refactor lines {block[0] + 1}-{block[1]} ({opts.instruction!r})")
        changed = await _show_edit(client, "gemma.refactor", where | {
            "instruction": opts.instruction}, text, opts.file.name)
        if changed is False:
            failures += 1
        elif changed is None:
            print("   (the shipped 270M model is a base model: it mostly copies code instead of "
                  "following an instruction; an instruction-tuned model does better, README: "
                  "Models)")
        print(f"\n== add docstring, lines {block[0] + 1}-{block[1]}")
        if await _show_edit(client, "gemma.docstring", where, text, opts.file.name) is False:
            failures += 1

        # 3. a streamed explanation of the same block
        print(f"\n== explanation of lines {block[0] + 1}-{block[1]}, as it streams")
        try:
            await client.workspace_execute_command_async(t.ExecuteCommandParams(
                command="gemma.explain", work_done_token="demo-explain", arguments=[where]))
            print()
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"\n   explain failed: {e}")
    finally:
        try:
            await asyncio.wait_for(client.shutdown_async(None), 30)
            client.exit(None)
        except Exception:  # noqa: BLE001 - the server may be gone already
            pass
        await client.stop()
    return 0 if failures == 0 else 1


async def _show_edit(client: LanguageClient, command: str, args: dict[str, Any], text: str,
                     name: str) -> bool | None:
    """Run an edit command and print its edit as a diff. True: shown; None: the model
    suggested no change (said so); False: failed (said why)."""
    try:
        result = await client.workspace_execute_command_async(t.ExecuteCommandParams(
            command=command, work_done_token=f"demo-{command}", arguments=[args]))
        print()
        if not isinstance(result, dict) or "edit" not in result:
            raise ValueError(f"unexpected reply {result!r}")
        edit = client.protocol._converter.structure(result["edit"], t.WorkspaceEdit)
        after = apply_edit(text, edit)
        sys.stdout.writelines(difflib.unified_diff(
            text.splitlines(keepends=True), after.splitlines(keepends=True), f"a/{name}",
            f"b/{name}"))
        return True
    except Exception as e:  # noqa: BLE001 - the demo reports and goes on
        if NO_CHANGE in str(e):
            print("\n   no change suggested")
            return None
        print(f"\n   {command} failed: {e}")
        return False


def main(opts: DemoOptions) -> int:
    if not opts.file.is_file():
        raise ValueError(f"no such file: {opts.file}")
    return asyncio.run(run_demo(opts))
