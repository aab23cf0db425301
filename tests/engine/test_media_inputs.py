"""Image and WAV preprocessing: a hand-computed small case (EXIF orientation, alpha, odd
sizes, upscaling), the resize rule and block order against transformers' own functions, PIL
bicubic against torch's antialiased bicubic within a stated tolerance, every WAV encoding,
resampling, and each limit's error."""

from __future__ import annotations

import ast
import io
import math
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine import audio, vision
from engine.config import MediaConfig
from tests.engine import tiny_unified as tu

MEDIA = MediaConfig(image_token_id=500, boi_token_id=503, eoi_token_id=504, audio_token_id=502,
                    boa_token_id=505, eoa_token_id=506, patch_px=12, vision_dim=32,
                    posemb_size=128, audio_frame=640)


def encode(arr: np.ndarray, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def transformers_image_functions() -> dict[str, Any]:
    """transformers' resize rule, patchify and 3x3 merge, from its own source (the module
    imports torchvision, which this CPU torch cannot load; these functions need only torch)."""
    torch = pytest.importorskip("torch")
    pkg = pytest.importorskip("transformers.models.gemma4_unified")
    src = (Path(pkg.__file__).parent / "image_processing_gemma4_unified.py").read_text()
    want = {"get_aspect_ratio_preserving_size", "convert_image_to_patches", "patches_merge"}
    tree = ast.parse(src)
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in want]
    assert {n.name for n in body} == want
    ns: dict[str, Any] = {"math": math, "torch": torch}
    exec(compile(ast.Module(body, []), "image_processing_gemma4_unified", "exec"), ns)  # noqa: S102
    return ns


# ----------------------------------------------------------------------------- images


def test_hand_computed_orientation_alpha_and_odd_size() -> None:
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # 2 rows, 3 columns
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright = vision.decode_image(encode(a, exif=exif.tobytes()))
    assert upright.shape == (3, 2, 3)
    np.testing.assert_array_equal(upright, np.rot90(a, k=-1))
    # alpha composited onto white: 200 at alpha 128 -> 200*128/255 + 255*127/255 = 227.4
    rgba = np.array([[[200, 100, 0, 128], [0, 0, 0, 0]]], dtype=np.uint8)
    flat = vision.decode_image(encode(rgba))
    assert np.abs(flat[0, 0].astype(int) - [227, 177, 127]).max() <= 1
    np.testing.assert_array_equal(flat[0, 1], [255, 255, 255])  # fully transparent: white
    # a palette GIF with a transparent index, first frame only
    frames = [Image.new("P", (5, 3), 1), Image.new("P", (5, 3), 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    gif = vision.decode_image(buf.getvalue())
    assert gif.shape == (3, 5, 3) and (gif == [255, 0, 0]).all()
    # odd 5x3 image, 12-px blocks, 70 at most: scaled up to 10x6 blocks (120x72 pixels)
    assert vision.target_size(3, 5, 12, 70) == (72, 120)
    img = vision.prepare_image(encode(np.full((3, 5, 3), 51, np.uint8)), MEDIA, 70)
    assert img.size == (72, 120) and img.n_tokens == 60
    np.testing.assert_allclose(img.pixels, 0.2, atol=1e-6)  # 51 / 255, no mean/std
    assert img.positions[:12].tolist() == [[x, 0] for x in range(10)] + [[0, 1], [1, 1]]


def test_blocks_are_row_major_rows_of_row_col_channel() -> None:
    ys, xs = np.mgrid[0:4, 0:6]
    px = np.stack([ys * 100 + xs * 10 + c for c in range(3)], -1).astype(np.float32)
    blocks, pos = vision.to_blocks(px, 2)  # 2 rows x 3 columns of 2x2 blocks
    assert blocks.shape == (6, 12) and pos.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1],
                                                        [1, 1], [2, 1]]
    # block 4 = row 1, column 1: pixels (2..3, 2..3), flattened (row, col, channel)
    assert blocks[4].tolist() == [float(y * 100 + x * 10 + c) for y in (2, 3) for x in (2, 3)
                                  for c in range(3)]


def test_resize_rule_and_block_order_match_transformers() -> None:
    torch = pytest.importorskip("torch")
    ref = transformers_image_functions()
    for h, w in [(100, 100), (768, 1024), (30, 500), (500, 30), (1, 4000), (1080, 1920),
                 (37, 50), (3, 5), (4000, 3000)]:
        for budget in vision.SOFT_TOKEN_BUDGETS:
            want = ref["get_aspect_ratio_preserving_size"](h, w, 16, budget * 9, 3)
            assert vision.target_size(h, w, 48, budget) == want, (h, w, budget)
    assert vision.target_size(100, 100, 48, 280) == (768, 768)
    assert vision.target_size(768, 1024, 48, 280) == (672, 912)
    assert vision.target_size(30, 500, 48, 280) == (192, 3264)
    # 16-px patches merged 3x3 by transformers == our 48-px blocks, positions included
    rng = np.random.default_rng(0)
    img = rng.random((96, 144, 3)).astype(np.float32)
    chw = torch.tensor(img).permute(2, 0, 1)
    patches = ref["convert_image_to_patches"](chw, 16)
    grid = torch.meshgrid(torch.arange(9), torch.arange(6), indexing="xy")
    positions = torch.stack(grid, dim=-1).reshape(patches.shape[0], 2)
    merged, merged_pos = ref["patches_merge"](patches[None], positions[None], 6)
    blocks, pos = vision.to_blocks(img, 48)
    np.testing.assert_array_equal(merged[0].numpy(), blocks)
    np.testing.assert_array_equal(merged_pos[0].numpy(), pos)


def test_pil_bicubic_against_torch_antialiased_bicubic() -> None:
    """transformers resizes with torchvision (bicubic, antialias) on uint8; we use PIL's
    bicubic. Against torch's antialiased bicubic: smooth images within 1/255 everywhere,
    random noise within 0.35/255 on average (edge handling differs at the borders)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for (h, w), (H, W) in [((37, 50), (84, 108)), ((300, 400), (144, 192)),
                           ((31, 90), (48, 168)), ((20, 20), (96, 96))]:
        ys, xs = np.mgrid[0:h, 0:w]
        s = 127 + 120 * np.sin(xs / 5.0) * np.cos(ys / 7.0)
        smooth = np.stack([s, s[::-1], s[:, ::-1]], -1).astype(np.uint8)
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for img, max_err, mean_err in ((smooth, 1.0, 0.25), (noise, 255.0, 0.35)):
            ours = vision.resize(img, H, W).astype(np.float32)
            t = torch.tensor(img).permute(2, 0, 1)[None].float()
            ref = torch.nn.functional.interpolate(t, size=(H, W), mode="bicubic",
                                                  antialias=True, align_corners=False)
            ref_np = ref[0].permute(1, 2, 0).clamp(0, 255).round().numpy()
            d = np.abs(ours - ref_np)
            assert d.max() <= max_err and d.mean() <= mean_err, ((h, w), d.max(), d.mean())


def test_image_limits_and_bad_files_are_clear_errors() -> None:
    small = vision.ImageLimits(max_bytes=100, max_pixels=10_000)
    with pytest.raises(ValueError, match=r"the limit is 100 bytes \(max_image_bytes\)"):
        vision.decode_image(tu.png(50, 50), small)
    big = encode(np.zeros((200, 100, 3), np.uint8))
    with pytest.raises(ValueError, match=r"100x200 = 20000 pixels; the limit is 10000 pixels "
                       r"\(max_image_pixels\)"):
        vision.decode_image(big, vision.ImageLimits(max_pixels=10_000))
    with pytest.raises(ValueError, match="not a readable image"):
        vision.decode_image(b"GIF89a garbage")
    with pytest.raises(ValueError, match="image format BMP is not supported"):
        vision.decode_image(encode(np.zeros((4, 4, 3), np.uint8), "BMP"))
    jpeg = encode(np.full((10, 10, 3), 128, np.uint8), "JPEG")
    with pytest.raises(ValueError, match=r"(corrupt JPEG|not a readable) image|Truncated"):
        vision.decode_image(jpeg[: len(jpeg) // 2])
    webp = vision.decode_image(encode(np.full((6, 4, 3), 77, np.uint8), "WEBP", lossless=True))
    assert webp.shape == (6, 4, 3) and (webp == 77).all()
    with pytest.raises(ValueError, match="position table"):
        vision.prepare_image(tu.png(4000, 3), MEDIA, 1120)


# ----------------------------------------------------------------------------- audio


@pytest.mark.parametrize("bits", [8, 16, 24, 32])
def test_pcm_wav_of_every_width_reads_as_the_same_tone(bits: int) -> None:
    x, rate = audio.read_wav(tu.wav(0.1, rate=16_000, bits=bits))
    assert rate == 16_000 and len(x) == 1600
    t = np.arange(1600) / 16_000
    want = 0.5 * np.sin(2 * np.pi * 440 * t)
    assert np.abs(x - want).max() <= (1 / 100 if bits == 8 else 1e-4)


def test_float_stereo_and_stdlib_written_wavs() -> None:
    x, rate = audio.read_wav(tu.wav(0.05, rate=8000, channels=2, float_samples=True))
    assert rate == 8000 and len(x) == 400
    assert abs(float(np.abs(x).max()) - 0.5) < 1e-3
    # a file written by the stdlib's wave module (independent writer), stereo mixed down
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(11025)
        w.writeframes(np.array([[1000, -1000], [3000, 1000]], "<i2").tobytes())
    y, rate = audio.read_wav(buf.getvalue())
    assert rate == 11025 and np.allclose(y, [0.0, 2000 / 32768])


def test_resampling_to_16k_keeps_a_tone_and_frames_are_zero_padded() -> None:
    x, rate = audio.read_wav(tu.wav(0.5, rate=44_100, freq=1000.0))
    y = audio.resample(x, rate)
    assert len(y) == 8000
    t = np.arange(8000) / 16_000
    want = 0.5 * np.sin(2 * np.pi * 1000 * t)
    assert np.abs(y - want)[200:-200].max() <= 5e-3  # band-limited: no aliasing, no drift
    frames = audio.to_frames(np.ones(1300, np.float32), 640)
    assert frames.shape == (3, 640) and frames[2, :20].all() and not frames[2, 20:].any()
    clip = audio.prepare_audio(tu.wav(0.37, rate=22_050, channels=2), MEDIA)
    assert clip.n_tokens == 10  # 0.37 s = 5920 samples at 16 kHz -> 10 frames of 640


def test_audio_limits_and_bad_files_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"the limit is 10 s \(max_audio_seconds\)"):
        audio.read_wav(tu.wav(11.0, rate=8000), audio.AudioLimits(max_seconds=10))
    with pytest.raises(ValueError, match=r"the limit is 1000 bytes \(max_audio_bytes\)"):
        audio.read_wav(tu.wav(1.0), audio.AudioLimits(max_bytes=1000))
    with pytest.raises(ValueError, match="not a WAV file"):
        audio.read_wav(b"ID3\x03 an mp3")
    alaw = bytearray(tu.wav(0.01))
    alaw[20:22] = (6).to_bytes(2, "little")  # WAVE_FORMAT_ALAW
    with pytest.raises(ValueError, match="WAV encoding 6 with 16-bit samples is not supported"):
        audio.read_wav(bytes(alaw))
    with pytest.raises(ValueError, match="lacks a fmt or data chunk"):
        audio.read_wav(b"RIFF\x04\x00\x00\x00WAVE")
