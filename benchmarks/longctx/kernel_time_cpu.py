"""CPU kernel-level attention time of one decode step: sparse (an index set of N cached positions) vs full sdpa.

Synthetic KV cache of S positions (4k-32k), one query step, fp32, the CPU path hfpatch's sparse techniques
take (`sparse_decode_attention`, torch reference: gather + matmul) against `scaled_dot_product_attention`
over the whole cache, plus the selection pass of a full step (`group_attention_scores` + top-N), plus one
whole sparse step of `rescore_rank` (`lowrank_sparse_decode`: rank-r scores of every position, top-N,
exact attention) as torch ops and as the fused CPU kernel. Medians of repeated calls, side by side in one
process. Shapes: SmolLM2-135M (9 query / 3 KV heads, D=64) and a Llama-3-8B-like layer (32 / 8, D=128).

    python benchmarks/longctx/kernel_time_cpu.py --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch

from hfpatch.kernels import group_attention_scores, lowrank_sparse_decode, select_positions, sparse_decode_attention

SHAPES = {"smollm2": (9, 3, 64), "llama8b-like": (32, 8, 128)}


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--budgets", type=int, nargs="*", default=[256, 512, 1024])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeat", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rescore-rank", type=int, default=16)
    ap.add_argument("--rescore-budget", type=int, default=512)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1, one decode step")
    rescore = f"rescored step r={args.rescore_rank} N={args.rescore_budget}"
    print("| shape | S | full sdpa ms | selection (scores + top-N) ms | " +
          " | ".join(f"sparse N={n} ms (ratio)" for n in args.budgets) +
          f" | {rescore}, torch ops ms (ratio) | {rescore}, fused ms (ratio) |")
    print("| --- " * (6 + len(args.budgets)) + "|")
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        for s in args.lengths:
            q = torch.randn(1, hq, d, generator=gen)
            k = torch.randn(1, hkv, s, d, generator=gen)
            v = torch.randn(1, hkv, s, d, generator=gen)
            full = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], k, v, enable_gqa=True), args.repeat)
            select = median_ms(lambda: select_positions(
                group_attention_scores(q, k, None, scale=d ** -0.5), max(args.budgets)), args.repeat)
            cells = []
            for n in args.budgets:
                index = torch.randperm(s, generator=gen)[:n].sort().values.expand(1, hkv, n).contiguous()
                ms = median_ms(lambda: sparse_decode_attention(q, k, v, index, scale=d ** -0.5), args.repeat)
                cells.append(f"{ms:.3f} ({full / ms:.1f}x)")
            basis = torch.linalg.qr(torch.randn(1, hkv, d, args.rescore_rank, generator=gen)).Q
            projected = (k @ basis).transpose(-1, -2).contiguous()
            for backend in ("torch", "cpu"):
                ms = median_ms(lambda: lowrank_sparse_decode(q, basis, projected, k, v, budget=args.rescore_budget,
                                                             sink=4, window=32, backend=backend), args.repeat)
                cells.append(f"{ms:.3f} ({full / ms:.1f}x)")
            print(f"| {shape} | {s} | {full:.3f} | {select:.3f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
