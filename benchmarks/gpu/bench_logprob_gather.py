#!/usr/bin/env python
"""GPU benchmark: hfpatch's Triton logprob_gather vs the torch paths, on one CUDA device.

    python benchmarks/gpu/bench_logprob_gather.py --peak-gbps 4800          # H200 HBM3e
    python benchmarks/gpu/bench_logprob_gather.py --quick --backward --json out.json

Compares, side by side in one process with the runs interleaved and the warm-ups discarded:

- ``triton``    hfpatch's fused kernel (``backend="triton"``)
- ``reference`` hfpatch's pure-torch reference (``backend="torch"``; includes its index range check,
                one device sync)
- ``naive``     what users write: ``log_softmax(logits.float(), -1).gather(-1, index)``

Reported per case: median ms, effective GB/s (the bytes the operation must move at least: the
logits once, the index, the two float32 outputs; the same figure for every method so the numbers
compare) and, with ``--peak-gbps``, that bandwidth as a fraction of the device's peak. The L2 cache
is flushed before every timed call, so small cases are not served from cache.

Refuses to run without CUDA, or under TRITON_INTERPRET=1 (that would time the CPU interpreter).
Not a test: pytest does not collect it (the file name does not start with ``test_``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16,fp16,fp32 (default bf16,fp32)")
    p.add_argument("--n", default="1,64,512,4096", help="rows N, comma list (default 1,64,512,4096)")
    p.add_argument("--v", default="32000,50257,128256,152064,262144",
                   help="vocab sizes V, comma list (default 32000,50257,128256,152064,262144)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="device peak memory bandwidth in GB/s (e.g. 4800 for H200, 3350 for H100 SXM) "
                        "to report the fraction of peak")
    p.add_argument("--backward", action="store_true", help="also time forward+backward (triton vs naive)")
    p.add_argument("--iters", type=int, default=30, help="timed calls per method and case (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="discarded calls per method and case (default 5)")
    p.add_argument("--quick", action="store_true", help="small grid: N 1,512,4096 x V 32000,262144")
    p.add_argument("--mem-fraction", type=float, default=0.7,
                   help="skip cases whose estimated peak memory exceeds this fraction of free memory")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.v = "1,512,4096", "32000,262144"
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        p.error(f"unknown dtype(s) {bad}; use {', '.join(DTYPES)}")
    return args


def refuse_unless_gpu():
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y"):
        sys.exit("bench_logprob_gather: TRITON_INTERPRET is set; this would time Triton's CPU "
                 "interpreter. Unset it and run on a CUDA machine.")
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_logprob_gather: no CUDA device is available (torch.cuda.is_available() is "
                 "False). This benchmark needs an NVIDIA/AMD GPU; the CPU correctness tests are in "
                 "tests/test_kernels.py.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench_logprob_gather: triton is not installed (pip install 'hfpatch[triton]').")


def main(argv=None):
    args = parse_args(argv)
    refuse_unless_gpu()

    import torch
    import triton

    # Run from a checkout without installing hfpatch.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from hfpatch.kernels import logprob_gather

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    machine = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or torch.version.hip,
        "host": platform.node(),
        "peak_gbps": args.peak_gbps,
    }
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))

    # Larger than any L2 (H200: 50 MB) so that zeroing it evicts the previous call's data.
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=dev)

    def naive(x, i):
        return torch.log_softmax(x.float(), -1).gather(-1, i.unsqueeze(-1)).squeeze(-1)

    def fwd_methods(x, i):
        return {
            "triton": lambda: logprob_gather(x, i, backend="triton"),
            "reference": lambda: logprob_gather(x, i, backend="torch"),
            "naive": lambda: naive(x, i),
        }

    def bwd_methods(x, i):
        def run(fn):
            def go():
                x.grad = None
                fn(x, i).sum().backward()
            return go
        return {
            "triton+bwd": run(lambda a, b: logprob_gather(a, b, backend="triton")),
            "naive+bwd": run(naive),
        }

    def time_interleaved(methods):
        """Median ms per method; methods alternate call by call so drift hits all equally."""
        for _ in range(args.warmup):
            for fn in methods.values():
                fn()
        times = {name: [] for name in methods}
        for _ in range(args.iters):
            for name, fn in methods.items():
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
        return {name: statistics.median(t) for name, t in times.items()}

    results = []
    header = f"{'dtype':>5} {'N':>5} {'V':>7} {'method':>11} {'ms':>9} {'GB/s':>8}"
    header += f" {'%peak':>6}" if args.peak_gbps else ""
    header += f" {'speedup':>8} {'max|err|':>9}"
    print(header)
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, DTYPES[dname])
        for v in (int(s) for s in args.v.split(",")):
            for n in (int(s) for s in args.n.split(",")):
                elem = torch.finfo(dtype).bits // 8
                logits_bytes = n * v * elem
                # naive materialises a float32 copy and its log-softmax; backward adds grads.
                need = logits_bytes + 2 * n * v * 4 + (2 * n * v * 4 if args.backward else 0)
                free, _ = torch.cuda.mem_get_info()
                if need > args.mem_fraction * free:
                    print(f"{dname:>5} {n:>5} {v:>7} skipped: needs ~{need / 2**30:.1f} GiB")
                    continue
                torch.manual_seed(0)
                x = (torch.randn(n, v, device=dev) * 4).to(dtype)
                i = torch.randint(0, v, (n,), device=dev)
                err = (logprob_gather(x, i, backend="triton") - naive(x, i)).abs().max().item()
                moved = logits_bytes + n * 8 + n * 8  # logits, int64 index, logp + lse (float32)
                timed = time_interleaved(fwd_methods(x, i))
                if args.backward:
                    x.requires_grad_(True)
                    timed.update(time_interleaved(bwd_methods(x, i)))
                    x.requires_grad_(False)
                for method, ms in timed.items():
                    # fwd+bwd moves the logits three times: forward read, backward read, grad write.
                    b = moved + (2 * logits_bytes if method.endswith("+bwd") else 0)
                    gbps = b / ms / 1e6
                    base = timed["naive+bwd" if method.endswith("+bwd") else "naive"]
                    row = {"dtype": dname, "N": n, "V": v, "method": method, "ms": ms, "GBps": gbps,
                           "frac_peak": gbps / args.peak_gbps if args.peak_gbps else None,
                           "speedup_vs_naive": base / ms, "max_abs_err": err}
                    results.append(row)
                    line = f"{dname:>5} {n:>5} {v:>7} {method:>11} {ms:>9.4f} {gbps:>8.1f}"
                    line += f" {100 * row['frac_peak']:>5.1f}%" if args.peak_gbps else ""
                    line += f" {row['speedup_vs_naive']:>7.2f}x {err:>9.2e}"
                    print(line)
                del x, i
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
