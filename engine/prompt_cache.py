"""The prompt cache: a radix tree over token ids whose nodes own K/V blocks for all layers.

Longest-prefix match finds what a new prompt can reuse wherever it diverges from earlier
ones; a memory budget with LRU eviction of unheld leaves bounds it; `save`/`load` persist it
(safetensors + msgpack index, written atomically) under a fingerprint that must match.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from engine.kv_cache import KVCache

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


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
        if budget_bytes < 0:
            raise ValueError(f"prompt cache budget must be >= 0, got {budget_bytes}")
        self.shape = (n_layers, n_kv, head_dim)
        self.budget = budget_bytes
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
                    kv.k[:, :, pos:end].copy(),
                    kv.v[:, :, pos:end].copy(),
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
            node.k[:, :, :n].copy(),
            node.v[:, :, :n].copy(),
            node.parent,
            last_used=node.last_used,
            holds=node.holds,
        )
        node.parent.children[int(node.tokens[0])] = upper
        node.tokens = node.tokens[n:].copy()
        node.k = node.k[:, :, n:].copy()
        node.v = node.v[:, :, n:].copy()
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
        """Drop least-recently-used unheld leaves until under budget; returns bytes freed."""
        limit = self.budget if budget is None else budget
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
        """Write `path` (safetensors) and `path.index` (msgpack) atomically."""
        from safetensors.numpy import save_file

        nodes = list(self._nodes())
        ids = {id(n): i for i, n in enumerate(nodes)}
        index = {
            "format": CACHE_FORMAT,
            "fingerprint": fingerprint,
            "shape": list(self.shape),
            "nodes": [
                {"parent": ids.get(id(n.parent), -1), "tokens": n.tokens.tolist()} for n in nodes
            ],
        }
        tensors = {}
        for i, n in enumerate(nodes):
            tensors[f"{i}.k"] = np.ascontiguousarray(n.k)
            tensors[f"{i}.v"] = np.ascontiguousarray(n.v)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cache-", suffix=".tmp")
        os.close(fd)
        fd2, tmp_index = tempfile.mkstemp(dir=path.parent, prefix=".index-", suffix=".tmp")
        try:
            save_file(tensors, tmp, metadata={"fingerprint": fingerprint})
            with os.fdopen(fd2, "wb") as f:
                f.write(msgpack.packb(index))
            os.replace(tmp, path)
            os.replace(tmp_index, _index_path(path))
        finally:
            for t in (tmp, tmp_index):
                if os.path.exists(t):
                    os.unlink(t)

    def load(self, path: Path, fingerprint: str) -> bool:
        """Replace the contents with a saved cache if its fingerprint matches; else keep empty.

        Returns whether anything was loaded; a mismatch or a corrupt file is a log line.
        """
        from engine.weights import mmap_safetensors

        index_path = _index_path(path)
        if not path.exists() or not index_path.exists():
            return False
        try:
            index = msgpack.unpackb(index_path.read_bytes(), raw=False)
            if index.get("fingerprint") != fingerprint or index.get("format") != CACHE_FORMAT:
                log.warning("prompt cache %s was made for another model/engine; ignoring it", path)
                return False
            tensors, meta = mmap_safetensors(path)
            if meta.get("fingerprint") != fingerprint:
                raise ValueError("index and data fingerprints differ")
            nodes: list[Node] = []
            self.clear()
            for i, entry in enumerate(index["nodes"]):
                k = np.array(tensors[f"{i}.k"])  # copy out of the map: nodes own their K/V
                v = np.array(tensors[f"{i}.v"])
                toks = np.asarray(entry["tokens"], dtype=np.int64)
                if k.shape != (self.shape[0], self.shape[1], len(toks), self.shape[2]):
                    raise ValueError(f"node {i} has K shape {k.shape}")
                pi = int(entry["parent"])
                if pi >= i or len(toks) == 0:
                    raise ValueError(f"node {i} has a bad parent or no tokens")
                parent = self.root if pi < 0 else nodes[pi]
                node = Node(toks, k, v, parent)
                parent.children[int(toks[0])] = node
                nodes.append(node)
                self._count(node, +1)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            log.warning("prompt cache %s is corrupt (%s); starting empty", path, e)
            self.clear()
            return False
        except Exception as e:  # msgpack raises its own exception types
            log.warning("prompt cache %s is unreadable (%s); starting empty", path, e)
            self.clear()
            return False
        self.evict()
        return True


def _index_path(path: Path) -> Path:
    return path.with_name(path.name + ".index")


def _common_len(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n
