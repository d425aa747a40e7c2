#!/usr/bin/env python
"""GPU benchmark: hfpatch's linear_logprob (Triton folds + cuBLAS tiles) vs TRL's chunked log-prob and the naive
path, forward+backward, on one CUDA device.

    python benchmarks/gpu/bench_linear_logprob.py --peak-tflops 989          # H200 dense bf16
    python benchmarks/gpu/bench_linear_logprob.py --quick --json out.json

First it checks the Triton path against the float32 reference on small awkward shapes on the device (values,
gradients, KL mode; it stops on a mismatch), then per lm_head shape (SmolLM2 49152x576, Qwen2.5-1.5B
151936x1536, Llama-3-8B 128256x4096, Gemma-3-270M 262144x640), dtype and token count it times
``logp.sum().backward()`` for:

- ``hfpatch``  ``linear_logprob(hidden, weight, labels, backend="triton")``;
- ``trl``      ``trl.kernels.ChunkedLogProbFunction`` (4096 x 32768 tiles, TRL's DPO setting; skipped with a
               note when TRL is not installed);
- ``naive``    ``log_softmax((hidden @ weight.T).float(), -1).gather(-1, labels)`` through autograd.

Reported per case: median ms (CUDA events, runs interleaved, warm-ups discarded), peak memory above the inputs
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; it includes the returned gradients),
achieved TFLOP/s counting 2*N*V*H per matmul the method needs at least (forward, recompute, grad hidden, grad
weight when the head trains) and with ``--peak-tflops`` the fraction of peak, and the max |difference| of the
log-probs from the naive path. ``--grads hidden`` is the frozen-head (LoRA) case, ``hidden+weight`` a trainable
head. Refuses to run without CUDA or under TRITON_INTERPRET=1. Not a test (pytest does not collect it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

SHAPES = {
    "smollm2": (49152, 576),
    "qwen2.5-1.5b": (151936, 1536),
    "llama-3-8b": (128256, 4096),
    "gemma-3-270m": (262144, 640),
}
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", default="4096,16384", help="rows N, comma list (default 4096,16384)")
    p.add_argument("--dtypes", default="bf16", help="comma list of bf16,fp32 (default bf16)")
    p.add_argument("--grads", nargs="+", default=["hidden", "hidden+weight"], choices=["hidden", "hidden+weight"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="device dense peak for the dtype (H200 bf16: 989)")
    p.add_argument("--quick", action="store_true", help="N 4096 only, 3 timed iterations")
    p.add_argument("--skip-check", action="store_true", help="skip the on-device correctness check")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.iters, args.warmup = "4096", 3, 1
    return args


def refuse_unless_gpu():
    if os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y"):
        sys.exit("TRITON_INTERPRET is set: this would time the CPU interpreter; unset it")
    import torch
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU (the CPU one is benchmarks/training/linear_logprob.py)")


def check_on_device():
    """Triton path vs the float32 reference on the device: N not a power of two, V not a multiple of a tile."""
    import torch
    from hfpatch.kernels import linear_logprob

    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype, tol in ((torch.float32, 2e-4), (torch.bfloat16, 2e-2)):
        for n, h, v in ((1, 64, 1000), (777, 96, 50001), (5000, 128, 131073)):
            x = torch.randn(n, h, device="cuda", generator=g).to(dtype).requires_grad_()
            w = (torch.randn(v, h, device="cuda", generator=g) * 0.3).to(dtype).requires_grad_()
            b = torch.randn(v, device="cuda", generator=g).to(dtype).requires_grad_()
            lab = torch.randint(0, v, (n,), device="cuda", generator=g)
            lab[::7] = -100
            rx, rw = (x.detach() + 0.1).contiguous(), (w.detach() * 0.9).contiguous()
            outs = {}
            for backend in ("torch", "triton"):
                for t in (x, w, b):
                    t.grad = None
                logp, kl = linear_logprob(x, w, lab, bias=b, reference_hidden=rx, reference_weight=rw,
                                          backend=backend)
                (logp.sum() + 0.5 * kl.sum()).backward()
                outs[backend] = [logp, kl, x.grad.float(), w.grad.float(), b.grad.float()]
            for name, a, r in zip(("logp", "kl", "grad_hidden", "grad_weight", "grad_bias"), outs["triton"],
                                  outs["torch"]):
                err = ((a - r).abs().max() / r.abs().max().clamp(min=1)).item()
                status = "ok" if err <= tol else "MISMATCH"
                print(f"check {dtype} N={n} H={h} V={v} {name}: rel err {err:.2e} {status}")
                if err > tol:
                    sys.exit(f"Triton path disagrees with the reference ({name}); fix before timing")
            # Frozen head (the expected-embedding backward): only hidden's gradient.
            w.requires_grad_(False)
            b.requires_grad_(False)
            frozen = {}
            for backend in ("torch", "triton"):
                x.grad = None
                logp, kl = linear_logprob(x, w, lab, bias=b, reference_hidden=rx, reference_weight=rw,
                                          backend=backend)
                (logp.sum() + 0.5 * kl.sum()).backward()
                frozen[backend] = x.grad.float()
            err = ((frozen["triton"] - frozen["torch"]).abs().max() / frozen["torch"].abs().max().clamp(min=1)).item()
            print(f"check {dtype} N={n} H={h} V={v} frozen-head grad_hidden: rel err {err:.2e}")
            if err > tol:
                sys.exit("Triton path disagrees with the reference (frozen head); fix before timing")


def make_method(name, hidden, weight, labels):
    import torch
    from hfpatch.kernels import linear_logprob

    if name == "hfpatch":
        return lambda: linear_logprob(hidden, weight, labels, backend="triton")
    if name == "trl":
        from trl.kernels import ChunkedLogProbFunction
        return lambda: ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 32768, None, 1.0, ())[0]

    def naive():
        logits = hidden @ weight.t()
        return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return naive


def bench_case(shape, n, dtype, grads, methods, args):
    import torch

    vocab, hsize = SHAPES[shape]
    torch.cuda.empty_cache()
    hidden = torch.randn(n, hsize, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, hsize, device="cuda") * (2.0 / hsize ** 0.5)).to(dtype)
    weight.requires_grad_(grads == "hidden+weight")
    labels = torch.randint(0, vocab, (n,), device="cuda")
    fns = {m: make_method(m, hidden, weight, labels) for m in methods}
    result, logps = {}, {}

    def step(fn):
        hidden.grad = None
        weight.grad = None
        out = fn()
        out.sum().backward()
        return out

    for m, fn in fns.items():  # peak memory: one isolated call each
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            logps[m] = step(fn).detach()
        except torch.cuda.OutOfMemoryError:
            result[m] = {"error": "out of memory"}
            continue
        torch.cuda.synchronize()
        result[m] = {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2 ** 20, "ms": []}
        hidden.grad = weight.grad = None
    live = [m for m in fns if "error" not in result[m]]
    for i in range(args.warmup + args.iters):  # interleaved
        for m in live:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(fns[m])
            end.record()
            torch.cuda.synchronize()
            if i >= args.warmup:
                result[m]["ms"].append(start.elapsed_time(end))
    matmuls = 3 + (grads == "hidden+weight")
    flops = 2 * n * vocab * hsize * matmuls
    for m in live:
        r = result[m]
        r["median_ms"] = statistics.median(r["ms"])
        r["tflops"] = flops / (r["median_ms"] / 1e3) / 1e12
        if args.peak_tflops:
            r["fraction_of_peak"] = r["tflops"] / args.peak_tflops
        if "naive" in logps and m != "naive":
            r["max_abs_diff_logp_vs_naive"] = (logps[m] - logps["naive"]).abs().max().item()
    return result


def main(argv=None):
    args = parse_args(argv)
    refuse_unless_gpu()
    import torch

    if not args.skip_check:
        check_on_device()
    methods = ["hfpatch", "trl", "naive"]
    try:
        import trl
        note = f"trl {trl.__version__}"
    except ImportError:
        note = "TRL is not installed: trl skipped"
        methods.remove("trl")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {note}")
    rows = []
    for shape in args.shapes:
        for dname in args.dtypes.split(","):
            for n in (int(t) for t in args.tokens.split(",")):
                for grads in args.grads:
                    res = bench_case(shape, n, getattr(torch, DTYPES[dname]), grads, methods, args)
                    rows.append(dict(shape=shape, dtype=dname, tokens=n, grads=grads, results=res))
                    line = [f"{shape:<13} {dname} N={n:<6} grads={grads:<13}"]
                    for m, r in res.items():
                        if "error" in r:
                            line.append(f"{m}: {r['error']}")
                            continue
                        extra = f", {r['fraction_of_peak']:.0%} of peak" if "fraction_of_peak" in r else ""
                        diff = (f", |dlogp| {r['max_abs_diff_logp_vs_naive']:.1e}"
                                if "max_abs_diff_logp_vs_naive" in r else "")
                        line.append(f"{m}: {r['median_ms']:8.2f} ms, peak +{r['peak_mib']:8.0f} MiB, "
                                    f"{r['tflops']:6.1f} TFLOP/s{extra}{diff}")
                    print("\n  ".join(line), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "note": note, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
