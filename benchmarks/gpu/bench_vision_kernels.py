#!/usr/bin/env python
"""Benchmark of the visual-token pruning kernels, at CLIP-L/14 (LLaVA-1.5) shapes.

    python benchmarks/gpu/bench_vision_kernels.py --peak-gbps 4800        # H200: Triton vs torch vs sdpa
    python benchmarks/gpu/bench_vision_kernels.py --device cpu --quick     # CPU: the torch paths only

Side by side in one process, runs interleaved, warm-ups discarded:

- ``attention_with_column_sums`` (B images x 16 heads x 577 tokens x 64 dims): hfpatch's Triton kernel, its
  torch reference (one matmul, softmax, column sum: what eager attention + a sum costs) and sdpa without the
  sums (the attention a vision tower runs today; what the sums cost on top of it). Bandwidth is counted for
  q, k, v, the output and the sums once each, the least the operation must move.
- ``diverse_select`` (576 projected tokens of width 4096, budgets 64 / 192): the Triton path (distance matrix,
  one launch for the greedy loop, sort) against the torch reference (a Python loop of ``budget`` steps).

On CPU the Triton rows are skipped (the interpreter would time numpy). Not a test: pytest does not collect it.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--batches", default="1,8", help="images per call, comma list (default 1,8)")
    p.add_argument("--budgets", default="64,192", help="diverse_select budgets of 576 (default 64,192)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-gbps", type=float, default=None, help="device peak bandwidth (GB/s) for the fraction")
    p.add_argument("--quick", action="store_true", help="batch 1, budget 64, 5 iterations")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.budgets, args.iters, args.warmup = "1", "64", 5, 1
    return args


def _timer(device):
    import torch

    def run(fn):
        if device == "cuda":
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
        else:
            start = time.perf_counter()
            fn()
        return (time.perf_counter() - start) * 1e3

    return run


def _interleaved(methods: dict, iters: int, warmup: int, timed) -> dict[str, float]:
    samples = {name: [] for name in methods}
    for i in range(warmup + iters):
        for name, fn in methods.items():
            ms = timed(fn)
            if i >= warmup:
                samples[name].append(ms)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; run with --device cpu for the torch paths", file=sys.stderr)
        return 2
    from hfpatch.kernels import attention_with_column_sums, diverse_select

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device, timed = args.device, _timer(args.device)
    use_triton = device == "cuda"
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        q, k, v = (torch.randn(batch, 16, 577, 64, device=device, dtype=dtype) for _ in range(3))
        methods = {"torch reference": lambda: attention_with_column_sums(q, k, v, 0.125, backend="torch"),
                   "sdpa (no sums)": lambda: F.scaled_dot_product_attention(q, k, v, scale=0.125)}
        if use_triton:
            methods["triton"] = lambda: attention_with_column_sums(q, k, v, 0.125, backend="triton")
        moved = 4 * q.numel() * q.element_size() + batch * 577 * 4
        for name, ms in _interleaved(methods, args.iters, args.warmup, timed).items():
            row = {"op": "attention_with_column_sums", "batch": batch, "method": name, "ms": round(ms, 4),
                   "GB/s": round(moved / ms / 1e6, 1)}
            if args.peak_gbps:
                row["fraction of peak"] = round(moved / ms / 1e6 / args.peak_gbps, 4)
            rows.append(row)
        features = torch.randn(batch, 576, 4096, device=device, dtype=dtype)
        for budget in (int(b) for b in args.budgets.split(",")):
            methods = {"torch reference": lambda: diverse_select(features, budget, backend="torch")}
            if use_triton:
                methods["triton"] = lambda: diverse_select(features, budget, backend="triton")
            for name, ms in _interleaved(methods, args.iters, args.warmup, timed).items():
                rows.append({"op": f"diverse_select budget {budget}", "batch": batch, "method": name,
                             "ms": round(ms, 4)})
    machine = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"# {machine}, torch {torch.__version__}, {args.dtype}")
    print("| op | images | method | ms | GB/s | fraction of peak |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['op']} | {r['batch']} | {r['method']} | {r['ms']} | {r.get('GB/s', '')} | "
              f"{r.get('fraction of peak', '')} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "dtype": args.dtype, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
