#!/usr/bin/env python3
"""Engine benchmark: load times, prefill/decode speed, peak RSS; llama.cpp side by side if present.

Prints a table and writes JSON (--json PATH). Times are medians of --repeat runs, measured in
one process with BLAS pinned to --threads. Decode is also put against its memory-bandwidth
ceiling: every weight is read once per token, so tok/s <= GEMV bytes/s / weight bytes. When
llama-cpp-python is installed (extra `bench`), the same GGUF runs with the same thread count in
the same run and ratios are printed.

`--shape gemma3-12b` instead writes a random-weight GGUF in that model's shape
(scripts/shape_gguf.py: Q4_K_M-like types, several GB in a scratch dir) and measures both
engines on it, each in a fresh process: load (cold: the engine-ready copy built; warm), decode
at the start of a `--ctx`-token context, RSS, and what the K/V of a full context would add.
`--layers N` keeps the shape's matrices but fewer layers (a quicker run, or one that fits a
machine's memory). Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from shape_gguf import SHAPES  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "bench" / "typing_base.py.txt"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_in_subprocess(cache: Path, threads: int) -> tuple[float, float]:
    """Time a start in a fresh process (so nothing is already mapped): Model.load(), its
    quantized kernels built, one token run; and that process's peak RSS (MB) after 32
    decoded tokens at a 1,024-token context."""
    code = (
        f"import time,sys,resource; sys.path.insert(0, {str(ROOT)!r}); t=time.perf_counter();"
        "from engine.runtime import Model, pin_blas_threads;"
        f"pin_blas_threads({threads}); m=Model.load(); m.build_quantized({threads});"
        "m.warm_up(); print(time.perf_counter()-t);"
        "from engine.generate import prefill, decode_one;"
        "kv=m.new_kv(1100); prefill(m, kv, list(range(1000, 2024)));"
        "[decode_one(m, kv, 1000 + i) for i in range(32)];"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    )
    env = dict(os.environ, GEMMA_LSP_CACHE=str(cache), OPENBLAS_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    lines = out.stdout.strip().splitlines()
    return float(lines[-2]), float(lines[-1])


def _prompt_ids(model: Any, n: int) -> list[int]:
    text = SAMPLE.read_text() if SAMPLE.exists() else "def f(x):\n    return x\n" * 200
    ids: list[int] = model.tokenizer.encode(text * (1 + n // 1000))
    return ids[:n]


def bench_ours(threads: int, repeat: int, cold: bool) -> dict[str, Any]:
    from engine.generate import decode_one, prefill
    from engine.runtime import Model, pin_blas_threads

    res: dict[str, Any] = {}
    if cold:  # GGUF -> engine-ready copy, in a scratch cache dir, then a warm start from it
        scratch = Path(tempfile.mkdtemp(prefix="gemma-lsp-bench-"))
        try:
            res["cold_load_s"], _ = _load_in_subprocess(scratch, threads)
            res["warm_load_s"], res["serving_peak_rss_mb"] = _load_in_subprocess(scratch,
                                                                                 threads)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    blas, n = pin_blas_threads(threads)
    res["blas"] = blas
    res["blas_threads"] = n
    t0 = time.perf_counter()
    model = Model.load()
    res["load_s_this_process"] = time.perf_counter() - t0
    res["quantized_kernels_build_s"] = model.build_quantized(n)
    model.build_kernels(n)  # as the daemon does once it serves (in the background there)
    res["kernels"] = model.kernel_status()
    res["weights"] = model.weight_status()

    for n_tok in (128, 512, 1024):
        ids = _prompt_ids(model, n_tok)
        times = []
        for _ in range(repeat):
            kv = model.new_kv(n_tok + 1)
            t = time.perf_counter()
            prefill(model, kv, ids)
            times.append(time.perf_counter() - t)
        res[f"prefill_tok_s_{n_tok}"] = n_tok / statistics.median(times)

    for ctx in (0, 1500):
        ids = _prompt_ids(model, ctx + 1)
        kv = model.new_kv(ctx + 80)
        prefill(model, kv, ids)
        steps = 48
        t = time.perf_counter()
        tok = ids[-1]
        for _ in range(steps):
            logits = decode_one(model, kv, tok)
            tok = int(logits.argmax())
        res[f"decode_tok_s_ctx{ctx}"] = steps / (time.perf_counter() - t)
    res["decode_tok_s"] = res["decode_tok_s_ctx0"]
    res |= _decode_ceiling(model, res["decode_tok_s"])
    res["peak_rss_mb"] = _peak_rss_mb()
    return res


def _decode_ceiling(model: Any, decode_tok_s: float) -> dict[str, float]:
    """What memory bandwidth allows: decoding a token reads every weight once, so the tokens
    per second cannot exceed (bytes/s of an fp32 GEMV over 256 MB) / (weight bytes)."""
    import numpy as np

    weight_bytes = int(model.weight_status()["weight_bytes"])
    m = np.ones((640, 1 << 17), dtype=np.float32)  # 320 MB, the LM head's shape class
    x = np.ones((1, 640), dtype=np.float32)
    x @ m  # pages in
    times = []
    for _ in range(9):
        t = time.perf_counter()
        x @ m
        times.append(time.perf_counter() - t)
    gb_s = m.nbytes / statistics.median(times) / 1e9
    ceiling = gb_s * 1e9 / weight_bytes
    return {"weight_gb_per_token": weight_bytes / 1e9, "gemv_gb_s": gb_s,
            "decode_ceiling_tok_s": ceiling, "decode_share_of_ceiling": decode_tok_s / ceiling}


def bench_llama_cpp(threads: int, repeat: int) -> dict[str, Any] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from engine.weights import embedded_model_path

    llm = Llama(str(embedded_model_path()), n_ctx=2048, n_threads=threads, verbose=False)
    res: dict[str, Any] = {}
    text = SAMPLE.read_text() if SAMPLE.exists() else "def f(x):\n    return x\n" * 200
    all_ids = llm.tokenize((text * 2).encode(), add_bos=True)
    for n_tok in (128, 512, 1024):
        times = []
        for _ in range(repeat):
            llm.reset()
            t = time.perf_counter()
            llm.eval(all_ids[:n_tok])
            times.append(time.perf_counter() - t)
        res[f"prefill_tok_s_{n_tok}"] = n_tok / statistics.median(times)
    llm.reset()
    llm.eval(all_ids[:1])
    t = time.perf_counter()
    for _ in range(48):
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
    res["decode_tok_s"] = 48 / (time.perf_counter() - t)
    return res


_SHAPE_OURS = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
from engine.runtime import Model, pin_blas_threads
from engine.generate import prefill, decode_one
pin_blas_threads({threads})
m = Model.load({path!r})
load_s = time.perf_counter() - t0
build_s = m.build_quantized({threads})
kv = m.new_kv({ctx})  # the whole context allocated (zeroed pages count once touched)
ids = list(range(1000, 1000 + {prompt}))
t = time.perf_counter(); logits = prefill(m, kv, ids); prefill_s = time.perf_counter() - t
tok = int(logits.argmax()); times = []
for _ in range({steps}):
    t = time.perf_counter(); tok = int(decode_one(m, kv, tok).argmax())
    times.append(time.perf_counter() - t)
times.sort()
rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
print(json.dumps(dict(load_s=load_s, kernels_build_s=build_s,
    prefill_tok_s={prompt} / prefill_s, decode_tok_s=1 / times[len(times) // 2],
    rss_mb=rss, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    weights=m.weight_status(), kv_mb_at_ctx=m.config.kv_bytes_per_token * {ctx} / 2**20)))
"""

_SHAPE_LLAMA = """
import json, resource, time
from llama_cpp import Llama
t0 = time.perf_counter()
llm = Llama({path!r}, n_ctx={ctx}, n_threads={threads}, n_batch=512, verbose=False)
load_s = time.perf_counter() - t0
ids = list(range(1000, 1000 + {prompt}))
t = time.perf_counter(); llm.eval(ids); prefill_s = time.perf_counter() - t
times = []
for _ in range({steps}):
    t = time.perf_counter(); llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
    times.append(time.perf_counter() - t)
times.sort()
rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
print(json.dumps(dict(load_s=load_s, prefill_tok_s={prompt} / prefill_s,
    decode_tok_s=1 / times[len(times) // 2], rss_mb=rss,
    peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def _run_json(code: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-4000:])
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def bench_shape(args: argparse.Namespace) -> dict[str, Any]:
    """Both engines on a random-weight GGUF of `args.shape` (scripts/shape_gguf.py): a cold
    start (the engine-ready copy built), a warm one, decode at the start of a context of
    `args.ctx` tokens allocated; each in a fresh process, so RSS is that run's alone."""
    from shape_gguf import write_shape_gguf

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="gemma-lsp-shape-"))
    scratch.mkdir(parents=True, exist_ok=True)
    gguf_path = scratch / f"{args.shape}-{args.layers or SHAPES[args.shape].n_layers}.gguf"
    res: dict[str, Any] = {"shape": args.shape, "layers": args.layers
                           or SHAPES[args.shape].n_layers, "ctx": args.ctx,
                           "threads": args.threads}
    if not gguf_path.exists():
        t = time.perf_counter()
        res["gguf_bytes"] = write_shape_gguf(gguf_path, args.shape, args.layers)
        res["gguf_write_s"] = time.perf_counter() - t
        print(f"wrote {gguf_path} ({res['gguf_bytes'] / 1e9:.2f} GB) in "
              f"{res['gguf_write_s']:.0f} s")
    res["gguf_bytes"] = gguf_path.stat().st_size
    env = dict(os.environ, GEMMA_LSP_CACHE=str(scratch / "cache"),
               OPENBLAS_NUM_THREADS=str(args.threads))
    fill = dict(root=str(ROOT), path=str(gguf_path), threads=args.threads, ctx=args.ctx,
                prompt=32, steps=args.steps)
    try:
        res["ours_cold"] = _run_json(_SHAPE_OURS.format(**fill), env)
        print("ours, cold:", json.dumps(res["ours_cold"]))
        res["ours"] = _run_json(_SHAPE_OURS.format(**fill), env)
        print("ours, warm:", json.dumps(res["ours"]))
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            res["llama_cpp"] = None
            print("  (llama-cpp-python not installed: no side-by-side ratios)")
        else:
            res["llama_cpp"] = _run_json(_SHAPE_LLAMA.format(**fill), env)
            print("llama.cpp:", json.dumps(res["llama_cpp"]))
            for key in ("decode_tok_s", "prefill_tok_s", "rss_mb"):
                res[f"{key}_vs_llamacpp"] = res["ours"][key] / res["llama_cpp"][key]
                print(f"  {key:16s} ours {res['ours'][key]:10.2f}  llama.cpp "
                      f"{res['llama_cpp'][key]:10.2f}  ratio {res[f'{key}_vs_llamacpp']:.2f}")
        ours = res["ours"]
        res["ours_rss_with_full_kv_mb"] = ours["rss_mb"] + ours["kv_mb_at_ctx"]
        print(f"  ours: RSS {ours['rss_mb']:.0f} MB + K/V at {args.ctx} tokens "
              f"{ours['kv_mb_at_ctx']:.0f} MB = {res['ours_rss_with_full_kv_mb']:.0f} MB")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-cold", action="store_true", help="skip the cold/warm load runs")
    ap.add_argument("--shape", choices=sorted(SHAPES),
                    help="instead: a random-weight GGUF of this shape (several GB on disk)")
    ap.add_argument("--layers", type=int, help="with --shape: fewer layers than the shape's")
    ap.add_argument("--ctx", type=int, default=8192, help="with --shape: context allocated")
    ap.add_argument("--steps", type=int, default=8, help="with --shape: tokens decoded")
    ap.add_argument("--scratch", type=Path, help="with --shape: where the files go")
    ap.add_argument("--keep", action="store_true", help="with --shape: keep the files")
    args = ap.parse_args()

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.shape:
        out = bench_shape(args)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return 0

    ours = bench_ours(args.threads, args.repeat, cold=not args.no_cold)
    if args.json:  # now, in case the llama.cpp run below crashes
        args.json.write_text(json.dumps(dict(ours, llama_cpp=None), indent=1))
    print(f"BLAS: {ours['blas']}, {ours['blas_threads']} threads")
    for key, value in ours.items():
        if isinstance(value, float):
            print(f"  {key:24s} {value:10.2f}")
    theirs = bench_llama_cpp(args.threads, args.repeat)
    if theirs is None:
        print("  (llama-cpp-python not installed: no side-by-side ratios)")
    else:
        print("llama.cpp (llama-cpp-python, same GGUF, same threads)   ours/llama.cpp")
        for key, value in theirs.items():
            print(f"  {key:24s} {value:10.2f}   {ours[key] / value:.2f}")
    out = dict(ours, llama_cpp=theirs)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
