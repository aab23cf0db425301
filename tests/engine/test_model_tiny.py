"""Forward pass on a tiny random model: against a naive reference, and two paths that agree."""

from __future__ import annotations

import numpy as np
import pytest

from engine.kv_cache import KVCache
from engine.model import Cancelled, forward, gelu_tanh_mul
from tests.engine.tiny import naive_forward, tiny_config, tiny_tensors, tiny_weights


def test_matches_naive_reference_across_the_window() -> None:
    cfg = tiny_config()
    ids = list(np.random.default_rng(1).integers(0, cfg.vocab_size, 3 * cfg.sliding_window + 2))
    want = naive_forward(cfg, tiny_tensors(cfg), ids)
    got = forward(cfg, tiny_weights(cfg), ids, KVCache(cfg, len(ids)), logits="all")
    assert got is not None
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 8, 9])
def test_chunked_prefill_equals_one_shot(chunk: int) -> None:
    cfg = tiny_config()
    w = tiny_weights(cfg)
    ids = list(np.random.default_rng(2).integers(0, cfg.vocab_size, 30))
    one = forward(cfg, w, ids, KVCache(cfg, 30), logits="all")
    kv = KVCache(cfg, 30)
    parts = []
    for s in range(0, len(ids), chunk):
        out = forward(cfg, w, ids[s : s + chunk], kv, logits="all")
        assert out is not None
        parts.append(out)
    np.testing.assert_allclose(np.concatenate(parts), one, atol=1e-5)


def test_query_blocks_equal_unblocked(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.model as m

    cfg = tiny_config()
    w = tiny_weights(cfg)
    ids = list(np.random.default_rng(3).integers(0, cfg.vocab_size, 40))
    monkeypatch.setattr(m, "ATTN_QUERY_BLOCK", 7)
    blocked = forward(cfg, w, ids, KVCache(cfg, 40), logits="all")
    monkeypatch.setattr(m, "ATTN_QUERY_BLOCK", 1000)
    whole = forward(cfg, w, ids, KVCache(cfg, 40), logits="all")
    np.testing.assert_allclose(blocked, whole, atol=1e-5)


def test_truncate_and_rerun_gives_same_logits() -> None:
    cfg = tiny_config()
    w = tiny_weights(cfg)
    ids = list(np.random.default_rng(4).integers(0, cfg.vocab_size, 20))
    kv = KVCache(cfg, 40)
    first = forward(cfg, w, ids, kv, logits="all")
    forward(cfg, w, [5, 6, 7], kv)
    kv.truncate(12)
    again = forward(cfg, w, ids[12:], kv, logits="all")
    assert first is not None and again is not None
    np.testing.assert_allclose(again, first[12:], atol=1e-5)


def test_cancel_between_layers_keeps_cache_length() -> None:
    cfg = tiny_config()
    w = tiny_weights(cfg)
    kv = KVCache(cfg, 20)
    forward(cfg, w, [1, 2, 3], kv)
    calls = iter([False, False, True])
    with pytest.raises(Cancelled):
        forward(cfg, w, [4, 5], kv, should_stop=lambda: next(calls))
    assert kv.length == 3
    # the cache still continues correctly after the cancelled chunk
    out = forward(cfg, w, [4, 5], kv, logits="all")
    ref = forward(cfg, w, [1, 2, 3, 4, 5], KVCache(cfg, 20), logits="all")
    assert out is not None and ref is not None
    np.testing.assert_allclose(out, ref[3:], atol=1e-5)


def test_gelu_matches_tanh_formula() -> None:
    x = np.linspace(-30, 30, 2001, dtype=np.float32)
    up = np.ones_like(x)
    want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x.astype(np.float64) ** 3)))
    out = np.empty_like(x)
    gelu_tanh_mul(out, x, up)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_capacity_and_softcap() -> None:
    cfg = tiny_config(final_logit_softcap=2.0)
    with pytest.raises(ValueError, match="capacity"):
        KVCache(cfg, cfg.context_length + 1)
    out = forward(cfg, tiny_weights(cfg), [1, 2, 3], KVCache(cfg, 3))
    assert out is not None and np.abs(out).max() <= 2.0


def test_a_tree_chunk_equals_each_branch_run_alone() -> None:
    """Rows fed as a tree (forward(parents=...)) give what each branch gives as a plain
    sequence after the same prefix, past the sliding window too; siblings do not mix."""
    cfg = tiny_config()  # window 8: the prefix and branches cross it
    w = tiny_weights(cfg)
    prefix = [2, *range(10, 22)]  # 13 tokens
    # a chain of 3, then two branches of 4 and 9 from its second row, and one from the prefix
    fed = [30, 31, 32, 40, 41, 42, 43, 50, 51, 52, 53, 54, 55, 56, 57, 58, 60, 61]
    parents = [-1, 0, 1, 1, 3, 4, 5, 1, 7, 8, 9, 10, 11, 12, 13, 14, -1, 16]
    kv = KVCache(cfg, 64)
    forward(cfg, w, prefix, kv, logits="none")
    tree = forward(cfg, w, fed, kv, logits="all", parents=parents)
    assert tree is not None and kv.length == len(prefix) + len(fed)
    for row in range(len(fed)):
        path = []
        r = row
        while r >= 0:
            path.append(fed[r])
            r = parents[r]
        alone = KVCache(cfg, 64)
        forward(cfg, w, prefix, alone, logits="none")
        want = forward(cfg, w, path[::-1], alone, logits="last")
        assert want is not None
        np.testing.assert_allclose(tree[row], want, rtol=1e-4, atol=1e-4)
    kv.truncate(len(prefix))  # cut back, the prefix is intact
    again = forward(cfg, w, [30], kv, logits="last")
    np.testing.assert_allclose(again, tree[0], rtol=1e-5, atol=1e-5)
