#!/usr/bin/env python3
"""Next-edit suggestions through the real language server: how often the predicted next edit
is exactly the expected one, how often a wrong one would be shown, how often it stays quiet
when nothing is due, and how long from the pause to the suggestion.

Starts an engine daemon and `gemma-lsp` (stdio); for each scenario of scripts/nes_scenarios.py
opens its file (and waits for the server's warm-up, as for a file the user has open), applies
the user's edit(s) as incremental didChange notifications, then sends
`textDocument/copilotInlineEdit` and times the answer. The server runs with its gate open
(threshold -100, the lowest it takes) so that every scenario's margin is seen; the figures at
a threshold are then exact (a suggestion is shown iff its margin beats the threshold), and the
script prints them
for the default threshold and for a range, with the threshold that keeps wrong suggestions at
or under 10% of those shown and is right most often (exact when an edit is due, quiet when
none is): how the default was chosen. Writes JSON with --json PATH.
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
sys.path.insert(0, str(ROOT / "scripts"))

from bench_lsp import pct, position_at  # noqa: E402
from nes_scenarios import SCENARIOS, Scenario  # noqa: E402

from gemma_lsp.config import NextEditOptions  # noqa: E402


def offset_at(text: str, line: int, character: int) -> int:
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
    start = starts[min(line, len(starts) - 1)]
    units = 0
    i = start
    while i < len(text) and text[i] != "\n" and units < character:
        units += 2 if ord(text[i]) > 0xFFFF else 1
        i += 1
    return i


def expected_text(sc: Scenario) -> tuple[str, str | None]:
    """The text after the user's edits, and after the expected next edit (None: no edit)."""
    text = sc.text
    for old, new in sc.edits:
        text = text.replace(old, new, 1)
    if not sc.expect:
        return text, None
    want = text
    for old, new in sc.expect:
        want = want.replace(old, new, 1)
    return text, want


def get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


async def run_scenario(client: LanguageClient, sc: Scenario, k: int,
                       warm_s: float) -> dict[str, Any]:
    uri = f"file:///bench/nes/{k}/{sc.path}"
    text, version = sc.text, 1
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=uri, language_id=sc.lang, version=version, text=text)))
    await asyncio.sleep(warm_s)
    for old, new in sc.edits:  # the smallest change, as an editor sends it
        a = text.index(old)
        p = 0
        while p < min(len(old), len(new)) and old[p] == new[p]:
            p += 1
        q = 0
        while q < min(len(old), len(new)) - p and old[-1 - q] == new[-1 - q]:
            q += 1
        start, end = a + p, a + len(old) - q
        ins = new[p:len(new) - q]
        rng = t.Range(position_at(text, start), position_at(text, end))
        text = text[:start] + ins + text[end:]
        version += 1
        client.text_document_did_change(t.DidChangeTextDocumentParams(
            t.VersionedTextDocumentIdentifier(uri=uri, version=version),
            [t.TextDocumentContentChangePartial(range=rng, text=ins)]))
        await asyncio.sleep(0.05)
    after_user, want = expected_text(sc)
    assert text == after_user, sc.name
    t0 = time.perf_counter()
    res = await client.protocol.send_request_async(
        "textDocument/copilotInlineEdit",
        {"textDocument": {"uri": uri, "version": version},
         "position": {"line": 0, "character": 0}})
    ms = (time.perf_counter() - t0) * 1000
    edits = list(get(res, "edits") or [])
    got, margin, source = None, None, ""
    if edits:
        e = edits[0]
        rng = get(e, "range")
        a = offset_at(text, get(get(rng, "start"), "line"), get(get(rng, "start"), "character"))
        b = offset_at(text, get(get(rng, "end"), "line"), get(get(rng, "end"), "character"))
        got = text[:a] + get(e, "text") + text[b:]
        data = get(e, "data")
        margin, source = get(data, "margin"), get(data, "source")
    client.text_document_did_close(t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(uri)))
    return {"name": sc.name, "lang": sc.lang, "kind": sc.kind, "expects_edit": want is not None,
            "suggested": got is not None, "correct": got == want if got is not None else None,
            "margin": margin, "source": source, "ms": round(ms, 1)}


def rates(rows: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """The figures if only suggestions with a margin above ``threshold`` are shown."""
    shown = [r for r in rows if r["suggested"] and r["margin"] is not None
             and r["margin"] > threshold]
    with_edit = [r for r in rows if r["expects_edit"]]
    without = [r for r in rows if not r["expects_edit"]]
    exact = [r for r in shown if r["correct"]]
    wrong = [r for r in shown if not r["correct"]]
    quiet = [r for r in without if r not in shown]
    return {
        "threshold": threshold,
        "exact_rate": round(len(exact) / len(with_edit), 3) if with_edit else None,
        "wrong_shown_rate": round(len(wrong) / len(shown), 3) if shown else 0.0,
        "wrong_per_scenario": round(len(wrong) / len(rows), 3) if rows else 0.0,
        "nothing_rate": round(len(quiet) / len(without), 3) if without else None,
        "shown": len(shown), "exact": len(exact), "wrong": len(wrong),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="gl-", dir="/tmp"))
    os.chmod(run_dir, 0o700)
    env = dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(run_dir),
               GEMMA_LSP_THREADS=str(args.threads))
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gemma_lsp", "engine", "--no-persist", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    while not (run_dir / "engine.sock").exists():
        await asyncio.sleep(0.1)
    client = LanguageClient("bench-nes", "1")
    await client.start_io(sys.executable, "-m", "gemma_lsp", env=env)
    init = {"gemma": {"completion": {"warmAfterMs": 100},
                      "nextEdit": {"threshold": -100, "adaptive": False}}}
    caps = t.ClientCapabilities(
        general=t.GeneralClientCapabilities(position_encodings=[t.PositionEncodingKind.Utf16]))
    await client.initialize_async(t.InitializeParams(capabilities=caps,
                                                     initialization_options=init))
    client.initialized(t.InitializedParams())
    scenarios = [s for s in SCENARIOS if not args.only or args.only in s.name]
    rows = []
    try:
        for k, sc in enumerate(scenarios):
            row = await run_scenario(client, sc, k, args.warm_s)
            rows.append(row)
            print(f"{row['name']:22s} {row['ms']:7.1f} ms  margin {row['margin']!s:>7}  "
                  f"{'correct' if row['correct'] else 'wrong' if row['suggested'] else '-'}",
                  flush=True)
        status = await client.workspace_execute_command_async(
            t.ExecuteCommandParams(command="gemma.status"))
    finally:
        await client.shutdown_async(None)
        client.exit(None)
        await client.stop()
        daemon.terminate()
        await daemon.wait()
        shutil.rmtree(run_dir, ignore_errors=True)

    default = NextEditOptions().threshold
    curve = [rates(rows, th) for th in (-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)]
    ok = [c for c in curve if c["wrong_shown_rate"] <= 0.10]
    # right both ways: exact when an edit is due, quiet when none is (higher threshold on ties)
    best = max(ok, key=lambda c: ((c["exact_rate"] or 0) + (c["nothing_rate"] or 0),
                                  c["threshold"])) if ok else None
    at_default = rates(rows, default)
    lat = [r["ms"] for r in rows]
    info = status if isinstance(status, dict) else {}
    return {
        "threads": args.threads, "scenarios": len(rows),
        "with_next_edit": sum(r["expects_edit"] for r in rows),
        **{k: at_default[k] for k in ("exact_rate", "wrong_shown_rate", "nothing_rate")},
        "wrong_per_scenario": at_default["wrong_per_scenario"],
        "threshold": default,
        "latency_ms_p50": round(pct(lat, 0.5), 1), "latency_ms_p90": round(pct(lat, 0.9), 1),
        "latency_ms_mean": round(statistics.mean(lat), 1) if lat else None,
        "best_threshold": best,
        "curve": curve,
        "engine": {k: info.get(k) for k in ("model", "prefill_tok_s", "decode_tok_s")},
        "next_edit_engine": {k: (info.get("next_edit") or {}).get(k) for k in (
            "engine_queue_ms_p50", "engine_compute_ms_p50", "engine_evaluated_tokens_p50")},
        "rows": rows,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warm-s", type=float, default=1.0,
                    help="wait after opening a file (the server warms it after a pause)")
    ap.add_argument("--only", default="", help="scenarios whose name contains this")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = asyncio.run(run(args))
    print(f"\n{out['scenarios']} scenarios ({out['with_next_edit']} with a next edit), "
          f"{args.threads} threads, threshold {out['threshold']}:")
    print(f"  exact {out['exact_rate']}, wrong shown {out['wrong_shown_rate']} "
          f"(per scenario {out['wrong_per_scenario']}), nothing when nothing due "
          f"{out['nothing_rate']}")
    print(f"  latency p50 {out['latency_ms_p50']} ms, p90 {out['latency_ms_p90']} ms")
    e = out["next_edit_engine"]
    print(f"  in the engine (last 50): queue p50 {e['engine_queue_ms_p50']} ms, compute p50 "
          f"{e['engine_compute_ms_p50']} ms, {e['engine_evaluated_tokens_p50']} tokens evaluated")
    print("  threshold  exact  wrong/shown  nothing")
    for c in out["curve"]:
        print(f"  {c['threshold']:9.1f}  {c['exact_rate']!s:5}  {c['wrong_shown_rate']!s:11}  "
              f"{c['nothing_rate']}")
    if out["best_threshold"]:
        print(f"  best threshold (wrong/shown <= 10%, most often right): "
              f"{out['best_threshold']['threshold']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
