"""The explanation document the editor opens holds the user's code: private, and bounded."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gemma_lsp.commands import KEEP_EXPLANATIONS, write_private_explanation


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_written_0600_in_a_0700_directory_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        out = write_private_explanation("def f(): pass  # secret", tmp_path / "expl")
    finally:
        os.umask(old)
    assert out is not None and out.read_text() == "def f(): pass  # secret\n"
    assert mode(out) == 0o600 and mode(out.parent) == 0o700


def test_the_default_is_in_the_private_runtime_dir(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMMA_LSP_RUNTIME_DIR", str(tmp_path / "run"))
    out = write_private_explanation("text")
    assert out is not None and out.parent == tmp_path / "run" / "explanations"
    assert mode(tmp_path / "run") == 0o700


def test_old_ones_are_removed_and_a_shared_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "expl"
    for i in range(KEEP_EXPLANATIONS + 5):
        write_private_explanation(f"n{i}", d)
    assert len(list(d.iterdir())) == KEEP_EXPLANATIONS
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    assert write_private_explanation("code", shared) is None
    assert list(shared.iterdir()) == []
