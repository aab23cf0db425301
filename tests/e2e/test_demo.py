"""`gemma-lsp demo`: the README's main job, run as a newcomer would, against a real engine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gemma_lsp.demo import block_before


def test_block_before_finds_the_last_complete_function() -> None:
    text = "class A:\n    def f(self):\n        return 1\n\n    def g(self):\n"
    assert block_before(text, 4) == (1, 3)
    assert block_before("x = 1\n", 1) is None


def test_demo_prints_completion_diff_and_explanation(tmp_path: Path) -> None:
    run = Path(tempfile.mkdtemp(prefix="gd-", dir="/tmp"))
    try:
        out = subprocess.run(
            [sys.executable, "-m", "gemma_lsp", "demo", "--max-tokens", "24"],
            env=dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(run)), capture_output=True,
            text=True, timeout=600, cwd=tmp_path)
    finally:
        subprocess.run(["pkill", "-f", str(run)], check=False)
        shutil.rmtree(run, ignore_errors=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "== engine: gemma-3-270m" in text
    completion = text.split("== inline completion at sample.py:15:1\n")[1].split("\n== ")[0]
    assert "\x1b[2m" in completion and "(no suggestion" not in completion
    # the base model may return the code unchanged: then the demo says so
    refactor = text.split("== refactor lines 9-12")[1].split("\n== ")[0]
    assert "no change suggested" in refactor or "\n@@ " in refactor
    diff = text.split("== add docstring, lines 9-12")[1].split("\n== ")[0]
    assert "--- a/sample.py" in diff and "+++ b/sample.py" in diff and "\n@@ " in diff
    assert '+        """' in diff  # the docstring, at the method body's indent
    explanation = text.split("== explanation of lines 9-12, as it streams\n")[1]
    assert explanation.strip()


def test_demo_names_a_missing_file() -> None:
    out = subprocess.run([sys.executable, "-m", "gemma_lsp", "demo", "/nonexistent/x.py"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no such file: /nonexistent/x.py" in out.stderr
