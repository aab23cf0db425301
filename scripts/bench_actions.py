#!/usr/bin/env python3
"""Explain, Add docstring and Fix on real functions, through the server's ActionService and a
real engine daemon with the shipped model: how often an answer copies an example of the
few-shot prompt, how often a docstring or explanation names something that is not in the code,
how often a fix repairs the misspelt name, and the time to the first streamed text.

The functions come from this repository (engine/, gemma_lsp/) and tests/data/typing_base.py.txt
(none is an example of the prompts); their docstrings are removed first. For Fix one name used
in the body is misspelt and the diagnostic is pyflakes' "undefined name". Each file is opened as
a document and the action runs on the function's lines, with the file around it as context,
as in an editor; with --pick-delay S the code-action list is asked for first and the action
runs S seconds later (the server warms the likely action meanwhile). Prints a table and
totals; writes JSON with --json PATH.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsprotocol import types as t  # noqa: E402

from gemma_lsp.actions import ActionError, ActionService  # noqa: E402
from gemma_lsp.backend import EngineBackend  # noqa: E402
from gemma_lsp.config import parse_options  # noqa: E402
from gemma_lsp.documents import DocumentStore  # noqa: E402
from gemma_lsp.prompts import EXAMPLES, copies_example  # noqa: E402

SOURCES = ["engine/sampling.py", "engine/protocol.py", "gemma_lsp/postprocess.py",
           "gemma_lsp/context.py", "gemma_lsp/documents.py", "tests/data/typing_base.py.txt"]
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# words any explanation of any code may use: not taken as naming something in the code
_PROSE = frozenset("""a an the and or not of to in on at by for from with without into onto
is are be been being was were it its this that these those which who whose what when where
while if then else than as so such each every all any both either no none only also just
returns return returned returning value values given gets get sets set takes take uses use
used using makes make made does do done has have had can may must should will would one two
first last next new old other same more most less least many much few number numbers list
lists string strings text line lines character characters item items element elements
function method class object objects argument arguments parameter parameters result results
true false none empty whether otherwise there their them they we you your our start end
after before until once again over under between about like how why here some own out up
down off via per""".split())


@dataclass
class Case:
    file: str
    name: str
    start_line: int  # 0-based, inclusive
    end_line: int  # 0-based, exclusive
    text: str  # the file's text with docstrings removed


@dataclass
class Outcome:
    action: str
    file: str
    function: str
    ok: bool
    first_text_s: float | None
    total_s: float
    answer: str = ""
    error: str = ""
    copies: str = ""  # the example copied (language), if any
    invented: list[str] = field(default_factory=list)  # names not in the code
    fixed: bool | None = None


def _strip_docstrings(src: str) -> str:
    """The source without function docstrings (so that no answer can copy one)."""
    tree = ast.parse(src)
    lines = src.split("\n")
    drop: list[tuple[int, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str) and len(node.body) > 1):
                drop.append((first.lineno - 1, first.end_lineno or first.lineno))
    for a, b in sorted(drop, reverse=True):
        del lines[a:b]
    return "\n".join(lines)


def collect(per_file: int, total: int) -> list[Case]:
    """Top-level functions and methods of 4..30 lines, spread over the source files."""
    cases: list[Case] = []
    for rel in SOURCES:
        path = ROOT / rel
        if not path.exists():
            continue
        text = _strip_docstrings(path.read_text())
        found = []
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if 4 <= n <= 30 and not node.name.startswith("__"):
                    start = node.lineno - 1 - len(node.decorator_list)
                    found.append(Case(rel, node.name, start, node.end_lineno or node.lineno,
                                      text))
        found.sort(key=lambda c: c.start_line)
        step = max(1, len(found) // per_file)
        cases.extend(found[::step][:per_file])
    return cases[:total]


def misspell(case: Case) -> tuple[str, str, str] | None:
    """(text with one name in the function's body misspelt, the name, the misspelling)."""
    lines = case.text.split("\n")
    body = "\n".join(lines[case.start_line : case.end_line])
    tree = ast.parse(_dedent(body))
    fn = tree.body[0]
    assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
    params = [a.arg for a in fn.args.args if a.arg not in ("self", "cls") and len(a.arg) >= 3]
    loads = [n for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
             and n.id in params]
    if not loads:
        return None
    target = max(loads, key=lambda n: (n.lineno, n.col_offset))
    name = target.id
    wrong = name[:-2] + name[-1] if len(name) > 3 else name + name[-1]  # drop a letter
    line = case.start_line + target.lineno - 1  # the body was dedented by its first line's
    base_indent = len(lines[case.start_line]) - len(lines[case.start_line].lstrip())
    col = target.col_offset + base_indent
    if lines[line][col : col + len(name)] != name:
        return None
    lines[line] = lines[line][:col] + wrong + lines[line][col + len(name):]
    return "\n".join(lines), name, wrong


def _dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text)


def invented_names(answer: str, own: str) -> list[str]:
    """Code-like names in `answer` (in backticks, or with `_`, `.` or `()` or CamelCase) that
    the code (`own`: the function and its file) does not have."""
    have = {w.lower() for w in _WORD.findall(own)}
    named: set[str] = set()
    for m in re.finditer(r"`([^`]+)`", answer):
        named.update(_WORD.findall(m.group(1)))
    for w in _WORD.findall(answer):
        if "_" in w.strip("_") or re.search(r"[a-z][A-Z]", w):
            named.add(w)
    return sorted(w for w in named if w.lower() not in have and w.lower() not in _PROSE
                  and not w.isdigit())


def example_text() -> str:
    return "\n".join(e.code + "\n" + e.answer for pool in EXAMPLES.values() for e in pool)


async def run_one(svc: ActionService, store: DocumentStore, case: Case, action: str,
                  uri: str, pick_delay: float = 0.0) -> Outcome:
    text = case.text
    diagnostics: list[str] = []
    fix = None
    if action == "fix":
        fix = misspell(case)
        if fix is None:
            return Outcome(action, case.file, case.name, False, None, 0.0,
                           error="no parameter to misspell")
        text, _, wrong = fix
        diagnostics = [f"undefined name '{wrong}'"]
    doc = store.open(uri, text, 1, "python")
    rng = t.Range(t.Position(case.start_line, 0), t.Position(case.end_line, 0))
    if pick_delay > 0:  # as an editor: the action list for the selection, a pause to pick one
        diags = [t.Diagnostic(rng, d) for d in diagnostics]
        params = t.CodeActionParams(t.TextDocumentIdentifier(uri), rng, t.CodeActionContext(
            diagnostics=diags, trigger_kind=t.CodeActionTriggerKind.Invoked))
        svc.offer(params)
        svc.schedule_warm(params)
        await asyncio.sleep(pick_delay)
    first: list[float] = []
    t0 = time.perf_counter()

    def on_text(so_far: str) -> None:
        if not first and so_far.strip():
            first.append(time.perf_counter() - t0)

    out = Outcome(action, case.file, case.name, True, None, 0.0)
    own = "\n".join(text.split("\n")[case.start_line : case.end_line])
    try:
        if action == "explain":
            out.answer = await svc.explain(uri, rng, on_text=on_text)
        else:
            edit = await svc.edit("docstring" if action == "docstring" else "fix", uri, rng,
                                  version=1, diagnostics=diagnostics, on_text=on_text)
            change = edit.document_changes[0]  # type: ignore[index]
            assert isinstance(change, t.TextDocumentEdit)
            out.answer = "".join(e.new_text for e in change.edits)  # type: ignore[union-attr]
    except ActionError as e:
        out.ok, out.error = False, str(e)
    out.total_s = time.perf_counter() - t0
    out.first_text_s = first[0] if first else None
    if out.answer:
        examples = [e for pool in EXAMPLES.values() for e in pool]
        copied = copies_example(out.answer, examples, doc.text)
        out.copies = copied.language if copied else ""
        if action in ("explain", "docstring"):
            said = out.answer
            if action == "docstring":
                m = re.search(r'"""(.*?)"""', out.answer, re.S)
                said = m.group(1) if m else out.answer
            out.invented = invented_names(said, own + "\n" + doc.text)
    if fix is not None:
        _, name, wrong = fix
        out.fixed = bool(out.answer) and wrong not in out.answer and name in out.answer
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cases = collect(args.per_file, args.functions)
    run_dir = Path(tempfile.mkdtemp(prefix="gb-", dir="/tmp"))
    env = dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(run_dir),
               GEMMA_LSP_THREADS=str(args.threads))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gemma_lsp", "engine", "--no-persist", "--idle-timeout", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: list[Outcome] = []
    try:
        sock = run_dir / "engine.sock"
        deadline = time.monotonic() + 300
        while not sock.exists():
            assert daemon.poll() is None, "the engine daemon exited"
            assert time.monotonic() < deadline, "the engine did not start"
            time.sleep(0.2)
        backend = EngineBackend(socket_path=str(sock), autostart=False)
        actions: dict[str, Any] = {"maxTokens": args.max_tokens, "temperature": 0}
        if args.prefix_tokens is not None:
            actions["prefixTokens"] = args.prefix_tokens
        opts, _ = parse_options({"actions": actions})
        store = DocumentStore()
        svc = ActionService(store, lambda: backend, lambda: opts)
        for i, case in enumerate(cases):
            for action in args.actions:
                uri = f"file:///bench/{i}/{Path(case.file).name}"
                res = await run_one(svc, store, case, action, uri, args.pick_delay)
                results.append(res)
                ft = f"{res.first_text_s:.2f}s" if res.first_text_s is not None else "-"
                flag = ("COPIES " + res.copies if res.copies else "") + (
                    " invents " + ",".join(res.invented) if res.invented else "") + (
                    "" if res.fixed is None else (" fixed" if res.fixed else " not fixed"))
                if args.json:  # what is done so far survives an interrupted run
                    args.json.write_text(json.dumps(
                        {"partial": True, "results": [asdict(r) for r in results]}, indent=1))
                print(f"{action:9} {case.file}:{case.name:28} first {ft:>7} total "
                      f"{res.total_s:6.1f}s {'ok' if res.ok else 'refused: ' + res.error}"
                      f" {flag}", flush=True)
        status = backend.status()
        backend.close()
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(run_dir, ignore_errors=True)

    summary: dict[str, Any] = {}
    for action in args.actions:
        rs = [r for r in results if r.action == action]
        answered = [r for r in rs if r.answer]
        firsts = [r.first_text_s for r in rs if r.first_text_s is not None]
        summary[action] = {
            "runs": len(rs),
            "answered": len(answered),
            "refused": len(rs) - len(answered),
            "copies_example": sum(1 for r in answered if r.copies),
            "names_not_in_code": sum(1 for r in answered if r.invented),
            "fixed": sum(1 for r in rs if r.fixed) if action == "fix" else None,
            "first_text_p50_s": round(statistics.median(firsts), 3) if firsts else None,
            "first_text_max_s": round(max(firsts), 3) if firsts else None,
            "first_text_p90_s": round(sorted(firsts)[int(0.9 * (len(firsts) - 1))], 3)
            if firsts else None,
            "total_p50_s": round(statistics.median(r.total_s for r in rs), 3) if rs else None,
        }
    print(f"\n{len(cases)} functions from {len({c.file for c in cases})} files, "
          f"{args.threads} engine threads, picked {args.pick_delay} s after the action list")
    for action, s in summary.items():
        print(f"{action:9} answered {s['answered']}/{s['runs']}, copies an example "
              f"{s['copies_example']}, names something not in the code "
              f"{s['names_not_in_code']}" + (f", fixed {s['fixed']}" if s["fixed"] is not None
                                              else "")
              + f", first text p50 {s['first_text_p50_s']} s p90 {s['first_text_p90_s']} s "
              f"max {s['first_text_max_s']} s,"
              f" total p50 {s['total_p50_s']} s")
    return {"threads": args.threads, "pick_delay_s": args.pick_delay,
            "model": status.get("model"), "summary": summary,
            "engine": {k: status.get(k) for k in ("prefill_tok_s", "decode_tok_s")},
            "results": [asdict(r) for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--functions", type=int, default=21)
    ap.add_argument("--per-file", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--prefix-tokens", type=int, help="actions.prefixTokens (default: its own)")
    ap.add_argument("--pick-delay", type=float, default=0.0,
                    help="ask for the code-action list first and pick the action this many "
                         "seconds later, as a user reading the menu (the server warms the "
                         "likely action's prompt meanwhile); 0: run the action at once")
    ap.add_argument("--actions", nargs="+", default=["explain", "docstring", "fix"],
                    choices=["explain", "docstring", "fix"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
