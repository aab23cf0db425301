"""Files the engine writes: private directories, atomic writes, stale temp files, checksums.

Every directory the engine creates is 0700 and every file 0600, whatever the umask. A file is
written as a temp file beside its target (named after the writing process, so a later start
can tell an abandoned one from one still being written), flushed, fsynced, renamed over the
target, and the directory fsynced: a reader sees the old file or the new one, never a part.

`checksum` is the content check of big arrays (the engine-ready weights, the persisted prompt
cache): per 1 MiB block the 64-bit wrapping sum of its words, and a blake2b over those sums, the
tail and the length. It runs at memory speed (numpy) where crc32 or sha256 run at 0.4-0.9 GB/s
here, so a warm start can check every byte of the model. Any single changed word changes its
block's sum; it does not detect words swapped inside one block (not how disks corrupt data).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CHECKSUM_ALGO = "u64sum-1MiB+blake2b"
_BLOCK_WORDS = (1 << 20) // 8
_TEMP = re.compile(r"^\..*\.(\d+)\.[0-9a-f]{8}\.tmp$")  # .NAME.PID.RANDOM.tmp (ours)
# what earlier versions (and the safetensors library's writer) left behind when killed: no
# writer pid in the name
_LEGACY_TEMP = re.compile(r"^\.(cache-|index-|build-).*$|^.*\.part$|^\.tmp[A-Za-z0-9]{6}$")
LEGACY_MIN_AGE_S = 600.0


# ----------------------------------------------------------------------------- permissions


def private_dir(path: Path, tighten: bool = False) -> Path:
    """Create `path` (and missing parents) as 0700 directories; with `tighten`, also remove
    group/other access from an existing one of ours (our own cache dirs, made by earlier
    versions; never a directory the user named). Returns `path`."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        os.chmod(d, 0o700)  # mkdir's mode is masked by the umask, never widened: set it
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path}: not a directory")
    if tighten and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(target: Path) -> Path:
    """A fresh temp path beside `target` naming this process (see `remove_stale_temps`)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a private (0600) temp path to write `target` into; on success it is fsynced and
    renamed over `target`, on failure removed."""
    private_dir(target.parent)
    tmp = temp_name(target)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        yield tmp
        os.chmod(tmp, 0o600)  # a writer may have replaced the file
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write(target: Path, data: bytes | str) -> None:
    """Write `data` to `target` atomically (0600)."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(raw)


def private_tree(root: Path) -> None:
    """Make every file under `root` 0600 and every directory 0700 (after a library wrote it)."""
    for dirpath, dirs, files in os.walk(root):
        os.chmod(dirpath, 0o700)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o600)
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o700)


# ----------------------------------------------------------------------------- stale temps


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path, now: float | None = None) -> list[Path]:
    """Delete temp files and build dirs in `directory` whose writer is gone: ours when the pid
    in the name is not running, earlier versions' when older than LEGACY_MIN_AGE_S."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time() if now is None else now
    for e in entries:
        m = _TEMP.match(e.name)
        if m:
            stale = int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))
        elif _LEGACY_TEMP.match(e.name):
            try:
                stale = now - e.stat(follow_symlinks=False).st_mtime > LEGACY_MIN_AGE_S
            except OSError:
                continue
        else:
            continue
        if not stale:
            continue
        path = Path(e.path)
        try:
            if e.is_dir(follow_symlinks=False):
                import shutil

                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as err:
            log.warning("cannot remove the stale temp file %s: %s", path, err)
            continue
        log.warning("removed %s, left by an interrupted write", path)
        removed.append(path)
    return removed


# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
              np.dtype(np.int64): "I64", np.dtype(np.uint16): "BF16",
              np.dtype(np.uint8): "U8"}  # U8: quantized blocks (engine.kernels.blocks)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str]) -> None:
    """Write a safetensors file straight into `path` (no library temp file beside it, no
    second copy in memory): 8-byte header length, JSON header, tensor bytes in order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    arrays = []
    for name, a in tensors.items():
        arr = np.ascontiguousarray(a)
        if arr.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name}: cannot store dtype {arr.dtype}")
        header[name] = {"dtype": _ST_DTYPES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in arrays:
            if arr.nbytes:
                f.write(arr.reshape(-1).view(np.uint8).data)


# ----------------------------------------------------------------------------- checksums


def checksum(a: np.ndarray) -> str:
    """Content digest of an array's bytes (see the module docstring)."""
    buf = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    n = buf.size
    words = buf[: n - n % 8].view(np.uint64)
    full = words.size - words.size % _BLOCK_WORDS
    sums = words[:full].reshape(-1, _BLOCK_WORDS).sum(axis=1, dtype=np.uint64)
    rest = words[full:].sum(dtype=np.uint64)
    h = hashlib.blake2b(digest_size=16)
    h.update(sums.tobytes())
    h.update(np.uint64(rest).tobytes())
    h.update(buf[n - n % 8 :].tobytes())
    h.update(n.to_bytes(8, "little"))
    return h.hexdigest()


def checksums(tensors: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: checksum(a) for name, a in tensors.items()}


def verify(tensors: dict[str, np.ndarray], want: dict[str, str], where: object,
           on_progress: Callable[[int, int], None] | None = None) -> None:
    """ValueError naming `where` and the first tensor whose content differs from `want`."""
    missing = sorted(set(want) ^ set(tensors))
    if missing:
        raise ValueError(f"{where}: checksums and tensors do not match ({missing[:3]})")
    for i, (name, digest) in enumerate(want.items()):
        if checksum(tensors[name]) != digest:
            raise ValueError(f"{where}: tensor {name} fails its checksum (the file is corrupt)")
        if on_progress is not None:
            on_progress(i + 1, len(want))
