#!/usr/bin/env python3
"""Speculative decoding benchmark: plain decode, our speculation, llama.cpp prompt lookup.

Side by side in one run, same GGUF (the embedded model), same thread count:
  (a) refactor: a 40-line selection rewritten (few-shot refactor prompt, as the server builds it)
  (b) docstring: documentation for a function
  (c) completions: --completions requests at cursors through the typing benchmark file, each
      decoded to the end of its line (first-line latency; the K/V of the file so far is
      reused, as a typing session reuses it)
  (d) chat: an answer about a code snippet (chat template)
Ours: `engine.generate.generate` plain, then with `speculate=True` (prompt lookup, adaptive
draft length; the same greedy ids are checked). llama.cpp: llama-cpp-python's `Llama` with
`LlamaPromptLookupDecoding` on our token ids. Prints a table and writes JSON (--json).
Reads ../shared/bench/typing_base.py.txt when present, else tests/data/typing_base.py.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "bench" / "typing_base.py.txt"
FALLBACK = ROOT / "tests" / "data" / "typing_base.py.txt"


def source_text() -> tuple[str, Path]:
    path = SHARED if SHARED.exists() else FALLBACK
    return path.read_text(), path


def cases(model_name: str, text: str) -> dict[str, tuple[str, list[str], int]]:
    """name -> (prompt, stop strings, max tokens) for the long-answer cases."""
    from gemma_lsp.context import CompletionContext
    from gemma_lsp.prompts import docstring_prompt, explain_prompt, refactor_prompt

    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("class "))
    sel = "".join(lines[at : at + 40])
    ctx = CompletionContext(prefix="".join(lines[max(0, at - 60) : at]),
                            suffix="".join(lines[at + 40 : at + 60]), language_id="python")
    fn = next(i for i, line in enumerate(lines) if line.startswith("def "))
    end = next((i for i in range(fn + 1, len(lines)) if lines[i].strip()
                and not lines[i].startswith((" ", "\t"))), fn + 12)
    func = "".join(lines[fn:end])
    fctx = CompletionContext(prefix="".join(lines[max(0, fn - 40) : fn]),
                             suffix="".join(lines[end : end + 20]), language_id="python")
    refactor = refactor_prompt(ctx, sel, "python", False, "rename the class to Ledger, keep "
                               "everything else")
    docstring = docstring_prompt(fctx, func, "python", False)
    chat = explain_prompt(None, func, "python", True)
    del model_name
    return {"refactor": (*refactor, 480), "docstring": (*docstring, 200),
            "chat": (*chat, 200)}


def completion_cursors(text: str, n: int) -> list[int]:
    """n cursor offsets spread over the file, each half-way into a non-blank line."""
    starts, pos = [], 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        if len(body.strip()) >= 8:
            starts.append(pos + len(body) - len(body.lstrip()) + len(body.strip()) // 2)
        pos += len(line)
    starts = starts[len(starts) // 10 :]  # leave some file before the first one
    step = max(1, len(starts) // n)
    return starts[::step][:n]


# ----------------------------------------------------------------------------- ours


def run_ours(model: Any, ids: list[int], stop: list[str], max_tokens: int, speculate: bool,
             kv: Any = None) -> dict[str, Any]:
    from engine.generate import Final, GenerateOptions, generate

    opts = GenerateOptions(max_tokens=max_tokens, stop_strings=tuple(stop), speculate=speculate)
    t0 = time.perf_counter()
    final = None
    for ev in generate(model, ids, opts, kv=kv):
        if isinstance(ev, Final):
            final = ev
    assert final is not None
    return {"seconds": time.perf_counter() - t0, "tokens": len(final.token_ids),
            "decode_tok_s": final.decode_tok_s, "ids": list(final.token_ids),
            "text": final.text}


def run_ours_spec(model: Any, ids: list[int], stop: list[str], max_tokens: int, cost: Any,
                  kv: Any = None, accept: dict[str, float] | None = None,
                  kind: str = "") -> dict[str, Any]:
    """Speculation as the daemon runs it: one ForwardCost shared by all requests, and each
    request of a kind starting from the acceptance estimate the last one ended with."""
    from engine.generate import Final, GenerateOptions, generate
    from engine.speculate import PromptLookup, Speculator

    accept = {} if accept is None else accept
    spec = Speculator(PromptLookup(ids), cost, accept=accept.get(kind))
    opts = GenerateOptions(max_tokens=max_tokens, stop_strings=tuple(stop))
    t0 = time.perf_counter()
    final = None
    for ev in generate(model, ids, opts, kv=kv, speculator=spec):
        if isinstance(ev, Final):
            final = ev
    assert final is not None
    accept[kind] = spec.accept
    return {"seconds": time.perf_counter() - t0, "tokens": len(final.token_ids),
            "decode_tok_s": final.decode_tok_s, "ids": list(final.token_ids),
            "text": final.text, "drafted": spec.drafted, "accepted": spec.accepted,
            "verify_steps": spec.verify_steps, "plain_steps": spec.plain_steps,
            "tokens_per_verify_step": (round((spec.accepted + spec.verify_steps)
                                             / spec.verify_steps, 2)
                                       if spec.verify_steps else 0.0)}


# ----------------------------------------------------------------------------- llama.cpp


def llama(threads: int, n_ctx: int) -> Any:
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        return None
    from engine.weights import embedded_model_path

    # logits_all=True by hand: 0.3.36 sizes its score buffer from the argument, not from the
    # True that a draft model implies, and fails past 512 tokens (n_batch) without it
    return Llama(str(embedded_model_path()), n_ctx=n_ctx, n_threads=threads,
                 n_threads_batch=threads, n_batch=512, verbose=False, logits_all=True,
                 draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))


def run_llama(llm: Any, ids: list[int], stop: list[str], max_tokens: int) -> dict[str, Any]:
    """Greedy completion on our token ids, streamed: decode speed excludes the first token."""
    t0 = time.perf_counter()
    first = None
    n = 0
    text = ""
    for chunk in llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                       stop=stop or None, stream=True):
        if first is None:
            first = time.perf_counter()
        text += chunk["choices"][0]["text"]
        n += 1
    end = time.perf_counter()
    tokens = len(llm.tokenize(text.encode(), add_bos=False, special=True)) if text else 0
    span = end - (first or end)
    return {"seconds": end - t0, "tokens": tokens,
            "decode_tok_s": (tokens - 1) / span if span > 0 and tokens > 1 else 0.0,
            "text": text}


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--completions", type=int, default=200)
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp side")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: answers cut to 1/8 of their length, 5 completions")
    ap.add_argument("--cases", default="refactor,docstring,chat,completions",
                    help="which cases to run (comma-separated)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="answer length limits times this (a loaded machine: less than 1)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    from engine.runtime import Model, pin_blas_threads
    from engine.speculate import ForwardCost

    blas, threads = pin_blas_threads(args.threads)
    model = Model.load()
    model.warm_up()
    model.build_kernels(threads)  # as the daemon does once it serves (the LM head, 2+ rows)
    text, src = source_text()
    load = os.getloadavg()
    print(f"BLAS {blas}, {threads} threads; load average {load[0]:.1f} on "
          f"{os.cpu_count()} cores; source {src}")
    llm = None if args.no_llama else llama(threads, 4096)
    if llm is None and not args.no_llama:
        print("(llama-cpp-python not installed: no llama.cpp column)")
    cost = ForwardCost()
    out: dict[str, Any] = {"threads": threads, "blas": blas, "load_average_start": load[0],
                           "source": str(src), "scale": 0.125 if args.quick else args.scale,
                           "cases": {}}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))

    # (a), (b), (d): long answers, decode tok/s
    if args.quick:
        args.completions = min(args.completions, 5)
    wanted = set(args.cases.split(","))
    for name, (prompt, stop, max_tokens) in cases(model.name, text).items():
        if name not in wanted:
            continue
        max_tokens = max_tokens // 8 if args.quick else max(8, int(max_tokens * args.scale))
        ids = model.tokenizer.encode(prompt, add_bos=True)
        plain = run_ours(model, ids, stop, max_tokens, False)
        ours = run_ours_spec(model, ids, stop, max_tokens, cost)
        row: dict[str, Any] = {
            "prompt_tokens": len(ids), "tokens": plain["tokens"],
            "plain_tok_s": round(plain["decode_tok_s"], 2),
            "speculative_tok_s": round(ours["decode_tok_s"], 2),
            "speedup_vs_plain": round(ours["decode_tok_s"] / plain["decode_tok_s"], 3),
            "identical_to_plain": ours["ids"] == plain["ids"],
            **{k: ours[k] for k in ("drafted", "accepted", "verify_steps", "plain_steps",
                                    "tokens_per_verify_step")},
        }
        if llm is not None:
            theirs = run_llama(llm, ids, stop, max_tokens)
            row["llamacpp_lookup_tok_s"] = round(theirs["decode_tok_s"], 2)
            row["llamacpp_tokens"] = theirs["tokens"]
            row["vs_llamacpp_lookup"] = round(ours["decode_tok_s"] / theirs["decode_tok_s"], 3)
        out["cases"][name] = row
        print(f"{name:10s} plain {row['plain_tok_s']:6.1f} tok/s  speculative "
              f"{row['speculative_tok_s']:6.1f} tok/s ({row['speedup_vs_plain']:.2f}x, "
              f"{ours['accepted']}/{ours['drafted']} drafts accepted, "
              f"{row['tokens_per_verify_step']} tok/verify)"
              + (f"  llama.cpp lookup {row['llamacpp_lookup_tok_s']:6.1f} tok/s "
                 f"(ours {row['vs_llamacpp_lookup']:.2f}x)" if llm is not None else "")
              + ("" if row["identical_to_plain"] else "  OUTPUT DIFFERS"))
        save()

    if "completions" in wanted:
        bench_completions(model, text, args.completions, cost, llm, out)
    c = out["cases"]
    speedups = [c[k]["speedup_vs_plain"] for k in ("refactor", "docstring", "chat") if k in c]
    if "completions" in c:
        speedups.append(1.0 / c["completions"]["p50_vs_plain"])
        out["completion_first_line_p50_vs_plain"] = c["completions"]["p50_vs_plain"]
    if "refactor" in c:
        out["refactor_speedup_vs_plain"] = c["refactor"]["speedup_vs_plain"]
        out["refactor_vs_llamacpp_lookup"] = c["refactor"].get("vs_llamacpp_lookup")
    out["min_speedup_vs_plain"] = round(min(speedups), 3) if speedups else None
    out["forward_ms_by_rows"] = cost.snapshot()  # the per-verify cost (1 row = a decode step)
    out["load_average_end"] = os.getloadavg()[0]
    print("forward ms by rows (1 = plain decode step):", out["forward_ms_by_rows"])
    print(f"refactor {out.get('refactor_speedup_vs_plain')}x plain, "
          f"{out.get('refactor_vs_llamacpp_lookup')}x llama.cpp lookup; completion p50 "
          f"{out.get('completion_first_line_p50_vs_plain')}x plain; min speed-up "
          f"{out['min_speedup_vs_plain']}x")
    save()
    return 0


def bench_completions(model: Any, text: str, n: int, cost: Any, llm: Any,
                      out: dict[str, Any]) -> None:
    """(c): first line at cursors through the file, the K/V of the file so far reused."""
    from gemma_lsp.context import CompletionContext
    from gemma_lsp.prompts import completion_prompt, template_for_model

    template = template_for_model(model.name)
    lat: dict[str, list[float]] = {"plain": [], "speculative": [], "llamacpp_lookup": []}
    same = 0
    kv_plain, kv_spec = model.new_kv(4096), model.new_kv(4096)
    cursors = completion_cursors(text, n)
    drafted = accepted = 0
    accept: dict[str, float] = {}
    for off in cursors:
        prompt, _ = completion_prompt(CompletionContext(prefix=text[:off],
                                                        language_id="python"), template)
        ids = model.tokenizer.encode(prompt, add_bos=True)
        a = run_ours(model, ids, ["\n"], 48, False, kv=kv_plain)
        b = run_ours_spec(model, ids, ["\n"], 48, cost, kv=kv_spec, accept=accept,
                          kind="completion")
        lat["plain"].append(a["seconds"])
        lat["speculative"].append(b["seconds"])
        drafted += b["drafted"]
        accepted += b["accepted"]
        same += a["ids"] == b["ids"]
        if llm is not None:
            lat["llamacpp_lookup"].append(run_llama(llm, ids, ["\n"], 48)["seconds"])
    p50 = {k: statistics.median(v) * 1000 for k, v in lat.items() if v}
    comp: dict[str, Any] = {
        "requests": len(cursors), "first_line_p50_ms": {k: round(v, 1) for k, v in p50.items()},
        "first_line_p90_ms": {k: round(sorted(v)[int(0.9 * len(v))] * 1000, 1)
                              for k, v in lat.items() if v},
        "p50_vs_plain": round(p50["speculative"] / p50["plain"], 3),
        "identical_to_plain": same, "drafted": drafted, "accepted": accepted,
    }
    out["cases"]["completions"] = comp
    print(f"completions ({len(cursors)}): first line p50 plain {p50['plain']:.0f} ms, "
          f"speculative {p50['speculative']:.0f} ms ({comp['p50_vs_plain']:.2f}x)"
          + (f", llama.cpp lookup {p50['llamacpp_lookup']:.0f} ms" if llm is not None else "")
          + f"; {same}/{len(cursors)} identical, {accepted}/{drafted} drafts accepted")



if __name__ == "__main__":
    raise SystemExit(main())
