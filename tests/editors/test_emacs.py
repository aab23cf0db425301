"""eglot against the real server, engine and shipped model, in Emacs 28 with eglot 1.9 (Debian's
elpa-eglot) and Emacs 30.1 with its built-in eglot 1.17 (bookworm-backports, unpacked by
scripts/setup_editor_tests.sh): completion-at-point offers a complete suggestion and accepting
it applies the server's text edit; the docstring code action carries its command before any
resolve, answers at once and edits the buffer (workspace/applyEdit); Explain answers at once and
its text arrives later. The README's eglot snippet, tried for real."""

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
TOOLS = Path(os.environ.get("GEMMA_LSP_EDITOR_TOOLS",
                            Path.home() / ".cache" / "gemma-lsp-editors"))


def _has_eglot(emacs: str) -> bool:
    probe = subprocess.run(
        [emacs, "--batch", "--eval", "(progn (package-initialize) (require 'eglot))"],
        capture_output=True, timeout=60)
    return probe.returncode == 0


def _emacs(which: str) -> str:
    if which == "28":
        emacs = shutil.which("emacs")
        if emacs is None or not _has_eglot(emacs):
            pytest.skip("emacs with eglot not installed (scripts/setup_editor_tests.sh: apt "
                        "emacs-nox elpa-eglot)")
        return emacs
    emacs = TOOLS / "bin" / "emacs-30"
    if not emacs.exists():
        pytest.skip(f"Emacs 30 not unpacked at {emacs} (scripts/setup_editor_tests.sh fetches "
                    "it from bookworm-backports; it said why if it could not)")
    return str(emacs)


@pytest.mark.parametrize("which", ["28", "30"])
def test_completion_and_actions_in_eglot(tmp_path: Path, which: str) -> None:
    emacs = _emacs(which)
    src = tmp_path / "account.py"
    src.write_text((ROOT / "examples" / "sample.py").read_text())
    run = Path(tempfile.mkdtemp(prefix="ge-", dir="/tmp"))
    try:
        out = subprocess.run(
            [emacs, "--batch", "-l", str(ROOT / "tests" / "editors" / "eglot_e2e.el"), str(src)],
            env=dict(os.environ, GEMMA_LSP_PYTHON=sys.executable, GEMMA_LSP_RUNTIME_DIR=str(run)),
            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    finally:
        subprocess.run(["pkill", "-f", str(run)], check=False)
        shutil.rmtree(run, ignore_errors=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(res)
    assert "error" not in res, (res, out.stderr[-2000:])
    assert res["connected"] is True
    original = (ROOT / "examples" / "sample.py").read_text()
    # the suggestion is offered under the word being typed and its edit is applied
    assert res["candidates"] and res["candidates"][0].startswith("amount")
    typed = original + "\n        if amount"
    assert res["completed_text"].startswith(typed) and len(res["completed_text"]) > len(typed)
    assert "Add docstring with Gemma" in res["actions"]
    assert res["command_before_resolve"] is True
    assert res["answered_s"] < 1.0 and res["explain_answered_s"] < 1.0  # nothing blocks
    assert '"""' in res["docstring_text"] and '"""' not in res["completed_text"]
    assert src.read_text() == res["docstring_text"]  # saved: the edit landed in the buffer
    assert any("gemma-explain" in m or "Server reports" in m for m in res["explained"])
