#!/usr/bin/env python3
"""Replay an editing session against the resident engine and measure what each keystroke costs.

The session on ../shared/bench/typing_base.py.txt: the file is opened and warmed, a new
function is typed at the end one character at a time, then the cursor jumps to lines in the
middle of the file where a few characters are typed after a 300 ms pause (during which the
client sends `warm`, as the language server does). For every completion request it records
tokens reused vs evaluated, the tokens that were really new (not a prefix of any earlier
prompt), and latency to the first token and to the first complete line. Prints p50/p90 and
writes JSON with --json PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASE = ROOT.parent / "shared" / "bench" / "typing_base.py.txt"

TYPED_AT_END = '''

def moving_average(xs: list[float], n: int) -> list[float]:
    out = []
    for i in range(len(xs) - n + 1):
        out.append(sum(xs[i:i + n]) / n)
'''
MIDFILE_EDITS = ["    # TODO: ", "x = ", "    return ", "if ", "# check "]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class Session:
    """Talks to one engine; keeps every prompt sent so 'new tokens' can be computed."""

    def __init__(self, client: Any, tokenizer: Any, max_tokens: int) -> None:
        self.client = client
        self.tok = tokenizer
        self.max_tokens = max_tokens
        self.seen: list[list[int]] = []  # token ids of every prompt / warm so far
        self.rows: list[dict[str, Any]] = []

    @staticmethod
    def _prefix(old: list[int], ids: list[int]) -> int:
        n = 0
        for a, b in zip(old, ids, strict=False):
            if a != b:
                break
            n += 1
        return n

    def _new_tokens(self, ids: list[int]) -> int:
        return len(ids) - max((self._prefix(old, ids) for old in self.seen), default=0)

    def warm(self, text: str) -> None:
        self.client.warm(text, doc="bench")
        self.seen.append(self.tok.encode(text))

    def complete(self, prompt: str, kind: str) -> dict[str, Any]:
        from engine.protocol import Done, Token

        ids = self.tok.encode(prompt)
        new = self._new_tokens(ids)
        self.seen.append(ids)
        t0 = time.perf_counter()
        handle = self.client.generate(prompt, max_tokens=self.max_tokens, doc="bench")
        first_token = first_line = None
        text = ""
        done = None
        while True:
            msg = handle.next(300)
            now = (time.perf_counter() - t0) * 1000
            if isinstance(msg, Token):
                if first_token is None:
                    first_token = now
                text += msg.text
                if first_line is None and "\n" in text.lstrip("\n"):
                    first_line = now
            else:
                assert isinstance(msg, Done)
                done = msg
                break
        total = (time.perf_counter() - t0) * 1000
        row = {
            "kind": kind,
            "prompt_tokens": done.prompt_tokens,
            "reused": done.reused_tokens,
            "evaluated": done.evaluated_tokens,
            "new_tokens": new,
            "extra_eval": done.evaluated_tokens - new,
            "first_token_ms": first_token if first_token is not None else total,
            "first_line_ms": first_line if first_line is not None else total,
            "total_ms": total,
        }
        self.rows.append(row)
        return row


class LlamaCppSession:
    """The same replay against llama.cpp (llama-cpp-python) with its own prompt cache: it
    keeps the previous sequence's K/V and re-evaluates from the first differing token."""

    def __init__(self, model_path: str, threads: int, max_tokens: int, pause_s: float) -> None:
        from llama_cpp import Llama

        self.pause_s = pause_s
        self.backlog_ms = 0.0  # warm work still running when the next request would start

        self.llm = Llama(model_path=model_path, n_ctx=4096, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, verbose=False)
        self.max_tokens = max_tokens
        self.rows: list[dict[str, Any]] = []
        self.seen: list[list[int]] = []

    def _ids(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=True, special=True))

    def _common(self, ids: list[int]) -> int:
        n = 0
        for a, b in zip(self.llm._input_ids[: self.llm.n_tokens], ids, strict=False):
            if a != b:
                break
            n += 1
        return n

    def warm(self, text: str) -> None:
        ids = self._ids(text)
        keep = min(self._common(ids), len(ids) - 1)
        t0 = time.perf_counter()
        self.llm.n_tokens = keep
        self.llm.eval(ids[keep:])
        # this runs synchronously here but would overlap the pause in a server: what exceeds
        # the pause delays the next request, so it is added to that request's latency
        self.backlog_ms = max(0.0, (time.perf_counter() - t0 - self.pause_s) * 1000)
        self.seen.append(ids)

    def complete(self, prompt: str, kind: str) -> dict[str, Any]:
        ids = self._ids(prompt)
        reused = min(self._common(ids), len(ids) - 1)
        new = len(ids) - max((Session._prefix(old, ids) for old in self.seen), default=0)
        self.seen.append(ids)
        t0 = time.perf_counter()
        first_token = first_line = None
        text = ""
        for chunk in self.llm.create_completion(ids, max_tokens=self.max_tokens,
                                                temperature=0.0, stream=True):
            now = (time.perf_counter() - t0) * 1000
            if first_token is None:
                first_token = now
            text += chunk["choices"][0]["text"]  # type: ignore[index]
            if first_line is None and "\n" in text.lstrip("\n"):
                first_line = now
        total = (time.perf_counter() - t0) * 1000
        wait, self.backlog_ms = self.backlog_ms, 0.0
        first_token = None if first_token is None else first_token + wait
        first_line = None if first_line is None else first_line + wait
        total += wait
        row = {"kind": kind, "prompt_tokens": len(ids), "reused": reused,
               "evaluated": len(ids) - reused, "new_tokens": new,
               "extra_eval": len(ids) - reused - new,
               "first_token_ms": first_token if first_token is not None else total,
               "first_line_ms": first_line if first_line is not None else total,
               "total_ms": total}
        self.rows.append(row)
        return row


def replay(session: Any, base: str, pause_s: float, type_gap_s: float) -> None:
    doc = base
    # open: the language server warms the document, then the user starts typing
    session.warm(doc)
    session.complete(doc, "warmup")
    for ch in TYPED_AT_END:
        doc += ch
        time.sleep(type_gap_s)
        session.complete(doc, "end")
    time.sleep(pause_s)
    session.warm(doc)
    # cursor jumps to the middle of the file; a short edit there after a pause
    lines = doc.splitlines(keepends=True)
    for k, snippet in enumerate(MIDFILE_EDITS):
        line = len(lines) * (k + 2) // (len(MIDFILE_EDITS) + 3)
        at = sum(len(x) for x in lines[:line])
        doc = doc[:at] + snippet + doc[at:]
        lines = doc.splitlines(keepends=True)
        cursor = at + len(snippet)
        session.warm(doc)  # the pause after the edit: the server warms the edited file
        time.sleep(pause_s)
        session.complete(doc[:cursor], "midfile")
        for ch in "ab":  # two more keystrokes right there
            doc = doc[:cursor] + ch + doc[cursor:]
            cursor += 1
            time.sleep(type_gap_s)
            session.complete(doc[:cursor], "midfile-type")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [r for r in rows if r["kind"] != "warmup"]
    end = [r for r in keys if r["kind"] in ("end", "midfile-type")]  # typing keystrokes
    mid = [r for r in keys if r["kind"] == "midfile"]  # first request after a jump + edit
    return {
        "requests": len(rows),
        "extra_eval_tokens_max": max(r["extra_eval"] for r in end),
        "midfile_extra_eval_tokens_max": max(r["extra_eval"] for r in mid),
        "evaluated_tokens_p50": statistics.median(r["evaluated"] for r in keys),
        "first_token_ms_p50": pct([r["first_token_ms"] for r in end], 0.5),
        "first_token_ms_p90": pct([r["first_token_ms"] for r in end], 0.9),
        "first_line_ms_p50": pct([r["first_line_ms"] for r in end], 0.5),
        "first_line_ms_p90": pct([r["first_line_ms"] for r in end], 0.9),
        "midfile_first_token_ms_p50": pct([r["first_token_ms"] for r in mid], 0.5),
        "midfile_first_token_ms_p90": pct([r["first_token_ms"] for r in mid], 0.9),
        "reused_share": sum(r["reused"] for r in keys) / max(1, sum(r["prompt_tokens"]
                                                                    for r in keys)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--pause-ms", type=float, default=300)
    ap.add_argument("--type-gap-ms", type=float, default=30)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    from engine.runtime import Model
    from gemma_lsp.engine_client import EngineClient

    base = BASE.read_text()
    tokenizer = Model.load().tokenizer
    run = Path(tempfile.mkdtemp(prefix="gb-", dir="/tmp"))
    sock = run / "engine.sock"
    env = dict(os.environ, GEMMA_LSP_THREADS=str(args.threads))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gemma_lsp", "engine", "--socket", str(sock), "--no-persist",
         "--threads", str(args.threads)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = EngineClient(socket_path=sock, autostart=False) if _wait(sock) else None
        assert client is not None, "the engine did not start"
        session = Session(client, tokenizer, args.max_tokens)
        replay(session, base, args.pause_ms / 1000, args.type_gap_ms / 1000)
        status = client.status()
        client.shutdown()
    finally:
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(run, ignore_errors=True)

    summary = summarize(session.rows)
    summary["blas_threads"] = args.threads
    summary["engine_prefill_tok_s"] = status.get("prefill_tok_s")
    summary["engine_decode_tok_s"] = status.get("decode_tok_s")
    print(f"{'kind':13s} {'prompt':>6s} {'reused':>6s} {'eval':>5s} {'new':>4s} "
          f"{'1st tok ms':>10s} {'1st line ms':>11s}")
    for r in session.rows:
        print(f"{r['kind']:13s} {r['prompt_tokens']:6d} {r['reused']:6d} {r['evaluated']:5d} "
              f"{r['new_tokens']:4d} {r['first_token_ms']:10.1f} {r['first_line_ms']:11.1f}")
    print(f"summary (BLAS threads: {args.threads})")
    for k, v in summary.items():
        print(f"  {k:28s} {v:.2f}" if isinstance(v, float) else f"  {k:28s} {v}")
    out: dict[str, Any] = {"summary": summary, "requests": session.rows}
    if args.json:  # now, in case the llama.cpp run below crashes
        args.json.write_text(json.dumps(out, indent=1))
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("  (llama-cpp-python not installed: no side-by-side run)")
    else:
        from engine.weights import embedded_model_path

        theirs = LlamaCppSession(str(embedded_model_path()), args.threads, args.max_tokens,
                                 args.pause_ms / 1000)
        replay(theirs, base, args.pause_ms / 1000, args.type_gap_ms / 1000)
        their_summary = summarize(theirs.rows)
        print("llama.cpp (llama-cpp-python, same replay, same threads)   ours/llama.cpp")
        for k, v in their_summary.items():
            mine = summary.get(k)
            ratio = (f"{mine / v:8.2f}" if isinstance(mine, int | float) and v
                     and "ms" in k else "")
            print(f"  {k:28s} {v:10.2f} {ratio}" if isinstance(v, float)
                  else f"  {k:28s} {v!s:>10} {ratio}")
        out["llama_cpp"] = {"summary": their_summary, "requests": theirs.rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


def _wait(sock: Path, timeout: float = 300) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(sock))
            return True
        except OSError:
            time.sleep(0.1)
        finally:
            s.close()
    return False


if __name__ == "__main__":
    raise SystemExit(main())
