#!/usr/bin/env python3
"""How much each `--quant` type costs in quality: the logprob error of every weight type a
Hugging Face checkpoint can be quantized to, against the same checkpoint in f32.

Two models: the shipped Gemma 3 270M exported to HF layout (its GGUF values in fp32),
teacher-forced along the reference texts (tests/data: 10 prompts, 294 positions); and a tiny
random Gemma 4 built with transformers (the `ref` extra; skipped without it), 600 random
tokens. Per type: max and mean |d logprob| over the f32 top-5, and top-1 agreement. Prints a
table and writes JSON (--json). Runs in a scratch cache directory (nothing of the user's is
touched); ~2 minutes here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.sampling import log_softmax  # noqa: E402


def _compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """ref, got: (T, V) logprobs. Errors over ref's top 5 per row."""
    top = np.argsort(ref, axis=-1)[:, -5:]  # (T, 5)
    d = np.abs(np.take_along_axis(got, top, -1) - np.take_along_axis(ref, top, -1))
    return {"max_dlogprob": float(d.max()), "mean_dlogprob": float(d.mean()),
            "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def _teacher_forced(model: Any, cases: list[dict[str, Any]]) -> np.ndarray:
    from engine.generate import prefill
    from engine.kv_cache import KVCache
    from engine.model import forward

    rows = []
    for case in cases:
        ids = case["prompt_token_ids"] + case["greedy_token_ids"][:-1]
        n = len(case["greedy_token_ids"])
        kv = KVCache(model.config, len(ids))
        prefill(model, kv, ids[:-n])
        logits = forward(model.config, model.weights, ids[-n:], kv, logits="all")
        rows.append(log_softmax(logits[:, : model.tokenizer.vocab_size]))
    return np.concatenate(rows)


def shipped(quants: list[str], work: Path) -> dict[str, Any]:
    from engine import hf
    from engine.runtime import Model
    from tests.conftest import reference_cases

    cases = reference_cases()
    d = hf.export(Model.load(), work / "gemma-3-270m-hf")
    ref = _teacher_forced(Model.load(d, quant="f32"), cases)
    out: dict[str, Any] = {}
    for q in quants:
        m = Model.load(d, quant=q)
        out[q] = _compare(ref, _teacher_forced(m, cases)) | {
            "weight_bytes": m.weight_status()["weight_bytes"]}
        print(f"  shipped 270M  {q:5s} " + "  ".join(f"{k} {v:.4g}" for k, v in out[q].items()),
              flush=True)
    return out


def tiny_gemma4(quants: list[str], work: Path) -> dict[str, Any] | None:
    try:
        import torch
        import transformers as tf
    except ImportError:
        print("  (no torch/transformers: the `ref` extra; tiny Gemma 4 skipped)")
        return None
    from engine.kv_cache import KVCache
    from engine.model import forward
    from engine.runtime import Model
    from tests.engine.test_hf import _tiny_tokenizer_json
    from tests.engine.tiny import tiny_gemma4_text_config

    torch.manual_seed(0)
    config = tiny_gemma4_text_config(tf)
    model = tf.Gemma4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.04)
    d = work / "tiny-gemma4"
    model.save_pretrained(d)
    _tiny_tokenizer_json(d / "tokenizer.json", 300)
    ids = torch.randint(4, 300, (1, 600), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = log_softmax(model(ids, output_hidden_states=True).logits[0].numpy())
    out: dict[str, Any] = {}
    for q in quants:
        m = Model.load(d, quant=q)
        got = forward(m.config, m.weights, ids[0].tolist(), KVCache(m.config, 600),
                      logits="all")
        out[q] = _compare(ref, log_softmax(got))
        print(f"  tiny Gemma 4  {q:5s} " + "  ".join(f"{k} {v:.4g}" for k, v in out[q].items()),
              flush=True)
    return out


def main() -> int:
    from engine.protocol import QUANT_CHOICES
    from engine.runtime import pin_blas_threads

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    pin_blas_threads(args.threads)
    quants = list(QUANT_CHOICES)
    with tempfile.TemporaryDirectory(prefix="gemma-lsp-quant-") as tmp:
        work = Path(tmp)
        os.environ["GEMMA_LSP_CACHE"] = str(work / "cache")  # read when a model loads
        # the embedded model's own copy is built in the scratch cache too (once, ~30 s)
        res = {"shipped_270m": shipped(quants, work), "tiny_gemma4": tiny_gemma4(quants, work)}
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
