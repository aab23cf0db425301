"""Emacs 28 with eglot 1.9 (Debian's elpa-eglot), the real server, engine and shipped model:
completion-at-point offers the suggestion and accepting it applies the server's text edit; the
docstring code action (a command for eglot, which has no codeAction/resolve) edits the buffer.
The README's eglot snippet, tried for real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _has_eglot(emacs: str) -> bool:
    probe = subprocess.run(
        [emacs, "--batch", "--eval", "(progn (package-initialize) (require 'eglot))"],
        capture_output=True, timeout=60)
    return probe.returncode == 0


def test_completion_and_docstring_action_in_eglot(tmp_path: Path) -> None:
    emacs = shutil.which("emacs")
    if emacs is None or not _has_eglot(emacs):
        pytest.skip("emacs with eglot not installed (scripts/setup_editor_tests.sh: apt "
                    "emacs-nox elpa-eglot)")
    src = tmp_path / "account.py"
    src.write_text((ROOT / "examples" / "sample.py").read_text())
    run = Path(tempfile.mkdtemp(prefix="ge-", dir="/tmp"))
    try:
        out = subprocess.run(
            [emacs, "--batch", "-l", str(ROOT / "tests" / "editors" / "eglot_e2e.el"), str(src)],
            env=dict(os.environ, GEMMA_LSP_PYTHON=sys.executable, GEMMA_LSP_RUNTIME_DIR=str(run)),
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        subprocess.run(["pkill", "-f", str(run)], check=False)
        shutil.rmtree(run, ignore_errors=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "error" not in res, (res, out.stderr[-2000:])
    assert res["connected"] is True
    original = (ROOT / "examples" / "sample.py").read_text()
    # the suggestion is offered under the word being typed and its edit is applied
    assert res["candidates"] and res["candidates"][0].startswith("amount")
    typed = original + "\n        if amount"
    assert res["completed_text"].startswith(typed) and len(res["completed_text"]) > len(typed)
    assert "Add docstring with Gemma" in res["actions"]
    assert '"""' in res["docstring_text"] and '"""' not in res["completed_text"]
    assert src.read_text() == res["docstring_text"]  # saved: the edit landed in the buffer
