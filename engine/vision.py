"""Images for Gemma 4 unified: decode, resize to the soft-token budget, cut into pixel blocks,
and the encoder-free vision embedder (LayerNorm -> Linear -> LayerNorm -> x/y table ->
LayerNorm -> RMSNorm -> Linear) that turns each block into one soft token.

Decoding is pillow's: PNG, JPEG, WebP, GIF (first frame); EXIF orientation applied; alpha
composited onto white (as transformers does); RGB. The resize keeps the aspect ratio and
scales small images up: a block budget of `max_soft_tokens` blocks of `patch_px` pixels
(48 in the released models). Pixels are only scaled to [0, 1] (no mean/std).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from engine.config import MediaConfig

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which the embedder uses


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 16 * 1024 * 1024  # the encoded file
    max_pixels: int = 40_000_000  # width x height before resizing (decompression bombs)


IMAGE_LIMITS = ImageLimits()


@dataclass(frozen=True)
class ImageInput:
    """One image as soft-token inputs: a row of pixels per block, and its (x, y) block."""

    pixels: np.ndarray  # (n, patch_px * patch_px * 3) float32 in [0, 1]
    positions: np.ndarray  # (n, 2) int64: (x = column, y = row) of each block
    size: tuple[int, int]  # (height, width) after resizing

    @property
    def n_tokens(self) -> int:
        return int(self.pixels.shape[0])


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes, limits: ImageLimits = IMAGE_LIMITS) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB, upright. ValueError naming what is wrong."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ValueError(f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes "
                         "(max_image_bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ValueError(f"image has more pixels than {limits.max_pixels} "
                         "(max_image_pixels)") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a readable image ({e}); send PNG, JPEG, WebP or GIF") from None
    if img.format not in FORMATS:
        raise ValueError(f"image format {img.format} is not supported; send PNG, JPEG, WebP "
                         "or GIF")
    w, h = img.size
    if w * h > limits.max_pixels:
        raise ValueError(f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels} "
                         "pixels (max_image_pixels)")
    fmt = img.format
    try:
        img.seek(0)  # GIF / animated WebP: the first frame
        img.load()
        upright: Image.Image = ImageOps.exif_transpose(img)
        has_alpha = "A" in upright.getbands() or upright.info.get("transparency") is not None
        if has_alpha:
            rgba = upright.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            upright = Image.alpha_composite(white, rgba)
        rgb = upright.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"corrupt {fmt} image ({e})") from None
    return np.asarray(rgb, dtype=np.uint8)


# --------------------------------------------------------------------------- resizing


def target_size(height: int, width: int, patch_px: int, max_soft_tokens: int) -> tuple[int, int]:
    """The resized (H', W'): aspect kept, multiples of `patch_px`, at most `max_soft_tokens`
    blocks; small images are scaled up to fill the budget."""
    target_px = max_soft_tokens * patch_px * patch_px
    f = math.sqrt(target_px / (height * width))
    h = int(math.floor(f * height / patch_px)) * patch_px
    w = int(math.floor(f * width / patch_px)) * patch_px
    if h == 0 and w == 0:
        raise ValueError(f"image {width}x{height} is too small to resize")
    longest = max_soft_tokens * patch_px  # a one-block-thin strip
    if h == 0:
        h, w = patch_px, min(int(math.floor(width / height)) * patch_px, longest)
    elif w == 0:
        w, h = patch_px, min(int(math.floor(height / width)) * patch_px, longest)
    assert h * w <= target_px, (height, width, h, w)
    return h, w


def resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8, bicubic (antialiased when shrinking)."""
    from PIL import Image

    if rgb.shape[:2] == (height, width):
        return rgb
    out = Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.uint8)


def to_blocks(pixels: np.ndarray, patch_px: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float -> row-major blocks (n, patch_px*patch_px*3) flattened (row, col,
    channel), and their (x, y) positions (n, 2)."""
    H, W, C = pixels.shape
    rows, cols = H // patch_px, W // patch_px
    assert rows * patch_px == H and cols * patch_px == W, (H, W, patch_px)
    blocks = pixels.reshape(rows, patch_px, cols, patch_px, C)  # (rows, py, cols, px, C)
    blocks = blocks.transpose(0, 2, 1, 3, 4).reshape(rows * cols, patch_px * patch_px * C)
    ys, xs = np.divmod(np.arange(rows * cols), cols)  # row-major: token l is (l % cols, l // cols)
    positions = np.stack([xs, ys], axis=1).astype(np.int64)  # (n, 2)
    return np.ascontiguousarray(blocks, dtype=np.float32), positions


def prepare_image(data: bytes, media: MediaConfig, max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
                  limits: ImageLimits = IMAGE_LIMITS) -> ImageInput:
    """Encoded image -> its soft-token inputs for a model with `media.patch_px` blocks."""
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise ValueError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got "
                         f"{max_soft_tokens}")
    rgb = decode_image(data, limits)
    h, w = target_size(rgb.shape[0], rgb.shape[1], media.patch_px, max_soft_tokens)
    if max(h, w) // media.patch_px > media.posemb_size:
        raise ValueError(f"image resized to {w}x{h} has more blocks per side than the model's "
                         f"position table ({media.posemb_size}); crop it closer to square")
    pixels = resize(rgb, h, w).astype(np.float32) / np.float32(255.0)  # (h, w, 3) in [0, 1]
    blocks, positions = to_blocks(pixels, media.patch_px)
    return ImageInput(blocks, positions, (h, w))


# --------------------------------------------------------------------------- the embedder


@dataclass(frozen=True)
class VisionWeights:
    ln1_w: np.ndarray  # (F,) F = patch_px * patch_px * 3
    ln1_b: np.ndarray  # (F,)
    w_patch: np.ndarray  # (E, F)
    b_patch: np.ndarray  # (E,)
    ln2_w: np.ndarray  # (E,)
    ln2_b: np.ndarray  # (E,)
    pos_embd: np.ndarray  # (P, 2, E): [x, 0] column term, [y, 1] row term
    pos_norm_w: np.ndarray  # (E,)
    pos_norm_b: np.ndarray  # (E,)
    w_proj: np.ndarray  # (d, E) into the text model's width

    @classmethod
    def from_packed(cls, packed: Mapping[str, np.ndarray]) -> VisionWeights | None:
        names = cls.__dataclass_fields__
        if not all(f"vision.{n}" in packed for n in names):
            return None
        return cls(**{n: packed[f"vision.{n}"] for n in names})


def expected_shapes(media: MediaConfig, d_model: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the vision embedder's weights."""
    F, E = media.patch_px * media.patch_px * 3, media.vision_dim
    return {"vision.ln1_w": (F,), "vision.ln1_b": (F,), "vision.w_patch": (E, F),
            "vision.b_patch": (E,), "vision.ln2_w": (E,), "vision.ln2_b": (E,),
            "vision.pos_embd": (media.posemb_size, 2, E), "vision.pos_norm_w": (E,),
            "vision.pos_norm_b": (E,), "vision.w_proj": (d_model, E)}


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * w + b over the last axis."""
    mu = x.mean(axis=-1, keepdims=True)  # (n, 1)
    xc = x - mu  # (n, F)
    var = np.einsum("...i,...i->...", xc, xc)[..., None] / np.float32(x.shape[-1])  # (n, 1)
    return xc / np.sqrt(var + np.float32(eps)) * w + b  # (n, F)


def embed_image(vw: VisionWeights, image: ImageInput, eps: float) -> np.ndarray:
    """Pixel blocks -> soft tokens (n, d) in the text model's embedding space (not scaled)."""
    # patch embedding: LayerNorm, one dense layer with bias, LayerNorm
    h = layer_norm(image.pixels, vw.ln1_w, vw.ln1_b, LAYER_NORM_EPS)  # (n, F)
    h = h @ vw.w_patch.T + vw.b_patch  # (n, E)
    h = layer_norm(h, vw.ln2_w, vw.ln2_b, LAYER_NORM_EPS)  # (n, E)
    # factorised position table: a column term plus a row term, then LayerNorm
    x, y = image.positions[:, 0], image.positions[:, 1]
    h = h + vw.pos_embd[x, 0] + vw.pos_embd[y, 1]  # (n, E)
    h = layer_norm(h, vw.pos_norm_w, vw.pos_norm_b, LAYER_NORM_EPS)  # (n, E)
    # weightless RMSNorm, projection into the text model's width
    h = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + np.float32(eps))  # (n, E)
    return np.ascontiguousarray(h @ vw.w_proj.T, dtype=np.float32)  # (n, d)
