"""Model files: GGUF -> engine-ready copy, memory-mapped reload, rebuilds, clear errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from engine.config import ModelConfig
from engine.weights import load_model_files, mmap_safetensors
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
