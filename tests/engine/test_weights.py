"""Model files: GGUF -> engine-ready copy, memory-mapped reload, rebuilds, clear errors."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from engine.config import ModelConfig
from engine.weights import load_model_files, mmap_safetensors, release_mapped_pages
from tests.engine.tiny import tiny_config, tiny_tensors, tiny_vocab, write_tiny_gguf

CFG = tiny_config(vocab_size=len(tiny_vocab()[0]), sliding_layers=(True,) * 5 + (False,),
                  n_layers=6, context_length=128)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GEMMA_LSP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def gguf_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(str(path), CFG, tiny_tensors(CFG))
    return path


def test_gguf_roundtrip_through_engine_ready_copy(cache: Path, gguf_path: Path) -> None:
    files = load_model_files(gguf_path)
    assert files.config.n_layers == 6 and files.config.sliding_layers == CFG.sliding_layers
    assert files.config.rope_base_local == 10_000.0
    want = tiny_tensors(CFG)
    np.testing.assert_array_equal(files.tensors["tok_embd_t"], want["tok_embd"].T)
    np.testing.assert_array_equal(
        files.tensors["layers.2.wqkv"],
        np.concatenate([want["layers.2.wq"], want["layers.2.wk"], want["layers.2.wv"]]),
    )
    # the second load memory-maps the same copy instead of rebuilding
    ready = files.ready_dir
    stamp = (ready / "model.safetensors").stat().st_mtime_ns
    again = load_model_files(gguf_path)
    assert again.ready_dir == ready
    assert (ready / "model.safetensors").stat().st_mtime_ns == stamp
    assert not again.tensors["final_norm"].flags.writeable  # a read-only map, not a copy


def test_corrupt_copy_is_rebuilt_with_warning(
    cache: Path, gguf_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ready = load_model_files(gguf_path).ready_dir
    st = ready / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        files = load_model_files(gguf_path)
    assert "rebuilding" in caplog.text
    assert files.tensors["tok_embd_t"].shape == (CFG.d_model, CFG.vocab_size)


def test_stale_copy_is_rebuilt(cache: Path, gguf_path: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    ready = load_model_files(gguf_path).ready_dir
    info = json.loads((ready / "engine.json").read_text())
    info["source_sha256"] = "0" * 64
    (ready / "engine.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        load_model_files(gguf_path)
    assert "stale" in caplog.text


def test_missing_and_corrupt_model_files_name_the_path(cache: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ValueError, match="nope.gguf"):
        load_model_files(missing)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00\xff" * 500)
    with pytest.raises(ValueError, match="junk.gguf"):
        load_model_files(junk)
    with pytest.raises(ValueError, match="directory"):
        load_model_files(tmp_path)


def test_mmap_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="bad.safetensors"):
        mmap_safetensors(bad)


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(ValueError, match="llama"):
        ModelConfig.from_gguf_metadata({"general.architecture": "llama"}, vocab_size=10)


def test_4kb_flipped_in_the_engine_ready_copy_is_rebuilt(
    cache: Path, gguf_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = load_model_files(gguf_path)
    want = np.array(good.tensors["layers.3.w_gate_up"])
    st = good.ready_dir / "model.safetensors"
    raw = bytearray(st.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 4096] = bytes(b ^ 0xFF for b in raw[mid:mid + 4096])
    del good
    st.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        files = load_model_files(gguf_path)
    assert "fails its checksum" in caplog.text and "rebuilding" in caplog.text
    np.testing.assert_array_equal(files.tensors["layers.3.w_gate_up"], want)


def test_a_copy_without_checksums_is_rebuilt(cache: Path, gguf_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    ready = load_model_files(gguf_path).ready_dir
    info = json.loads((ready / "engine.json").read_text())
    del info["checksums"]
    (ready / "engine.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        load_model_files(gguf_path)
    assert "no checksums" in caplog.text
    assert "checksums" in json.loads((ready / "engine.json").read_text())


def test_the_copy_is_private_and_a_killed_build_is_cleaned_up(
    cache: Path, gguf_path: Path
) -> None:
    old = os.umask(0)
    try:
        first = load_model_files(gguf_path).ready_dir
        killed = first.parent / f".{first.name}.{(1 << 22) + 1}.deadbeef.tmp"  # no such pid
        killed.mkdir()
        (killed / "model.safetensors").write_bytes(b"\0" * 4096)
        load_model_files(gguf_path)
    finally:
        os.umask(old)
    assert not killed.exists()
    for p in [cache, *cache.rglob("*")]:
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_progress_is_reported_while_building(cache: Path, gguf_path: Path) -> None:
    seen: list[tuple[str, float | None]] = []
    load_model_files(gguf_path, progress=lambda m, f: seen.append((m, f)))
    text = " ".join(m for m, _ in seen)
    assert "sha256" in text and "repacking" in text and "writing" in text
    fractions = [f for _, f in seen if f is not None]
    assert fractions == sorted(fractions) and 0 < fractions[-1] < 1
    seen.clear()
    load_model_files(gguf_path, progress=lambda m, f: seen.append((m, f)))
    assert seen == []  # a warm load has nothing slow to report


def test_a_non_finite_gguf_tensor_is_refused(cache: Path, tmp_path: Path) -> None:
    tensors = tiny_tensors(CFG)
    tensors["layers.1.w_up"][3, 4] = np.inf
    bad = tmp_path / "inf.gguf"
    write_tiny_gguf(str(bad), CFG, tensors)
    with pytest.raises(ValueError, match="inf.gguf.*non-finite"):
        load_model_files(bad)


def test_a_flipped_embedded_gguf_is_assembled_again(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The package's sha256 is checked again before a build (the memo trusts mtime)."""
    from engine.weights import (
        _HASHED_NOW,
        EMBEDDED_MODEL_NAME,
        _checked_source,
        embedded_model_path,
        embedded_sha256,
        file_sha256,
    )

    path = embedded_model_path()  # assembled into this test's cache dir
    assert path.parent == cache / "models" and path.name == EMBEDDED_MODEL_NAME
    memo = file_sha256(path)
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(10_000_000)
        f.write(b"\xff" * 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    _HASHED_NOW.clear()  # a later start: the memo is all it knows
    assert file_sha256(path) == memo  # and the memo does not see the change
    with caplog.at_level(logging.WARNING):
        digest = _checked_source(path, memo, embedded=True, progress=lambda m, f: None)
    assert digest == embedded_sha256() == file_sha256(path, fresh=True)
    assert "assembling it again" in caplog.text


def _rss_pages() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1])


def test_released_pages_of_a_mapped_file_leave_rss_and_read_back_the_same(
        tmp_path: Path) -> None:
    import mmap

    from safetensors.numpy import save_file

    want = np.random.default_rng(0).integers(0, 255, (4096, 1024), dtype=np.uint8)  # 4 MB
    save_file({"q": want}, str(tmp_path / "w.safetensors"))
    q = mmap_safetensors(tmp_path / "w.safetensors")[0]["q"]
    assert int(q.sum()) == int(want.sum())  # every page read in
    before = _rss_pages()
    released = release_mapped_pages(q)
    assert released >= q.nbytes - 2 * mmap.PAGESIZE  # the whole pages inside the array
    assert _rss_pages() <= before - released // mmap.PAGESIZE // 2
    np.testing.assert_array_equal(q, want)  # faulted back in from the file
    # heap and anonymous (writable) memory is never released: its pages would be zeroed
    heap = want.copy()
    anon = np.frombuffer(mmap.mmap(-1, want.nbytes), dtype=np.uint8).reshape(want.shape)
    anon[:] = want
    assert release_mapped_pages(heap) == 0 and release_mapped_pages(anon) == 0
    np.testing.assert_array_equal(anon, want)
