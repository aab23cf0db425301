"""The real embedded model against llama.cpp's reference data, and two-paths-agree checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engine.generate import GenerateOptions, Step, decode_one, generate, prefill
from engine.kv_cache import KVCache
from engine.model import forward
from engine.sampling import log_softmax
from tests.conftest import assert_logits_agree, reference_cases

CASES = reference_cases()
# the shipped model's quantized weights against an fp32 forward of the same dequantized values
# (the reference's fp32 pass): int8 activations plus their residual, measured max 0.0049 nats
FP32_DLOGPROB = 0.01


def _teacher_forced_logprobs(model: Any, case: dict[str, Any]) -> np.ndarray:
    ids = case["prompt_token_ids"] + case["greedy_token_ids"][:-1]
    n = len(case["greedy_token_ids"])
    kv = KVCache(model.config, len(ids))
    prefill(model, kv, ids[:-n])  # the prompt minus its last token, in chunks
    logits = forward(model.config, model.weights, ids[-n:], kv, logits="all")
    assert logits is not None
    return np.stack([log_softmax(row[: model.tokenizer.vocab_size]) for row in logits])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_teacher_forced_matches_reference(model: Any, case: dict[str, Any]) -> None:
    lp = _teacher_forced_logprobs(model, case)
    # against llama.cpp: top-1 where its margin is clear, logprob within 0.7 nats
    pairs = zip(case["greedy_token_ids"], case["top1_top2_margin"], strict=True)
    for i, (tid, margin) in enumerate(pairs):
        if margin > 1.0:
            assert int(np.argmax(lp[i])) == tid, f"position {i}"
        ref_id, ref_lp = case["top_probs"][i][0]["id"], case["top_probs"][i][0]["logprob"]
        assert abs(lp[i, ref_id] - ref_lp) < 0.7, f"position {i}"
    # against the independent fp32 pass: same top-1 everywhere, logprobs within FP32_DLOGPROB
    for i, top5 in enumerate(case["fp32_teacher_forced_top5"]):
        assert int(np.argmax(lp[i])) == top5[0][0], f"position {i}"
        for tid, ref in top5:
            assert abs(lp[i, tid] - ref) <= FP32_DLOGPROB, f"position {i} id {tid}"


def test_greedy_generation_matches_fp32_reference(model: Any) -> None:
    case = CASES[0]
    opts = GenerateOptions(max_tokens=len(case["fp32_greedy_token_ids"]), stop_ids=frozenset())
    ids = [ev.token_id for ev in generate(model, case["prompt_token_ids"], opts)
           if isinstance(ev, Step)]
    assert ids == case["fp32_greedy_token_ids"][: len(ids)]
    assert len(ids) == len(case["fp32_greedy_token_ids"])


def test_prefill_then_decode_equals_one_shot(model: Any) -> None:
    ids = CASES[1]["prompt_token_ids"][:120]
    one = forward(model.config, model.weights, ids, KVCache(model.config, 120), logits="all")
    assert one is not None
    kv = KVCache(model.config, 120)
    prefill(model, kv, ids[:100], chunk=37)
    for j in range(100, 120):
        step = decode_one(model, kv, ids[j])
        assert_logits_agree(step, one[j])


@pytest.mark.parametrize("n", ["W-1", "W", "W+1", "3W"])
def test_sliding_window_boundary_chunked_equals_one_shot(model: Any, n: str) -> None:
    w = model.config.sliding_window
    length = {"W-1": w - 1, "W": w, "W+1": w + 1, "3W": 3 * w}[n]
    text = "".join(c["prompt"] for c in CASES) * 3
    ids = model.tokenizer.encode(text)[:length]
    assert len(ids) == length
    one = forward(model.config, model.weights, ids, KVCache(model.config, length + 4))
    kv = KVCache(model.config, length + 4)
    chunked = prefill(model, kv, ids, chunk=100)
    assert one is not None
    assert_logits_agree(chunked, one)
    # and decoding past the boundary agrees with a one-shot forward of the longer prompt
    nxt = int(np.argmax(chunked))
    step = decode_one(model, kv, nxt)
    longer = forward(model.config, model.weights, ids + [nxt], KVCache(model.config, length + 1))
    assert_logits_agree(step, longer)
