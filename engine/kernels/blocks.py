"""GGUF block formats -> the engine's block-affine layout, exactly (no re-quantization).

Every supported quantized GGUF type is, per block of `block` consecutive inputs of one output
row, `value = scale * (q - zp) + offset` with an integer q of `bits` bits (4 or 8), an integer
zero point, an fp32 scale and (for the types with a min) an fp32 offset. That is the form
onnxruntime's MatMulNBits computes (the offset term is added separately, see ort.py):

| GGUF  | block | bits | scale      | zp  | offset    |
|-------|-------|------|------------|-----|-----------|
| Q8_0  | 32    | 8    | d          | 128 | -         |
| Q4_0  | 32    | 4    | d          | 8   | -         |
| Q5_0  | 32    | 8    | d          | 16  | -         |
| Q4_1  | 32    | 4    | d          | 0   | m         |
| Q5_1  | 32    | 8    | d          | 0   | m         |
| Q4_K  | 32    | 4    | d * sc     | 0   | -dmin * m |
| Q5_K  | 32    | 8    | d * sc     | 0   | -dmin * m |
| Q6_K  | 16    | 8    | d * sc     | 32  | -         |

Scales and offsets come from the blocks' headers (fp16 d, dmin; 6-bit or int8 sub-scales: the
products are exact in fp32); q is recovered from `gguf.quants.dequantize` by division, which is
exact because every value is an integer multiple of its scale (checked: a tensor whose values
do not round-trip is a ValueError naming it). F32/F16/BF16 stay dense fp32 (exact).

`quantize` makes the same layout from fp32 weights (for Hugging Face checkpoints), through
gguf's own quantizers, so a checkpoint's `--quant q8_0` is what a Q8_0 GGUF would hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import protocol as P

# GGUF type name -> (block, bits, zero point, has offset)
LAYOUTS: dict[str, tuple[int, int, int, bool]] = {
    "Q8_0": (32, 8, 128, False),
    "Q4_0": (32, 4, 8, False),
    "Q5_0": (32, 8, 16, False),
    "Q4_1": (32, 4, 0, True),
    "Q5_1": (32, 8, 0, True),
    "Q4_K": (32, 4, 0, True),
    "Q5_K": (32, 8, 0, True),
    "Q6_K": (16, 8, 32, False),
}
DENSE_TYPES = ("F32", "F16", "BF16")
_ROWS_PER_CHUNK = 8192
QUANT_CHOICES = P.QUANT_CHOICES  # for Hugging Face checkpoints


@dataclass(frozen=True)
class BlockQuant:
    """One weight matrix (N, K) in block-affine form: `scale * (q - zp) + offset` per block."""

    name: str
    ggml_type: str  # the GGUF type the values come from
    shape: tuple[int, int]  # (N outputs, K inputs)
    block: int
    bits: int
    q: np.ndarray  # (N, K // block, block * bits // 8) uint8, MatMulNBits packing
    scales: np.ndarray  # (N, K // block) fp32
    zp: np.ndarray  # (N, K // block) uint8: integer zero points (unpacked)
    offsets: np.ndarray | None  # (N, K // block) fp32, or None

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is None else self.offsets.nbytes
        return self.q.nbytes + self.scales.nbytes + self.zp.nbytes + extra

    def unpack_q(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The integer q of `rows`, (n, K // block, block) uint8."""
        q = self.q[rows]
        if self.bits == 8:
            return q
        out = np.empty(q.shape[:-1] + (2 * q.shape[-1],), dtype=np.uint8)
        out[..., 0::2] = q & 0x0F
        out[..., 1::2] = q >> 4
        return out

    def dequantize_into(self, out: np.ndarray, rows: slice) -> np.ndarray:
        """fp32 values of `rows` written into `out` (n, K) (a reused tile buffer): two passes,
        `q * scale - zp * scale` (+ offset), no (n, K) temporaries for 8-bit blocks."""
        n = out.shape[0]
        nb = self.shape[1] // self.block
        view = out.reshape(n, nb, self.block)  # (n, nb, block)
        scales = self.scales[rows]  # (n, nb)
        np.multiply(self.unpack_q(rows), scales[..., None], out=view)
        zs = self.zp[rows] * scales  # (n, nb) zero point times scale
        if self.offsets is not None:
            zs -= self.offsets[rows]
        np.subtract(view, zs[..., None], out=view)
        return out

    def dequantize(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """fp32 values of `rows` (all by default): (n, K)."""
        q = self.unpack_q(rows).astype(np.float32)  # (n, nb, block)
        q -= self.zp[rows][..., None]
        q *= self.scales[rows][..., None]
        if self.offsets is not None:
            q += self.offsets[rows][..., None]
        return q.reshape(q.shape[0], -1)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _headers(ggml_type: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block scale (N, nb) and offset (or None) from raw blocks (N, n_super, type_size)."""
    from gguf.quants import Q4_K

    N, nsup, _ = blocks.shape
    if ggml_type in ("Q8_0", "Q4_0", "Q5_0"):
        return _f16(blocks[..., 0:2]), None
    if ggml_type in ("Q4_1", "Q5_1"):
        return _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    if ggml_type in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])  # (N, nsup)
        sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
        sc = sc.reshape(N, nsup, 8).astype(np.float32)
        m = m.reshape(N, nsup, 8).astype(np.float32)
        return (d[..., None] * sc).reshape(N, -1), (-(dmin[..., None] * m)).reshape(N, -1)
    if ggml_type == "Q6_K":
        sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
        d = _f16(blocks[..., 208:210])
        return (d[..., None] * sc).reshape(N, -1), None
    raise ValueError(f"unsupported GGUF tensor type {ggml_type}")


def from_gguf(name: str, ggml_type: str, data: np.ndarray) -> BlockQuant:
    """Repack a GGUF tensor's raw bytes (rows, row_bytes) uint8 without changing a value."""
    from gguf import GGMLQuantizationType
    from gguf.quants import GGML_QUANT_SIZES, dequantize

    if ggml_type not in LAYOUTS:
        raise ValueError(f"tensor {name}: unsupported GGUF type {ggml_type}")
    qtype = GGMLQuantizationType[ggml_type]
    per_block, type_size = GGML_QUANT_SIZES[qtype]
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % type_size:
        raise ValueError(f"tensor {name}: {ggml_type} data of shape {data.shape} {data.dtype} "
                         f"is not whole {type_size}-byte blocks per row")
    N = data.shape[0]
    K = data.shape[1] // type_size * per_block
    if K == 0:
        raise ValueError(f"tensor {name}: empty rows")
    block, bits, zp_value, _ = LAYOUTS[ggml_type]
    blocks = data.reshape(N, -1, type_size)
    if ggml_type == "Q8_0":  # the bytes are q itself: no dequantize needed
        q = (blocks[..., 2:] ^ np.uint8(0x80)).reshape(N, K // block, block)  # int8 + 128
        return _checked(BlockQuant(name, ggml_type, (N, K), block, bits, np.ascontiguousarray(q),
                                   _f16(blocks[..., 0:2]),
                                   np.full((N, K // block), zp_value, np.uint8), None))
    parts = []
    for r0 in range(0, N, _ROWS_PER_CHUNK):  # bounded float64 temporaries on big tensors
        rows = slice(r0, min(N, r0 + _ROWS_PER_CHUNK))
        scales, offsets = _headers(ggml_type, blocks[rows])
        values = dequantize(data[rows], qtype).reshape(-1, K // block, block)  # fp32, exact
        parts.append(_from_values(name, ggml_type, values, scales, offsets, block, bits,
                                  zp_value))
    out = parts[0] if len(parts) == 1 else BlockQuant(name, ggml_type, (N, K), block, bits,
                      np.concatenate([p.q for p in parts]),
                      np.concatenate([p.scales for p in parts]),
                      np.concatenate([p.zp for p in parts]),
                      None if parts[0].offsets is None else np.concatenate(
                          [p.offsets for p in parts if p.offsets is not None]))
    return _checked(out)


def _checked(bq: BlockQuant) -> BlockQuant:
    """ValueError naming the tensor if a scale or offset is not a finite number."""
    if not np.all(np.isfinite(bq.scales)) or (bq.offsets is not None
                                              and not np.all(np.isfinite(bq.offsets))):
        raise ValueError(f"tensor {bq.name}: {bq.ggml_type} block scales are not finite "
                         "(malformed blocks)")
    return bq


def _from_values(name: str, ggml_type: str, values: np.ndarray, scales: np.ndarray,
                 offsets: np.ndarray | None, block: int, bits: int,
                 zp_value: int) -> BlockQuant:
    N, nb, _ = values.shape
    shifted = values.astype(np.float64)
    if offsets is not None:
        shifted -= offsets[..., None]
    s = scales[..., None].astype(np.float64)
    safe = np.where(s == 0.0, 1.0, s)
    q = np.rint(shifted / safe) + zp_value  # (N, nb, block)
    q = np.where(s == 0.0, zp_value, q)
    if not np.all((q >= 0) & (q < (1 << bits))):
        raise ValueError(f"tensor {name}: {ggml_type} values out of the {bits}-bit range "
                         "(malformed blocks)")
    rebuilt = (q - zp_value) * s + (0.0 if offsets is None else offsets[..., None])
    # an offset type's fp32 dequantize rounds `scale*q - min` once; everything else is exact
    tol = np.abs(values).astype(np.float64) * 2.0**-23 if offsets is not None else 0.0
    if not np.all(np.abs(rebuilt - values) <= tol):
        raise ValueError(f"tensor {name}: {ggml_type} values are not multiples of their block "
                         "scale (malformed blocks)")
    qi = q.astype(np.uint8)
    if bits == 4:
        qi = (qi[..., 0::2] | (qi[..., 1::2] << 4)).astype(np.uint8)
    zp = np.full((N, nb), zp_value, dtype=np.uint8)
    return BlockQuant(name, ggml_type, (N, nb * values.shape[2]), block, bits,
                      np.ascontiguousarray(qi), np.ascontiguousarray(scales, dtype=np.float32),
                      zp, None if offsets is None else np.ascontiguousarray(offsets,
                                                                             dtype=np.float32))


def quantize(name: str, w: np.ndarray, quant: str) -> BlockQuant | np.ndarray:
    """fp32 (N, K) -> `quant` (one of QUANT_CHOICES) via gguf's quantizer, then repacked.

    Returns a dense fp32 array for "f32", and for "bf16" the bf16-rounded values in fp32. A
    K that is not a whole number of 32 falls back to bf16. (gguf-py has no K-quant quantizer,
    so HF checkpoints get the legacy 4/5/8-bit types.)
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import GGML_QUANT_SIZES
    from gguf.quants import quantize as gguf_quantize

    w = np.ascontiguousarray(w, dtype=np.float32)
    if quant == "f32":
        return w
    if quant not in QUANT_CHOICES:
        raise ValueError(f"unknown quant {quant!r} (choose from {', '.join(QUANT_CHOICES)})")
    if quant != "bf16":
        qtype = GGMLQuantizationType[quant.upper()]
        if w.shape[1] % GGML_QUANT_SIZES[qtype][0] == 0:
            raw = gguf_quantize(w, qtype)
            return from_gguf(name, quant.upper(), raw.reshape(w.shape[0], -1))
    bits = w.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return rounded.view(np.float32)
