"""GPU benchmark of the sparse decode kernels (run on a CUDA machine; prints one table).

For each context length S (32k-128k) and index-set size N: correctness of the Triton kernels against the
torch references, then median times of
  * sparse_decode_attention (Triton, no gather) vs the reference (torch gather + matmul) vs full sdpa over S,
  * group_attention_scores (Triton, two passes over K) vs the reference,
with the fraction of the GPU's memory bandwidth reached (bytes that must be read / time / peak).
Shapes follow Llama-3-8B decode: 32 query heads, 8 KV heads, head dim 128, bf16.

    python benchmarks/gpu/bench_sparse_decode.py [--peak-gbs 4800] [--batch 1]
"""
from __future__ import annotations

import argparse
import json

import torch

from hfpatch.kernels import (
    group_attention_scores,
    group_attention_scores_reference,
    sparse_decode_attention,
    sparse_decode_attention_reference,
)


def bench(fn, warmup=5, iters=30):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak-gbs", type=float, default=4800.0, help="peak memory bandwidth (H200: 4800 GB/s)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lengths", type=int, nargs="*", default=[32768, 65536, 131072])
    ap.add_argument("--budgets", type=int, nargs="*", default=[1024, 4096])
    args = ap.parse_args()
    dev = torch.device("cuda")
    b, hq, hkv, d = args.batch, 32, 8, 128
    dt = torch.bfloat16
    print(torch.cuda.get_device_name(dev))
    rows = []
    # correctness on awkward shapes first
    for (S, N, g, dd) in [(1000, 77, 3, 72), (4097, 1000, 4, 128), (33, 33, 1, 64)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            q = torch.randn(2, 2 * g, dd, device=dev, dtype=dtype)
            k = torch.randn(2, 2, S, dd, device=dev, dtype=dtype)
            v = torch.randn(2, 2, S, dd, device=dev, dtype=dtype)
            idx = torch.randint(0, S, (2, 2, N), device=dev)
            valid = torch.ones(2, S, dtype=torch.bool, device=dev)
            valid[1, : S // 4] = False
            e1 = (sparse_decode_attention(q, k, v, idx, valid, backend="triton").float()
                  - sparse_decode_attention_reference(q, k, v, idx, valid).float()).abs().max().item()
            e2 = (group_attention_scores(q, k, valid, backend="triton")
                  - group_attention_scores_reference(q, k, valid)).abs().max().item()
            print(f"check S={S} N={N} G={g} D={dd} {dtype}: sparse max err {e1:.2e}, scores max err {e2:.2e}")
    for S in args.lengths:
        q = torch.randn(b, hq, d, device=dev, dtype=dt)
        k = torch.randn(b, hkv, S, d, device=dev, dtype=dt)
        v = torch.randn(b, hkv, S, d, device=dev, dtype=dt)
        full_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], k, v, enable_gqa=True))
        t_scores = bench(lambda: group_attention_scores(q, k, backend="triton"))
        t_scores_ref = bench(lambda: group_attention_scores_reference(q, k))
        score_bytes = 2 * b * hkv * S * d * 2  # K read twice
        for n in args.budgets:
            idx = torch.sort(torch.randperm(S, device=dev)[:n]).values.expand(b, hkv, n).contiguous()
            t_tri = bench(lambda: sparse_decode_attention(q, k, v, idx, backend="triton"))
            t_ref = bench(lambda: sparse_decode_attention_reference(q, k, v, idx))
            need = b * hkv * n * 2 * d * 2  # K and V rows of the index set
            rows.append({
                "S": S, "N": n, "full_sdpa_ms": round(full_ms, 4), "sparse_triton_ms": round(t_tri, 4),
                "sparse_ref_ms": round(t_ref, 4), "sparse_vs_full": round(full_ms / t_tri, 1),
                "sparse_bw_frac": round(need / (t_tri * 1e-3) / (args.peak_gbs * 1e9), 3),
                "scores_triton_ms": round(t_scores, 4), "scores_ref_ms": round(t_scores_ref, 4),
                "scores_bw_frac": round(score_bytes / (t_scores * 1e-3) / (args.peak_gbs * 1e9), 3),
            })
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
