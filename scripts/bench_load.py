#!/usr/bin/env python3
"""Eight editor windows on one engine: per-client inline-completion latency, errors and the
engine's memory under load.

Starts ONE engine daemon and N language servers (`python -m gemma_lsp`, each its own stdio
LSP client driven from here, as N editor windows would), each on a different ~8 KB file
(../shared/bench/typing_base.py.txt if present, then the repo's engine/*.py and gemma_lsp/*.py).
Every window replays keystrokes for `--duration-s`: it jumps to a line, types a statement one
character at a time (didChange, then textDocument/inlineCompletion, awaited: a closed loop with
`--type-gap-ms` between keystrokes) and jumps on. Meanwhile the engine's RSS is sampled.
Then a second phase measures the wait of a 1-token completion from one client while another
client's long prompt (`--long-tokens`, same priority) is being prefilled.

Prints per-client p50/p90 latency, errors (JSON-RPC errors, timeouts, error popups), empty
answers, RSS over time against model + cache budget, and the targets; writes JSON (--json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lsprotocol import types as t
from pygls.lsp.client import LanguageClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_BASE = ROOT.parent / "shared" / "bench" / "typing_base.py.txt"
FALLBACK_BASE = ROOT / "tests" / "data" / "typing_base.py.txt"
WINDOW = 8192
# typed on a line of their own, opened below the line the cursor jumps to (as an editor user
# does): typed into the start of an existing line, every keystroke would be in the middle of
# that line, where a completion must run into its rest or there is none
SNIPPETS = [
    "\n    result = compute(values, limit=10)",
    "\n    if not items:\n        return None",
    "\n    for key, value in sorted(table.items()):",
    "\n    log.info(\"done: %d items\", len(out))",
    "\ndef helper(path: str) -> list[str]:",
    "\n    total = sum(x * x for x in xs)",
]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def files(n: int) -> list[tuple[str, str]]:
    """n (name, text) pairs: ~8 KB windows cut at a line end, each from a different file."""
    base = SHARED_BASE if SHARED_BASE.exists() else FALLBACK_BASE
    paths = [base] + sorted((p for d in ("engine", "gemma_lsp") for p in (ROOT / d).glob("*.py")
                             if p.stat().st_size >= WINDOW),
                            key=lambda p: (-p.stat().st_size, p.name))
    out = []
    for p in paths[:n]:
        text = p.read_text()
        cut = text[:WINDOW]
        cut = cut[: cut.rfind("\n") + 1] if len(text) > WINDOW else cut
        out.append((p.name, cut))
    if len(out) < n:
        raise SystemExit(f"only {len(out)} files of >= {WINDOW} bytes found for {n} clients")
    return out


def position_at(text: str, offset: int) -> t.Position:
    before = text[:offset]
    line = before.count("\n")
    col = len(before) - (before.rfind("\n") + 1)
    return t.Position(line, len(before[len(before) - col:].encode("utf-16-le")) // 2)


def rss_mb(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Window:
    """One editor window: a language server process and the keystrokes typed into it."""

    def __init__(self, index: int, name: str, text: str, args: argparse.Namespace) -> None:
        self.index, self.name, self.text, self.args = index, name, text, args
        self.uri = f"file:///bench/{index}/{name}"
        self.version = 1
        self.rows: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.client = LanguageClient(f"bench-load-{index}", "1")

        @self.client.feature(t.WINDOW_SHOW_MESSAGE)
        def _show(params: t.ShowMessageParams) -> None:
            if params.type == t.MessageType.Error:
                self.errors.append(f"popup: {params.message}")

    async def start(self, env: dict[str, str]) -> None:
        await self.client.start_io(sys.executable, "-m", "gemma_lsp", env=env)
        init = {"gemma": {"completion": {"debounceMs": self.args.debounce_ms}}}
        caps = t.ClientCapabilities(general=t.GeneralClientCapabilities(
            position_encodings=[t.PositionEncodingKind.Utf16]))
        await self.client.initialize_async(t.InitializeParams(
            capabilities=caps, initialization_options=init))
        self.client.initialized(t.InitializedParams())
        self.client.text_document_did_open(t.DidOpenTextDocumentParams(t.TextDocumentItem(
            uri=self.uri, language_id="python", version=self.version, text=self.text)))

    async def type_for(self, until: float) -> None:
        rng = random.Random(self.index)
        while time.monotonic() < until:
            lines = self.text.splitlines(keepends=True)
            at = rng.randrange(len(lines) // 4, len(lines))  # jump to a line, type a statement
            cursor = sum(len(x) for x in lines[:at]) + len(lines[at].rstrip("\r\n"))  # its end
            for ch in rng.choice(SNIPPETS):
                if time.monotonic() >= until:
                    return
                await self.keystroke(cursor, ch)
                cursor += len(ch)
                await asyncio.sleep(self.args.type_gap_ms / 1000)

    async def keystroke(self, offset: int, insert: str) -> None:
        pos = position_at(self.text, offset)
        self.text = self.text[:offset] + insert + self.text[offset:]
        self.version += 1
        self.client.text_document_did_change(t.DidChangeTextDocumentParams(
            t.VersionedTextDocumentIdentifier(uri=self.uri, version=self.version),
            [t.TextDocumentContentChangePartial(range=t.Range(pos, pos), text=insert)]))
        t0 = time.perf_counter()
        fut = asyncio.ensure_future(self.client.text_document_inline_completion_async(
            t.InlineCompletionParams(
                text_document=t.TextDocumentIdentifier(self.uri),
                position=position_at(self.text, offset + len(insert)),
                context=t.InlineCompletionContext(
                    trigger_kind=t.InlineCompletionTriggerKind.Automatic))))
        await asyncio.wait({fut}, timeout=self.args.request_timeout_s)  # left running if late
        if not fut.done():
            self.errors.append(f"no answer in {self.args.request_timeout_s:.0f}s")
            return
        try:
            res = fut.result()
        except Exception as e:  # a JSON-RPC error reply
            self.errors.append(f"{type(e).__name__}: {e}")
            return
        items = (res.items if isinstance(res, t.InlineCompletionList) else res) or []
        self.rows.append({"t": time.monotonic(), "ms": (time.perf_counter() - t0) * 1000,
                          "items": len(items)})

    async def stop(self) -> None:
        try:
            await asyncio.wait_for(self.client.shutdown_async(None), 30)
            self.client.exit(None)
        except Exception:
            pass
        await self.client.stop()

    def summary(self) -> dict[str, Any]:
        ms = [r["ms"] for r in self.rows]
        return {"client": self.index, "file": self.name, "requests": len(self.rows),
                "p50_ms": round(pct(ms, 0.5), 1), "p90_ms": round(pct(ms, 0.9), 1),
                "empty": sum(1 for r in self.rows if r["items"] == 0),
                "errors": len(self.errors), "error_samples": self.errors[:3]}


def engine_status(sock: Path) -> dict[str, Any]:
    from gemma_lsp.engine_client import EngineClient

    client = EngineClient(socket_path=sock, autostart=False, name="bench-load")
    try:
        return client.status()
    finally:
        client.close()


def kv_bytes(sock: Path) -> dict[str, float]:
    """The engine's K/V memory by its own count (MB): prompt cache and working buffers."""
    st = engine_status(sock)
    return {"prompt_cache_mb": round(st["cache"]["bytes"] / 2**20, 1),
            "working_kv_mb": round(st.get("kv_working_bytes", 0) / 2**20, 1)}


def wait_for_kernels(sock: Path, timeout_s: float = 120.0) -> dict[str, Any]:
    """The engine's kernel status once they are built (or off): they belong to the model's
    memory, which the RSS target is measured against."""
    deadline = time.monotonic() + timeout_s
    while True:
        k = dict(engine_status(sock).get("kernels") or {})
        if k.get("state") not in ("not built", "building") or time.monotonic() > deadline:
            return k
        time.sleep(0.2)


def overtake(sock: Path, files_text: list[str], long_tokens: int, n: int) -> dict[str, Any]:
    """Phase 2: a 1-token completion's wait while another client's long prompt prefills."""
    from engine import protocol as P
    from gemma_lsp.engine_client import EngineClient

    long_client = EngineClient(socket_path=sock, autostart=False, name="long")
    typist = EngineClient(socket_path=sock, autostart=False, name="typist")
    long_prompt = "".join(files_text) * 4
    long_prompt = long_prompt[: long_tokens * 3]  # ~3 bytes a token for Python source
    slow = long_client.generate(long_prompt, max_tokens=1)
    t0 = time.monotonic()
    while not any(j["started"] for j in typist.status()["queue"]):
        time.sleep(0.01)
    rows = []
    for i in range(n):
        h = typist.generate(files_text[i % len(files_text)][:600 + 37 * i], max_tokens=1)
        for msg in h:
            if isinstance(msg, P.Done):
                rows.append({"queue_ms": msg.queue_ms, "first_token_ms": msg.first_token_ms,
                             "long_still_running": bool(typist.status()["queue"])})
    done: Any = None
    for msg in slow:
        done = msg
    info = typist.status()
    long_client.close()
    typist.close()
    return {"long_prompt_tokens": getattr(done, "prompt_tokens", 0),
            "long_total_s": round(time.monotonic() - t0, 1),
            "prefill_chunk": info["prefill_chunk"],
            "during_long_prefill": [r for r in rows if r["long_still_running"]],
            "short_first_token_ms_p50": round(pct([r["first_token_ms"] for r in rows], 0.5), 1),
            "short_first_token_ms_max": round(max(r["first_token_ms"] for r in rows), 1),
            "short_queue_ms_max": round(max(r["queue_ms"] for r in rows), 1)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    # a private run dir in the clone (not a /tmp name other tools may clean up), unless its
    # socket path would pass the AF_UNIX limit
    parent = ROOT / ".bench-run"
    parent.mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="load-", dir=parent))
    if len(str(run_dir / "engine.sock")) > 100:
        run_dir.rmdir()
        run_dir = Path(tempfile.mkdtemp(prefix="gemma-bench-load-"))
    sock = run_dir / "engine.sock"
    env = dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(run_dir),
               GEMMA_LSP_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    log = (run_dir / "engine.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gemma_lsp", "engine", "--no-persist", "--idle-timeout", "0",
         "--socket", str(sock), "--cache-mb", str(args.cache_mb), "--threads", str(args.threads)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            assert daemon.poll() is None, (run_dir / "engine.log").read_text()
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(sock))
                break
            except OSError:
                await asyncio.sleep(0.1)
            finally:
                s.close()
        kernels = await asyncio.to_thread(wait_for_kernels, sock)
        base_rss = rss_mb(daemon.pid)  # the model as it serves: weights and packed kernels
        samples: list[tuple[float, float]] = []
        stop_sampling = threading.Event()
        t_start = time.monotonic()

        def sample() -> None:
            while not stop_sampling.wait(args.sample_s):
                samples.append((round(time.monotonic() - t_start, 1), rss_mb(daemon.pid)))

        threading.Thread(target=sample, daemon=True).start()
        docs = files(args.clients)
        windows = [Window(i, name, text, args) for i, (name, text) in enumerate(docs)]
        await asyncio.gather(*(w.start(env) for w in windows))
        await asyncio.sleep(args.warm_wait_s)  # the servers warm their documents on a pause
        until = time.monotonic() + args.duration_s
        await asyncio.gather(*(w.type_for(until) for w in windows))
        kv_after_typing = await asyncio.to_thread(kv_bytes, sock)
        await asyncio.gather(*(w.stop() for w in windows))
        phase2 = None
        if args.long_tokens > 0:
            phase2 = await asyncio.to_thread(overtake, sock, [d[1] for d in docs],
                                             args.long_tokens, args.overtake_requests)
        kv_after_long = await asyncio.to_thread(kv_bytes, sock)
        stop_sampling.set()
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        logfile = run_dir / "engine.log"
        engine_log = logfile.read_text(errors="replace") if logfile.exists() else ""
        shutil.rmtree(run_dir, ignore_errors=True)

    clients = [w.summary() for w in windows]
    p90s = [c["p90_ms"] for c in clients]
    median_p90 = statistics.median(p90s)
    peak = max((mb for _, mb in samples), default=float("nan"))
    limit = (base_rss + args.cache_mb) * 1.15
    summary = {
        "clients": args.clients, "duration_s": args.duration_s, "blas_threads": args.threads,
        "debounce_ms": args.debounce_ms, "type_gap_ms": args.type_gap_ms,
        "requests": sum(c["requests"] for c in clients),
        "errors": sum(c["errors"] for c in clients),
        "empty": sum(c["empty"] for c in clients),
        "median_client_p90_ms": round(median_p90, 1),
        "worst_client_p90_ms": max(p90s),
        "worst_p90_over_median": round(max(p90s) / median_p90, 2) if median_p90 else None,
        "min_client_requests": min(c["requests"] for c in clients),
        "engine_rss_after_load_mb": round(base_rss, 1), "cache_budget_mb": args.cache_mb,
        "engine_rss_peak_mb": round(peak, 1), "rss_limit_mb": round(limit, 1),
        "kernels": kernels, "kv_after_typing": kv_after_typing, "kv_after_long": kv_after_long,
        "machine_load_avg": os.getloadavg(),
    }
    summary["targets"] = {
        "p90_within_2x_median": max(p90s) <= 2 * median_p90,
        "zero_errors": summary["errors"] == 0,
        "rss_within_model_cache_15pct": peak <= limit,
        "every_client_served": summary["min_client_requests"] > 0
        and all(c["requests"] > c["empty"] for c in clients),
    }
    return {"summary": summary, "clients": clients, "rss_mb": samples, "overtake": phase2,
            "engine_log_tail": engine_log.splitlines()[-20:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration-s", type=float, default=75.0)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--cache-mb", type=int, default=512)
    ap.add_argument("--debounce-ms", type=int, default=120, help="the servers' debounce")
    ap.add_argument("--type-gap-ms", type=float, default=150.0,
                    help="pause after each answered keystroke")
    ap.add_argument("--warm-wait-s", type=float, default=3.0)
    ap.add_argument("--request-timeout-s", type=float, default=60.0)
    ap.add_argument("--sample-s", type=float, default=1.0)
    ap.add_argument("--long-tokens", type=int, default=7700,
                    help="phase 2: the other client's prompt length (0 = skip phase 2)")
    ap.add_argument("--overtake-requests", type=int, default=5)
    args = ap.parse_args()
    out = asyncio.run(run(args))
    s = out["summary"]
    print(f"{s['clients']} language servers on one engine for {s['duration_s']:.0f}s "
          f"(BLAS threads {s['blas_threads']}, load average {s['machine_load_avg'][0]:.1f})")
    print(f"  {'client':>6} {'file':22} {'reqs':>5} {'p50 ms':>8} {'p90 ms':>8} {'empty':>6} "
          f"{'errors':>6}")
    for c in out["clients"]:
        print(f"  {c['client']:>6} {c['file']:22} {c['requests']:>5} {c['p50_ms']:>8.1f} "
              f"{c['p90_ms']:>8.1f} {c['empty']:>6} {c['errors']:>6}")
    for k, v in s.items():
        if k != "targets":
            print(f"  {k:30s} {v}")
    print("  RSS over time (s, MB):", " ".join(f"{ts:.0f}:{mb:.0f}" for ts, mb in
                                               out["rss_mb"][:: max(1, len(out["rss_mb"]) // 12)]))
    if out["overtake"]:
        o = out["overtake"]
        print(f"  a 1-token completion while another client's {o['long_prompt_tokens']}-token "
              f"prompt prefills (chunk {o['prefill_chunk']}): first token p50 "
              f"{o['short_first_token_ms_p50']} ms, max {o['short_first_token_ms_max']} ms, "
              f"queue max {o['short_queue_ms_max']} ms; long prompt took {o['long_total_s']} s")
    for k, ok in s["targets"].items():
        print(f"  target {k:32s} {'met' if ok else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
