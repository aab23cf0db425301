#!/usr/bin/env python3
"""Latency from keystroke to inline completion through the real language server over stdio.

Starts an engine daemon and `gemma-lsp` (stdio), opens ../shared/bench/typing_base.py.txt,
waits for the warm-up, then types a new function at the end one character at a time (a
didChange, then textDocument/inlineCompletion, as an editor does) and a few mid-file edits.
Prints p50/p90 of keystroke -> result and the share of requests answered from the typed-ahead
suggestion without an engine call; writes JSON with --json PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lsprotocol import types as t
from pygls.lsp.client import LanguageClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASE = ROOT.parent / "shared" / "bench" / "typing_base.py.txt"
URI = "file:///bench/typing_base.py"
TYPED = '''

def moving_average(xs: list[float], n: int) -> list[float]:
    out = []
    for i in range(len(xs) - n + 1):
        out.append(sum(xs[i:i + n]) / n)
    return out
'''


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def position_at(text: str, offset: int) -> t.Position:
    before = text[:offset]
    line = before.count("\n")
    col = len(before) - (before.rfind("\n") + 1)
    return t.Position(line, len(before[len(before) - col:].encode("utf-16-le")) // 2)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="gl-", dir="/tmp"))
    env = dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(run_dir),
               GEMMA_LSP_THREADS=str(args.threads))
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gemma_lsp", "engine", "--no-persist", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    while not (run_dir / "engine.sock").exists():
        await asyncio.sleep(0.1)
    client = LanguageClient("bench-lsp", "1")
    await client.start_io(sys.executable, "-m", "gemma_lsp", env=env)
    init = {"gemma": {"completion": {"debounceMs": args.debounce_ms, "maxTokens": 24,
                                     "warmAfterMs": 300}}}
    caps = t.ClientCapabilities(
        general=t.GeneralClientCapabilities(position_encodings=[t.PositionEncodingKind.Utf16]))
    await client.initialize_async(t.InitializeParams(capabilities=caps,
                                                     initialization_options=init))
    client.initialized(t.InitializedParams())
    text = BASE.read_text()
    version = 1
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=URI, language_id="python", version=version, text=text)))
    await asyncio.sleep(args.warm_wait_s)  # the server warms the document after a pause

    rows: list[dict[str, Any]] = []

    async def keystroke(offset: int, insert: str, kind: str) -> None:
        nonlocal text, version
        pos = position_at(text, offset)
        text = text[:offset] + insert + text[offset:]
        version += 1
        t0 = time.perf_counter()
        client.text_document_did_change(t.DidChangeTextDocumentParams(
            t.VersionedTextDocumentIdentifier(uri=URI, version=version),
            [t.TextDocumentContentChangePartial(range=t.Range(pos, pos), text=insert)]))
        res = await client.text_document_inline_completion_async(t.InlineCompletionParams(
            text_document=t.TextDocumentIdentifier(URI),
            position=position_at(text, offset + len(insert)),
            context=t.InlineCompletionContext(
                trigger_kind=t.InlineCompletionTriggerKind.Automatic)))
        ms = (time.perf_counter() - t0) * 1000
        items = (res.items if isinstance(res, t.InlineCompletionList) else res) or []
        rows.append({"kind": kind, "ms": ms, "items": len(items),
                     "text": str(items[0].insert_text) if items else ""})
        await asyncio.sleep(args.type_gap_ms / 1000)

    for ch in TYPED:
        await keystroke(len(text), ch, "end")
    lines = text.splitlines(keepends=True)
    for k in range(4):  # jump to a line in the middle, start a comment, type a word
        cursor = sum(len(x) for x in lines[: len(lines) * (k + 2) // 7])
        await keystroke(cursor, "# ", "midfile")
        cursor += 2
        for ch in "note":
            await keystroke(cursor, ch, "midfile-type")
            cursor += 1
        lines = text.splitlines(keepends=True)

    status = await client.workspace_execute_command_async(
        t.ExecuteCommandParams(command="gemma.status"))
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    daemon.terminate()
    await daemon.wait()
    shutil.rmtree(run_dir, ignore_errors=True)

    typing = [r for r in rows if r["kind"] != "midfile"]
    mid = [r for r in rows if r["kind"] == "midfile"]
    return {
        "summary": {
            "requests": len(rows),
            "inline_ms_p50": pct([r["ms"] for r in typing], 0.5),
            "inline_ms_p90": pct([r["ms"] for r in typing], 0.9),
            "midfile_inline_ms_p50": pct([r["ms"] for r in mid], 0.5),
            "with_suggestion_share": statistics.mean(1.0 if r["items"] else 0.0 for r in rows),
            "typed_ahead_share": None,  # filled from the server's counters below
            "debounce_ms": args.debounce_ms,
            "blas_threads": args.threads,
        },
        "status": status,
        "requests": rows,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--debounce-ms", type=int, default=0,
                    help="server debounce (0: measure the engine path, not the wait)")
    ap.add_argument("--type-gap-ms", type=float, default=30)
    ap.add_argument("--warm-wait-s", type=float, default=6.0)
    args = ap.parse_args()
    out = asyncio.run(run(args))
    s = out["summary"]
    lsp = out["status"].get("lsp", {})
    if lsp.get("requests"):
        s["typed_ahead_share"] = lsp["typed_ahead"] / lsp["requests"]
    print(f"inline completion through gemma-lsp over stdio ({s['requests']} requests, "
          f"BLAS threads {s['blas_threads']}, debounce {s['debounce_ms']} ms)")
    for k, v in s.items():
        print(f"  {k:24s} {v:.3f}" if isinstance(v, float) else f"  {k:24s} {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
