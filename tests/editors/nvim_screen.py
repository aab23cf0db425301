"""A screenshot of a running (headless) Neovim: attach as a UI over its --listen socket with
msgpack-RPC, collect the `ext_linegrid` redraw events up to a `flush`, and paint the grid with
Pillow. What a terminal would show, colours included; no terminal emulator needed."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import msgpack
from PIL import Image, ImageDraw, ImageFont

FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
         "/usr/share/fonts/truetype/liberation/LiberationMono-Regular.ttf")


class _Grid:
    def __init__(self) -> None:
        self.w = self.h = 0
        self.cells: list[list[tuple[str, int]]] = []
        self.attrs: dict[int, dict[str, Any]] = {0: {}}
        self.fg, self.bg = 0xD0D0D0, 0x1C1C1C
        self.cursor = (0, 0)

    def apply(self, name: str, args: list[Any]) -> None:
        if name == "grid_resize":
            self.w, self.h = args[1], args[2]
            self.cells = [[(" ", 0)] * self.w for _ in range(self.h)]
        elif name == "default_colors_set":
            fg, bg = args[0], args[1]
            self.fg = fg if fg >= 0 else self.fg
            self.bg = bg if bg >= 0 else self.bg
        elif name == "hl_attr_define":
            self.attrs[args[0]] = args[1]
        elif name == "grid_clear":
            self.cells = [[(" ", 0)] * self.w for _ in range(self.h)]
        elif name == "grid_cursor_goto":
            self.cursor = (args[1], args[2])
        elif name == "grid_line":
            _, row, col, cells = args[:4]
            hl = 0
            for cell in cells:
                text, hl, rep = cell[0], cell[1] if len(cell) > 1 else hl, (
                    cell[2] if len(cell) > 2 else 1)
                for _ in range(rep):
                    if 0 <= row < self.h and 0 <= col < self.w:
                        self.cells[row][col] = (text, hl)
                    col += 1
        elif name == "grid_scroll":
            _, top, bot, left, right, rows = args[:6]
            src = [row[:] for row in self.cells]
            for r in range(top, bot):
                s = r + rows
                if top <= s < bot:
                    self.cells[r][left:right] = src[s][left:right]

    def colors(self, hl: int) -> tuple[int, int]:
        a = self.attrs.get(hl, {})
        fg, bg = a.get("foreground", self.fg), a.get("background", self.bg)
        return (bg, fg) if a.get("reverse") else (fg, bg)


def _rgb(v: int) -> tuple[int, int, int]:
    return (v >> 16) & 255, (v >> 8) & 255, v & 255


def screenshot(sock_path: Path, out: Path, width: int = 90, height: int = 24) -> str:
    """Attach to the Neovim listening on `sock_path`, save its screen as PNG at `out` and
    return the screen's text (one line per row)."""
    grid = _Grid()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(sock_path))
        s.sendall(msgpack.packb([0, 1, "nvim_ui_attach",
                                 [width, height, {"rgb": True, "ext_linegrid": True}]]))
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        flushed = False
        while not flushed:
            data = s.recv(1 << 16)
            if not data:
                break
            unpacker.feed(data)
            for msg in unpacker:
                if msg[0] == 1 and msg[2] is not None:
                    raise RuntimeError(f"nvim_ui_attach failed: {msg[2]}")
                if msg[0] == 2 and msg[1] == "redraw":
                    for batch in msg[2]:
                        for args in batch[1:]:
                            grid.apply(batch[0], args)
                        flushed = flushed or batch[0] == "flush"
        s.sendall(msgpack.packb([0, 2, "nvim_ui_detach", []]))
    font_path = next((f for f in FONTS if Path(f).exists()), None)
    font: Any = (ImageFont.truetype(font_path, 16) if font_path
                 else ImageFont.load_default(size=16))
    cw, ch = int(font.getlength("M")) + 1, 20
    img = Image.new("RGB", (grid.w * cw + 16, grid.h * ch + 16), _rgb(grid.bg))
    draw = ImageDraw.Draw(img)
    for r, row in enumerate(grid.cells):
        for c, (text, hl) in enumerate(row):
            fg, bg = grid.colors(hl)
            x, y = 8 + c * cw, 8 + r * ch
            if bg != grid.bg:
                draw.rectangle([x, y, x + cw, y + ch], fill=_rgb(bg))
            if text.strip():
                draw.text((x, y + 1), text, font=font, fill=_rgb(fg))
    cx, cy = 8 + grid.cursor[1] * cw, 8 + grid.cursor[0] * ch
    draw.rectangle([cx, cy, cx + 2, cy + ch], fill=_rgb(grid.fg))
    img.save(out)
    return "\n".join("".join(t for t, _ in row).rstrip() for row in grid.cells)
