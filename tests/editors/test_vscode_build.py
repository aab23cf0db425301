"""The VS Code extension type-checks against the pinned vscode and languageclient typings."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EXT = Path(__file__).resolve().parents[2] / "editors" / "vscode"


def test_extension_typechecks() -> None:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXT, check=True,
                   capture_output=True, timeout=600)
    out = subprocess.run(["npx", "tsc", "--noEmit", "-p", "."], cwd=EXT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
