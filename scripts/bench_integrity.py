#!/usr/bin/env python3
"""What the on-disk checks cost: the checksum of the engine-ready copy at every start, the
prompt cache's save and checked load, and a warm start with and without the weight check.

Prints a table and writes JSON (--json PATH). Medians of --repeat runs; the checksums are
single-threaded numpy (BLAS is pinned to --threads for the warm starts). crc32 and sha256 of
the same bytes are timed beside ours for comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _warm_start(threads: int, check: bool) -> float:
    """Model.load() + warm_up() in a fresh process (the daemon's start before it listens)."""
    off = "" if check else "import engine.weights as w; w.verify = lambda *a, **k: None;"
    code = (f"import time,sys; sys.path.insert(0, {str(ROOT)!r}); t=time.perf_counter();"
            f"{off} from engine.runtime import Model; m=Model.load(); m.warm_up();"
            "print(time.perf_counter()-t)")
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), GEMMA_LSP_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache-mb", type=int, default=512, help="prompt cache size to save/load")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import numpy as np

    from engine.integrity import checksum
    from engine.prompt_cache import Node, PromptCache
    from engine.runtime import Model, pin_blas_threads

    pin_blas_threads(args.threads)
    model = Model.load()
    tensors = dict(model.files.tensors)
    nbytes = sum(a.nbytes for a in tensors.values())
    for a in tensors.values():  # page everything in first, as warm_up does
        checksum(a)
    res: dict[str, Any] = {"threads": args.threads, "model_bytes": nbytes,
                           "tensors": len(tensors)}
    res["model_checksum_s"] = _median(lambda: [checksum(a) for a in tensors.values()],
                                      args.repeat)
    res["model_crc32_s"] = _median(lambda: [zlib.crc32(a.reshape(-1).view(np.uint8).data)
                                            for a in tensors.values()], 1)
    res["model_sha256_s"] = _median(lambda: [hashlib.sha256(a.reshape(-1).view(np.uint8).data)
                                             for a in tensors.values()], 1)

    cfg = model.config
    cache = PromptCache(cfg.n_layers, cfg.kv_heads_max, cfg.head_dim_max, 1 << 40)
    per_token = 2 * cfg.n_layers * cfg.kv_heads_max * cfg.head_dim_max * 4
    rng = np.random.default_rng(0)
    tokens_left = (args.cache_mb << 20) // per_token
    while tokens_left > 0:  # 64 documents of random K/V hanging off the root
        n = min(tokens_left, max(1, ((args.cache_mb << 20) // per_token) // 64))
        shape = (cfg.n_layers, cfg.kv_heads_max, n, cfg.head_dim_max)
        node = Node(rng.integers(0, cfg.vocab_size, n), rng.standard_normal(shape, np.float32),
                    rng.standard_normal(shape, np.float32), cache.root)
        first = int(node.tokens[0])
        if first not in cache.root.children:
            cache.root.children[first] = node
            cache._count(node, +1)
        tokens_left -= n
    res["prompt_cache_bytes"] = cache.nbytes
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        path = Path(d) / "pc.safetensors"
        res["prompt_cache_save_s"] = _median(lambda: cache.save(path, "fp"), args.repeat)
        fresh = PromptCache(cfg.n_layers, cfg.kv_heads_max, cfg.head_dim_max, 1 << 40)
        res["prompt_cache_load_s"] = _median(lambda: fresh.load(path, "fp"), args.repeat)
        import engine.prompt_cache as pc

        real = pc.verify
        pc.verify = lambda *a, **k: None  # type: ignore[assignment]
        try:
            res["prompt_cache_load_unchecked_s"] = _median(lambda: fresh.load(path, "fp"),
                                                           args.repeat)
        finally:
            pc.verify = real

    res["warm_start_s"] = statistics.median(_warm_start(args.threads, True)
                                            for _ in range(args.repeat))
    res["warm_start_unchecked_s"] = statistics.median(_warm_start(args.threads, False)
                                                      for _ in range(args.repeat))
    gb = nbytes / 1e9
    print(f"engine-ready copy: {gb:.2f} GB in {len(tensors)} tensors, {args.threads} threads")
    print(f"  our checksum      {res['model_checksum_s']:.3f} s  "
          f"({gb / res['model_checksum_s']:.1f} GB/s)")
    print(f"  crc32             {res['model_crc32_s']:.3f} s")
    print(f"  sha256            {res['model_sha256_s']:.3f} s")
    print(f"  warm start        {res['warm_start_s']:.2f} s checked, "
          f"{res['warm_start_unchecked_s']:.2f} s unchecked")
    mb = cache.nbytes / 2**20
    print(f"prompt cache {mb:.0f} MB: save {res['prompt_cache_save_s']:.2f} s, load "
          f"{res['prompt_cache_load_s']:.2f} s checked, "
          f"{res['prompt_cache_load_unchecked_s']:.2f} s unchecked")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
