#!/usr/bin/env python3
"""Constrained vs unconstrained decoding on the same request: decode tok/s and the grammar
mask's own cost per token (llguidance mask + applying it to the 262k logits).

The request is a chat prompt asking for a JSON object; the constrained run decodes under the
grammar of a JSON Schema (as `response_format: json_schema` does), the unconstrained run
decodes the same prompt for the same number of tokens (end tokens ignored). Tokens the grammar
forces are evaluated together in one forward pass (fast-forward); the run without it shows the
mask's cost alone. Medians of
--repeat runs, one process, BLAS pinned to --threads. Prints a table and writes JSON (--json).
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

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "languages": {"type": "array", "items": {"enum": ["python", "rust", "go", "c"]},
                  "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                 "zip": {"type": "string", "maxLength": 10}},
                "required": ["city"], "additionalProperties": False}},
    "required": ["name", "age", "languages", "address"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Describe a programmer as a JSON object with name, age, "
             "languages and address."}]


class _TimedMask:
    """Wraps a TokenMask to time apply() + advance(), the grammar's per-token cost on the
    decode path (a mask computed ahead is waited for in apply)."""

    def __init__(self, mask: Any, spent: list[float]) -> None:
        self.mask, self.spent = mask, spent

    def apply(self, logits: Any) -> Any:
        t = time.perf_counter()
        out = self.mask.apply(logits)
        self.spent.append(time.perf_counter() - t)
        return out

    def advance(self, tid: int) -> None:
        t = time.perf_counter()
        self.mask.advance(tid)
        self.spent[-1] += time.perf_counter() - t

    def forced_tokens(self) -> list[int]:
        return list(self.mask.forced_tokens())

    def prefetch(self) -> None:
        self.mask.prefetch()

    @property
    def complete(self) -> bool:
        return bool(self.mask.complete)


def run(model: Any, ids: list[int], grammar: str, n: int, ff: bool = True
        ) -> tuple[float, int, list[float], str]:
    """(decode tok/s, tokens, mask seconds per token, text) of one greedy generation."""
    from engine.generate import GenerateOptions, TokenStream, decode_steps, prefill

    opts = GenerateOptions(max_tokens=n, grammar=grammar,
                           stop_ids=None if grammar else frozenset())
    stream = TokenStream(model, opts, n)
    spent: list[float] = []
    if stream.mask is not None:
        stream.mask = _TimedMask(stream.mask, spent)  # type: ignore[assignment]
    kv = model.new_kv(len(ids) + n + 1)
    logits = prefill(model, kv, ids)
    t0 = time.perf_counter()
    while True:
        step = stream.step(logits)
        if step is None:
            break
        steps = [step, *(stream.forced() if ff else [])]
        if stream.done:
            break
        logits = decode_steps(model, kv, [s.token_id for s in steps])
    dt = time.perf_counter() - t0
    stream.finish()
    count = len(stream.ids)
    return (count - 1) / dt, count, spent, "".join(stream.text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from engine import grammar as G
    from engine.http_api import chat_prompt
    from engine.runtime import Model, pin_blas_threads

    blas, threads = pin_blas_threads(args.threads)
    model = Model.load()
    model.build_kernels(threads)  # as the daemon does once it serves
    t = time.perf_counter()
    G.ll_tokenizer(model.tokenizer)
    build_s = time.perf_counter() - t
    grammar = G.json_schema_grammar(SCHEMA)
    ids = model.tokenizer.encode(chat_prompt(MESSAGES))
    print(f"model {model.name}, vocab {model.tokenizer.vocab_size}, BLAS {blas}, "
          f"{threads} threads; llguidance tokenizer built in {build_s:.2f} s (once per engine)",
          flush=True)

    cons, slow, unc, masks, sync, tokens = [], [], [], [], [], 0
    text = ""
    for _ in range(args.repeat):
        tok_s, tokens, spent, text = run(model, ids, grammar, 160)
        cons.append(tok_s)
        masks.extend(spent)
        tok_s, _, spent, _ = run(model, ids, grammar, 160, ff=False)
        slow.append(tok_s)
        sync.extend(spent)  # no forced tokens taken, so no mask computed ahead either
        unc.append(run(model, ids, "", tokens)[0])
    json.loads(text)  # the constrained reply is valid JSON
    out = {
        "model": model.name, "vocab": model.tokenizer.vocab_size, "threads": threads,
        "blas": blas, "tokens": tokens, "repeat": args.repeat,
        "llguidance_tokenizer_build_s": round(build_s, 3),
        "unconstrained_decode_tok_s": round(statistics.median(unc), 2),
        "constrained_decode_tok_s": round(statistics.median(cons), 2),
        "constrained_no_fast_forward_tok_s": round(statistics.median(slow), 2),
        "mask_ms_per_token_median": round(statistics.median(masks) * 1000, 3),
        "mask_ms_per_token_p90": round(sorted(masks)[int(0.9 * (len(masks) - 1))] * 1000, 3),
        "mask_ms_per_token_max": round(max(masks) * 1000, 3),
        "mask_ms_per_token_mean": round(statistics.mean(masks) * 1000, 3),
        "mask_sync_ms_per_token_median": round(statistics.median(sync) * 1000, 3),
        "mask_sync_ms_per_token_p90": round(sorted(sync)[int(0.9 * (len(sync) - 1))] * 1000, 3),
        "mask_sync_ms_per_token_mean": round(statistics.mean(sync) * 1000, 3),
        "reply": text,
    }
    print(f"{'':28}{'tok/s':>10}")
    print(f"{'unconstrained decode':28}{out['unconstrained_decode_tok_s']:>10}")
    print(f"{'constrained (json_schema)':28}{out['constrained_decode_tok_s']:>10}")
    print(f"{'  same, no fast-forward':28}{out['constrained_no_fast_forward_tok_s']:>10}")
    print(f"mask on the decode path per token (computed ahead during the forward pass): "
          f"median {out['mask_ms_per_token_median']} ms, mean {out['mask_ms_per_token_mean']} "
          f"ms, p90 {out['mask_ms_per_token_p90']} ms, max {out['mask_ms_per_token_max']} ms "
          f"over {len(masks)} tokens")
    print(f"mask computed in line (the run without fast-forward): median "
          f"{out['mask_sync_ms_per_token_median']} ms, mean {out['mask_sync_ms_per_token_mean']}"
          f" ms, p90 {out['mask_sync_ms_per_token_p90']} ms over {len(sync)} tokens")
    print(f"reply ({tokens} tokens): {text}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
