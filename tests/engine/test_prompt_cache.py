"""The radix-tree prompt cache on a tiny model: reuse is exact, budgets evict, files persist."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.kv_cache import KVCache
from engine.model import forward
from engine.prompt_cache import PromptCache, prune_saves
from tests.engine.tiny import tiny_config, tiny_weights

CFG = tiny_config(context_length=512)
W = tiny_weights(CFG)


def new_cache(budget: int = 1 << 30) -> PromptCache:
    return PromptCache(CFG.n_layers, CFG.n_kv_heads, CFG.head_dim, budget)


def run_cached(cache: PromptCache, ids: list[int]) -> tuple[np.ndarray, int]:
    """Logits after `ids` reusing the cache, then cache the prompt; returns (logits, reused)."""
    arr = np.asarray(ids, dtype=np.int64)
    kv = KVCache(CFG, len(ids))
    m = cache.lookup(arr)
    reused = cache.copy_into(m, kv, len(ids) - 1)
    out = forward(CFG, W, ids[reused:], kv)
    cache.insert(kv)
    assert out is not None
    return out, reused


def run_plain(ids: list[int]) -> np.ndarray:
    out = forward(CFG, W, ids, KVCache(CFG, len(ids)))
    assert out is not None
    return out


edits = st.lists(
    st.tuples(st.integers(0, 60), st.integers(0, 6), st.lists(st.integers(4, 96), max_size=6)),
    min_size=1, max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits)
def test_random_edits_cached_equals_uncached(seq: list[tuple[int, int, list[int]]]) -> None:
    cache = new_cache()
    doc = list(range(10, 50))
    for at, delete, insert in seq:
        at = min(at, len(doc))
        doc = doc[:at] + insert + doc[at + delete :]
        cursor = min(len(doc), at + len(insert))
        prompt = [2] + doc[:cursor]
        got, _ = run_cached(cache, prompt)
        np.testing.assert_allclose(got, run_plain(prompt), atol=1e-4)
        assert int(np.argmax(got)) == int(np.argmax(run_plain(prompt)))


def test_reuse_after_mid_document_edit_and_jump_back() -> None:
    cache = new_cache()
    doc = [2] + list(range(4, 90))
    run_cached(cache, doc)
    edited = doc[:40] + [7, 7] + doc[40:]
    _, reused = run_cached(cache, edited[:42])  # cursor right after the edit
    assert reused == 40
    _, reused = run_cached(cache, doc)  # jump back to the end of the original text
    assert reused == len(doc) - 1
    assert cache.n_nodes == 3  # shared prefix, the old tail, the edit


def test_budget_evicts_least_recently_used_unheld_leaves() -> None:
    cache = new_cache()
    a, b = [2] + [5] * 30, [2] + [6] * 30
    run_cached(cache, a)
    run_cached(cache, b)
    per_token = 2 * CFG.n_layers * CFG.n_kv_heads * CFG.head_dim * 4
    held = cache.lookup(np.asarray(a))
    cache.hold(held)
    cache.evict(budget=per_token * 40)  # room for one sequence: b is newer, but a is held
    assert cache.match(np.asarray(a)).length == len(a)
    assert cache.match(np.asarray(b)).length <= 1
    cache.release(held)
    cache.evict(budget=0)
    assert cache.nbytes == 0 and cache.n_nodes == 0


def test_a_held_node_split_by_another_insert_stays_held_then_is_released() -> None:
    """Another prompt that diverges inside a held node splits it; the held part and its new
    parent survive eviction while held, and after release nothing stays pinned (the parent
    used to inherit the hold, which no release ever took back)."""
    cache = new_cache()
    a = [2] + [5] * 30
    run_cached(cache, a)
    held = cache.lookup(np.asarray(a))
    cache.hold(held)
    run_cached(cache, [2] + [5] * 12 + [7] * 10)  # splits a's node after 13 tokens
    assert cache.n_nodes == 3
    cache.evict(budget=0)
    assert cache.match(np.asarray(a)).length == len(a)  # held: all of it stays
    cache.release(held)
    cache.evict(budget=0)
    assert cache.nbytes == 0 and cache.n_nodes == 0


def test_the_budget_bounds_the_working_kv_as_well() -> None:
    """The budget is for all K/V memory: what running requests hold outside the cache
    (`reserved`) leaves the cache that much less; a buffer counts the positions it touched."""
    per_token = 2 * CFG.n_layers * CFG.n_kv_heads * CFG.head_dim * 4
    working = KVCache(CFG, 256)
    cache = new_cache(budget=per_token * 75)
    cache.reserved = lambda: working.nbytes_touched
    a, b = [2] + [5] * 30, [2] + [6] * 30
    run_cached(cache, a)
    run_cached(cache, b)
    assert cache.nbytes == per_token * 61  # both fit: nothing works outside the cache
    forward(CFG, W, list(range(4, 44)), working, logits="none")  # a request's 40 positions
    working.truncate(0)  # cut back: its pages stay touched
    assert working.nbytes_touched == per_token * 40
    cache.evict()
    assert cache.nbytes + working.nbytes_touched <= per_token * 75
    assert cache.match(np.asarray(b)).length == len(b)  # the older one went


def test_save_load_roundtrip_and_fingerprint(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    cache = new_cache()
    doc = [2] + list(range(4, 70))
    run_cached(cache, doc)
    run_cached(cache, doc[:30] + [9, 9, 9])
    path = tmp_path / "pc.safetensors"
    cache.save(path, "fp-1")
    other = new_cache()
    assert other.load(path, "fp-1")
    assert other.n_tokens == cache.n_tokens and other.nbytes == cache.nbytes
    got, reused = run_cached(other, doc)
    assert reused == len(doc) - 1
    np.testing.assert_allclose(got, run_plain(doc), atol=1e-5)
    with caplog.at_level(logging.WARNING):
        assert not new_cache().load(path, "fp-2")
    assert "another model" in caplog.text


def test_corrupt_cache_file_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = new_cache()
    run_cached(cache, [2] + list(range(4, 40)))
    path = tmp_path / "pc.safetensors"
    cache.save(path, "fp")
    path.write_bytes(path.read_bytes()[:100])
    fresh = new_cache()
    with caplog.at_level(logging.WARNING):
        assert not fresh.load(path, "fp")
    assert "corrupt" in caplog.text and fresh.n_nodes == 0
    assert not fresh.load(tmp_path / "missing.safetensors", "fp")


def _saved(tmp_path: Path, doc: list[int], name: str = "pc.safetensors") -> tuple[Path, int]:
    cache = new_cache()
    run_cached(cache, doc)
    path = tmp_path / name
    cache.save(path, "fp")
    return path, cache.n_tokens


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_a_save_is_one_private_file_and_leaves_no_temp(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path, _ = _saved(tmp_path / "dir", [2] + list(range(4, 40)))
    finally:
        os.umask(old)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_one_percent_of_flipped_bytes_is_rejected(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    path, _ = _saved(tmp_path, [2] + list(range(4, 90)))
    raw = bytearray(path.read_bytes())
    start = _data_start(path)
    rng = np.random.default_rng(0)
    for i in rng.choice(np.arange(start, len(raw)), size=(len(raw) - start) // 100):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    fresh = new_cache()
    with caplog.at_level(logging.WARNING):
        assert not fresh.load(path, "fp")
    assert "checksum" in caplog.text and fresh.n_nodes == 0


def test_one_flipped_bit_in_the_tree_or_the_kv_is_rejected(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path, [2] + list(range(4, 40)))
    good = path.read_bytes()
    start = _data_start(path)
    for where in (start + 3, start + 100, len(good) - 5):  # parents/tokens, K/V, the last V
        raw = bytearray(good)
        raw[where] ^= 0x10
        path.write_bytes(bytes(raw))
        assert not new_cache().load(path, "fp"), where
    path.write_bytes(good)
    assert new_cache().load(path, "fp")


def test_the_index_of_one_save_cannot_meet_the_data_of_another(tmp_path: Path) -> None:
    """What a kill between the old format's two renames produced: one save's index (here its
    header: the tree layout and checksums) with another save's data of the same size."""
    a, _ = _saved(tmp_path, [2] + list(range(4, 40)), "a.safetensors")
    b, _ = _saved(tmp_path, [2] + list(range(50, 86)), "b.safetensors")
    ha, hb = _data_start(a), _data_start(b)
    assert a.stat().st_size - ha == b.stat().st_size - hb
    mixed = tmp_path / "mixed.safetensors"
    mixed.write_bytes(a.read_bytes()[:ha] + b.read_bytes()[hb:])
    assert not new_cache().load(mixed, "fp")
    assert new_cache().load(a, "fp") and new_cache().load(b, "fp")


def test_an_empty_cache_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    new_cache().save(path, "fp")
    fresh = new_cache()
    assert fresh.load(path, "fp") and fresh.n_nodes == 0


def test_stale_temps_are_removed_and_the_directory_is_bounded(tmp_path: Path) -> None:
    d = tmp_path / "prompt-cache"
    keep, _ = _saved(d, [2] + list(range(4, 40)), "current.safetensors")
    others = []
    for i, name in enumerate(["old1.safetensors", "old2.safetensors", "old3.safetensors"]):
        p, _ = _saved(d, [2, 4 + i], name)
        os.utime(p, (1000 + i, 1000 + i))
        others.append(p)
    (d / "current.safetensors.index").write_bytes(b"format 1 index")
    dead_pid = (1 << 22) + 1  # above the kernel's largest pid_max: never a live process
    stale = d / f".current.safetensors.{dead_pid}.0123abcd.tmp"
    stale.write_bytes(b"x" * 1000)
    mine = d / f".current.safetensors.{os.getpid()}.0123abcd.tmp"  # being written: kept
    mine.write_bytes(b"x")
    legacy = [d / ".cache-abc.tmp", d / ".index-def.tmp"]
    for p in legacy:
        p.write_bytes(b"")
        os.utime(p, (1000, 1000))
    removed = prune_saves(d, keep)
    assert stale in removed and all(p in removed for p in legacy)
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [keep.name, "old3.safetensors", mine.name])
