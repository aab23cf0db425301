"""engine.integrity: private modes whatever the umask, atomic writes, checksums that notice."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from engine.integrity import atomic_path, atomic_write, checksum, private_dir, verify


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_dirs_and_files_are_private_under_umask_0(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        d = private_dir(tmp_path / "a" / "b")
        atomic_write(d / "f.json", "{}")
        loose = tmp_path / "loose"
        loose.mkdir(mode=0o777)
        private_dir(loose)  # a directory the user named is left as it is
        assert mode(loose) == 0o777
        private_dir(loose, tighten=True)  # one of our own cache dirs is tightened
    finally:
        os.umask(old)
    assert mode(tmp_path / "a") == mode(d) == mode(loose) == 0o700
    assert mode(d / "f.json") == 0o600 and (d / "f.json").read_text() == "{}"
    assert sorted(p.name for p in d.iterdir()) == ["f.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "t.bin"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


def test_checksum_notices_one_flipped_bit_anywhere() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(300_001).astype(np.float32)  # > 1 MiB, an odd tail
    base = checksum(a)
    raw = a.view(np.uint8)
    for pos in (0, 7, 1 << 20, raw.size - 1):
        b = raw.copy()
        b[pos] ^= 1
        assert checksum(b.view(np.float32)) != base, pos
    assert checksum(a[:-1]) != base  # the length counts
    assert checksum(a.copy()) == base
    with pytest.raises(ValueError, match="w fails its checksum"):
        verify({"w": a[::-1].copy()}, {"w": base}, "here")


def test_our_safetensors_writer_is_read_back_by_the_library(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from engine.integrity import write_safetensors

    t = {"a": np.arange(7, dtype=np.float32).reshape(7, 1), "b": np.array([3, -1], np.int64),
         "empty": np.zeros((2, 0, 3), np.float32)}
    write_safetensors(tmp_path / "x.safetensors", t, {"k": "v"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert sorted(back) == sorted(t)
    for name, a in t.items():
        np.testing.assert_array_equal(back[name], a)
