"""Preallocated K/V storage for one sequence: written by slice, cut back to a position."""

from __future__ import annotations

import numpy as np

from engine.config import ModelConfig


class KVCache:
    """K and V for every layer, `(n_layers, n_kv_heads, capacity, head_dim)` fp32.

    Positions `[0, length)` are valid. The forward pass writes new positions by slice;
    `truncate(p)` forgets everything from `p` on (nothing is copied or freed).
    """

    def __init__(self, config: ModelConfig, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"KV cache capacity must be positive, got {capacity}")
        if capacity > config.context_length:
            raise ValueError(
                f"KV cache capacity {capacity} exceeds the model context {config.context_length}"
            )
        # layers with fewer K/V heads or narrower heads use the leading part of their slot
        shape = (config.n_layers, config.kv_heads_max, capacity, config.head_dim_max)
        self.k = np.zeros(shape, dtype=np.float32)  # (L, KV, cap, hd); calloc: pages on touch
        self.v = np.zeros(shape, dtype=np.float32)  # (L, KV, cap, hd)
        self.tokens = np.zeros(capacity, dtype=np.int64)  # (cap,) the id at each position
        self.capacity = capacity
        self.high = 0  # the most positions ever written: the pages this buffer has touched
        self._length = 0

    @property
    def length(self) -> int:
        """Valid positions `[0, length)`."""
        return self._length

    @length.setter
    def length(self, n: int) -> None:
        self._length = n
        if n > self.high:
            self.high = n

    def truncate(self, position: int) -> None:
        """Forget positions `position..length`; the next write starts there."""
        assert 0 <= position <= self.length, (position, self.length)
        self.length = position

    def common_prefix(self, ids: np.ndarray) -> int:
        """How many leading positions of `ids` this cache already holds."""
        n = min(self.length, len(ids))
        diff = np.flatnonzero(self.tokens[:n] != ids[:n])
        return int(diff[0]) if diff.size else n

    def load_prefix(self, ids: np.ndarray, k: np.ndarray, v: np.ndarray, start: int = 0) -> None:
        """Copy K/V for positions `[start, start + n)` in (from a prompt cache)."""
        n = k.shape[2]
        assert start <= self.length and start + n <= self.capacity and len(ids) == n
        self.k[:, :, start : start + n] = k
        self.v[:, :, start : start + n] = v
        self.tokens[start : start + n] = ids
        self.length = start + n

    @property
    def nbytes_touched(self) -> int:
        """Memory this buffer really holds (its pages are touched as positions are written)."""
        return 2 * self.k[:, :, : self.high].nbytes

    @property
    def nbytes_used(self) -> int:
        return 2 * self.k[:, :, : self.length].nbytes
