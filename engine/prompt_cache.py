"""The prompt cache: a radix tree over token ids whose nodes own K/V blocks for all layers.

Longest-prefix match finds what a new prompt can reuse wherever it diverges from earlier
ones; a memory budget with LRU eviction of unheld leaves bounds it; `save`/`load` persist it
(one safetensors file holding the tree, the K/V and their checksums, written atomically) under
a fingerprint that must match; `prune_saves` bounds the directory of saves.
"""

from __future__ import annotations

import json
import logging
import mmap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.integrity import (
    CHECKSUM_ALGO,
    atomic_path,
    checksums,
    remove_stale_temps,
    verify,
    write_safetensors,
)
from engine.kv_cache import KVCache

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # one safetensors file: tree + K/V + checksums


@dataclass(eq=False)
class Node:
    """An edge of the tree: `tokens` follow the parent's path; k/v hold their K/V."""

    tokens: np.ndarray  # (n,) int64
    k: np.ndarray  # (L, KV, n, hd)
    v: np.ndarray  # (L, KV, n, hd)
    parent: Node | None
    children: dict[int, Node] = field(default_factory=dict)  # first token -> child
    last_used: float = 0.0
    holds: int = 0  # running requests that use this node's K/V

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)


@dataclass
class Match:
    """The reusable prefix of a prompt: nodes root-first and how many tokens they cover."""

    nodes: list[Node]
    length: int  # tokens of the prompt covered (the last node may be used partially)


class PromptCache:
    def __init__(self, n_layers: int, n_kv: int, head_dim: int, budget_bytes: int) -> None:
        """`budget_bytes` bounds all K/V memory: this cache's nodes plus `reserved()`, the
        working K/V its owner holds outside it (the scheduler sets it to its buffers')."""
        if budget_bytes < 0:
            raise ValueError(f"prompt cache budget must be >= 0, got {budget_bytes}")
        self.shape = (n_layers, n_kv, head_dim)
        self.budget = budget_bytes
        self.reserved: Callable[[], int] = lambda: 0
        empty = np.zeros((n_layers, n_kv, 0, head_dim), dtype=np.float32)
        self.root = Node(np.zeros(0, dtype=np.int64), empty, empty, None)
        self.nbytes = 0  # these three are kept up to date so stats() need not walk the tree
        self.n_nodes = 0
        self.n_tokens = 0
        self.lookups = 0
        self.hit_tokens = 0
        self.lookup_tokens = 0

    # ------------------------------------------------------------------ queries

    def match(self, ids: np.ndarray) -> Match:
        """Longest cached prefix of `ids` (may end inside a node)."""
        node, pos, nodes = self.root, 0, []
        while pos < len(ids):
            child = node.children.get(int(ids[pos]))
            if child is None:
                break
            n = _common_len(child.tokens, ids[pos:])
            nodes.append(child)
            pos += n
            if n < len(child.tokens):
                break
            node = child
        return Match(nodes, pos)

    def lookup(self, ids: np.ndarray) -> Match:
        """`match` plus hit-rate accounting and LRU touch."""
        m = self.match(ids)
        now = time.monotonic()
        for node in m.nodes:
            node.last_used = now
        self.lookups += 1
        self.hit_tokens += m.length
        self.lookup_tokens += len(ids)
        return m

    def copy_into(self, m: Match, kv: KVCache, limit: int) -> int:
        """Extend `kv` (which holds a prefix of the same prompt) with matched positions.

        Copies positions kv.length .. min(m.length, limit) only; returns the new kv.length.
        """
        end = min(m.length, limit)
        pos = 0  # where the current node starts
        for node in m.nodes:
            a, b = max(kv.length, pos), min(end, pos + len(node.tokens))
            if a < b:
                s = slice(a - pos, b - pos)
                kv.load_prefix(node.tokens[s], node.k[:, :, s], node.v[:, :, s], start=a)
            pos += len(node.tokens)
            if pos >= end:
                break
        return kv.length

    # ------------------------------------------------------------------ updates

    def insert(self, kv: KVCache, upto: int | None = None) -> None:
        """Store K/V of `kv.tokens[:upto]` (default: all valid); copies only what is new."""
        end = kv.length if upto is None else upto
        ids = kv.tokens[:end]
        node, pos = self.root, 0
        now = time.monotonic()
        while pos < end:
            child = node.children.get(int(ids[pos]))
            if child is None:
                new = Node(
                    ids[pos:end].copy(),
                    _own(kv.k[:, :, pos:end]),
                    _own(kv.v[:, :, pos:end]),
                    node,
                    last_used=now,
                )
                node.children[int(ids[pos])] = new
                self._count(new, +1)
                break
            n = _common_len(child.tokens, ids[pos:end])
            if n < len(child.tokens):
                if pos + n == end:
                    child.last_used = now
                    break  # the prompt ends inside this edge: nothing new to store
                child = self._split(child, n)
            child.last_used = now
            node, pos = child, pos + n
        self.evict()

    def _split(self, node: Node, n: int) -> Node:
        """Cut `node` after n tokens; returns the new upper part (its parent's child now)."""
        assert 0 < n < len(node.tokens) and node.parent is not None
        upper = Node(
            node.tokens[:n].copy(),
            _own(node.k[:, :, :n]),
            _own(node.v[:, :, :n]),
            node.parent,
            last_used=node.last_used,
        )  # no holds of its own: a held node's ancestors are never leaves, so never evicted
        node.parent.children[int(node.tokens[0])] = upper
        node.tokens = node.tokens[n:].copy()
        node.k = _own(node.k[:, :, n:])
        node.v = _own(node.v[:, :, n:])
        node.parent = upper
        upper.children[int(node.tokens[0])] = node
        self.n_nodes += 1
        return upper

    def hold(self, m: Match) -> None:
        for node in m.nodes:
            node.holds += 1

    def release(self, m: Match) -> None:
        for node in m.nodes:
            node.holds -= 1
            assert node.holds >= 0

    def evict(self, budget: int | None = None) -> int:
        """Drop least-recently-used unheld leaves until under budget (by default what the
        working K/V leaves of `budget_bytes`); returns bytes freed."""
        limit = max(0, self.budget - self.reserved()) if budget is None else budget
        freed = 0
        if self.nbytes <= limit:
            return 0
        leaves = sorted(
            (n for n in self._nodes() if not n.children and n.holds == 0),
            key=lambda n: n.last_used,
        )
        while self.nbytes > limit and leaves:
            leaf = leaves.pop(0)
            parent = leaf.parent
            assert parent is not None
            del parent.children[int(leaf.tokens[0])]
            self._count(leaf, -1)
            freed += leaf.nbytes
            if parent is not self.root and not parent.children and parent.holds == 0:
                # the parent became a leaf: insert it in LRU order
                idx = next(
                    (i for i, x in enumerate(leaves) if x.last_used > parent.last_used),
                    len(leaves),
                )
                leaves.insert(idx, parent)
        return freed

    def clear(self) -> None:
        self.root.children.clear()
        self.nbytes = self.n_nodes = self.n_tokens = 0

    def _count(self, node: Node, sign: int) -> None:
        self.nbytes += sign * node.nbytes
        self.n_nodes += sign
        self.n_tokens += sign * len(node.tokens)

    def _nodes(self) -> Iterator[Node]:
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def stats(self) -> dict[str, float | int]:
        return {
            "entries": self.n_nodes,
            "tokens": self.n_tokens,
            "bytes": self.nbytes,
            "budget_bytes": self.budget,
            "lookups": self.lookups,
            "hit_rate": self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0,
        }

    # ------------------------------------------------------------------ persistence

    def save(self, path: Path, fingerprint: str) -> None:
        """Write the cache as one safetensors file, atomically (see engine.integrity).

        The tree (tokens and parent of every node) and the K/V are tensors of the same file,
        and the header carries a checksum of each: an index cannot meet another save's data.
        """
        nodes = list(self._nodes())
        ids = {id(n): i for i, n in enumerate(nodes)}
        tensors = {"parents": np.array([ids.get(id(n.parent), -1) for n in nodes],
                                       dtype=np.int64)}
        for i, n in enumerate(nodes):
            tensors[f"{i}.tokens"] = np.ascontiguousarray(n.tokens, dtype=np.int64)
            tensors[f"{i}.k"] = np.ascontiguousarray(n.k)
            tensors[f"{i}.v"] = np.ascontiguousarray(n.v)
        meta = {"format": str(CACHE_FORMAT), "fingerprint": fingerprint,
                "shape": json.dumps(list(self.shape)), "checksum_algo": CHECKSUM_ALGO,
                "checksums": json.dumps(checksums(tensors))}
        with atomic_path(path) as tmp:
            write_safetensors(tmp, tensors, meta)
        for old in (_index_path(path),):  # what the format-1 save wrote beside it
            if old.exists():
                old.unlink()

    def load(self, path: Path, fingerprint: str) -> bool:
        """Replace the contents with a saved cache if its fingerprint matches and every tensor
        passes its checksum; else keep empty.

        Returns whether anything was loaded; a mismatch or a corrupt file is a warning.
        """
        from engine.weights import mmap_safetensors

        if not path.exists():
            return False
        try:
            tensors, meta = mmap_safetensors(path)
            if meta.get("format") != str(CACHE_FORMAT) or "checksums" not in meta:
                log.warning("prompt cache %s has an older format; ignoring it", path)
                return False
            if meta.get("fingerprint") != fingerprint:
                log.warning("prompt cache %s was made for another model/engine; ignoring it", path)
                return False
            if meta.get("checksum_algo") != CHECKSUM_ALGO:
                raise ValueError(f"unknown checksum {meta.get('checksum_algo')!r}")
            if json.loads(meta.get("shape", "null")) != list(self.shape):
                raise ValueError(f"K/V shape {meta.get('shape')} is not {list(self.shape)}")
            verify(tensors, json.loads(meta["checksums"]), path)
            parents = tensors["parents"]
            nodes: list[Node] = []
            self.clear()
            for i in range(len(parents)):
                k = _own(tensors[f"{i}.k"])  # copy out of the map: nodes own their K/V
                v = _own(tensors[f"{i}.v"])
                toks = np.array(tensors[f"{i}.tokens"])
                if k.shape != (self.shape[0], self.shape[1], len(toks), self.shape[2]) \
                        or v.shape != k.shape:
                    raise ValueError(f"node {i} has K/V shapes {k.shape}, {v.shape}")
                pi = int(parents[i])
                if pi >= i or len(toks) == 0:
                    raise ValueError(f"node {i} has a bad parent or no tokens")
                parent = self.root if pi < 0 else nodes[pi]
                if int(toks[0]) in parent.children:
                    raise ValueError(f"node {i} duplicates a sibling")
                node = Node(toks, k, v, parent)
                parent.children[int(toks[0])] = node
                nodes.append(node)
                self._count(node, +1)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            log.warning("prompt cache %s is corrupt (%s); starting empty", path, e)
            self.clear()
            return False
        self.evict()
        return True


def prune_saves(directory: Path, keep: Path, max_others: int = 1) -> list[Path]:
    """Bound the prompt-cache directory: keep `keep`, the `max_others` most recent saves of
    other fingerprints, and nothing else (format-1 index files, older saves, stale temps)."""
    removed = remove_stale_temps(directory)
    try:
        saves = [p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")
                 and p != keep]
    except OSError:
        return removed
    current = sorted((p for p in saves if p.suffix == ".safetensors"),
                     key=lambda p: p.stat().st_mtime, reverse=True)[:max_others]
    for p in saves:
        if p in current:
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError as e:
            log.warning("cannot prune %s: %s", p, e)
    return removed


def _index_path(path: Path) -> Path:
    return path.with_name(path.name + ".index")


def _common_len(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _own(a: np.ndarray) -> np.ndarray:
    """A copy of `a` in an anonymous mapping of its own, unmapped when the node goes.

    Nodes are often a keystroke's few tokens (18 KB a token for the 270M model): from the
    heap they leave holes that eviction cannot give back, and under 8 editor windows the
    engine's RSS grew ~400 MB past its K/V budget that way."""
    if a.nbytes == 0:
        return a.copy()
    out = np.frombuffer(mmap.mmap(-1, a.nbytes), dtype=a.dtype).reshape(a.shape)
    out[...] = a
    return out
