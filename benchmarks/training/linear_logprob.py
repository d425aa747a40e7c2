#!/usr/bin/env python
"""CPU benchmark: hfpatch's tiled linear_logprob vs TRL's chunked log-prob and the naive path, forward+backward.

    python benchmarks/training/linear_logprob.py --tokens 1024 --repeat 2 --threads 2
    python benchmarks/training/linear_logprob.py --shapes smollm2 --grads hidden --json out.json

Per lm_head shape (SmolLM2 49152x576, Qwen2.5-1.5B 151936x1536, Llama-3-8B 128256x4096, Gemma-3-270M
262144x640), ``--tokens`` rows of float32 hidden states and random labels, it times ``logp.sum().backward()``:

- ``hfpatch``  ``linear_logprob(hidden, weight, labels, backend="cpu")``: vocabulary tiles, nothing [N, V] kept;
- ``trl``      ``trl.kernels.ChunkedLogProbFunction`` (TRL's own fused lm_head for DPO: 4096-token x 32768-vocab
               tiles, online log-sum-exp, tile-recompute backward), with no optional outputs; skipped with a note
               when TRL is not installed;
- ``naive``    ``log_softmax(hidden @ weight.T, -1).gather(-1, labels)`` through autograd.

Gradient configurations (``--grads``): ``hidden`` (the lm_head frozen, as with LoRA/PEFT: the DPO case) and
``hidden+weight`` (a trainable head: its [V, H] gradient is unavoidable and is counted in the peak).

Memory: every (shape, grads, method) runs in its own process with glibc's mmap threshold fixed at 128 KiB, so
freed buffers leave the resident set; the figure is the growth of the peak resident set (``ru_maxrss``) over
the first forward+backward, after the inputs are allocated and touched. It includes the gradients the call
returns (``grad outputs`` column: the part no method can avoid); ``scratch`` is the peak minus them.
tracemalloc cannot see torch's allocations, so it is not used. Time: median of ``--repeat`` calls after one
warm-up. The methods' log-probs and gradients are compared with the hfpatch ones (max abs difference).

Not a test: pytest does not collect this folder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # name: (vocabulary, hidden size)
    "smollm2": (49152, 576),
    "qwen2.5-1.5b": (151936, 1536),
    "llama-3-8b": (128256, 4096),
    "gemma-3-270m": (262144, 640),
}
METHODS = ("hfpatch", "trl", "naive")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=1024, help="rows N (default 1024: fits 24 GiB for every shape)")
    p.add_argument("--grads", nargs="+", default=["hidden", "hidden+weight"], choices=["hidden", "hidden+weight"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--repeat", type=int, default=2, help="timed calls after one warm-up (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", nargs=5, metavar=("SHAPE", "GRADS", "METHOD", "TOKENS", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(shape, grads, method, tokens, out, repeat, threads):
    """One (shape, grads, method) in this process: peak RSS growth of the first call, then timed calls."""
    import torch

    torch.set_num_threads(threads)
    vocab, hidden_size = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    # Filled in place: no temporaries that would raise the peak before it is read.
    hidden = torch.empty(tokens, hidden_size).normal_(generator=g)
    weight = torch.empty(vocab, hidden_size).normal_(std=2.0 / hidden_size ** 0.5, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    hidden.requires_grad_(True)
    weight.requires_grad_(grads == "hidden+weight")

    if method == "hfpatch":
        from hfpatch.kernels import linear_logprob

        def run():
            return linear_logprob(hidden, weight, labels, backend="cpu")
    elif method == "trl":
        from trl.kernels import ChunkedLogProbFunction

        def run():
            # (hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs): TRL's DPO
            # passes chunk_size 32768 (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE); no optional outputs.
            return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 32768, None, 1.0, ())[0]
    else:
        def run():
            logits = hidden @ weight.t()
            return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    def step():
        hidden.grad = None
        weight.grad = None
        logp = run()
        logp.sum().backward()
        return logp

    before = _rss_mib()
    t0 = time.perf_counter()
    logp = step()
    first = time.perf_counter() - t0
    peak = _rss_mib() - before
    grad_out = (hidden.numel() + (weight.numel() if weight.requires_grad else 0)) * 4 / 2 ** 20
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        logp = step()
        times.append(time.perf_counter() - t0)
    torch.save({"logp": logp.detach(), "grad_hidden": hidden.grad,
                "grad_weight_rows": None if weight.grad is None else weight.grad[:4096].clone()}, out + ".pt")
    Path(out).write_text(json.dumps({"peak_mib": peak, "grad_out_mib": grad_out, "first_s": first,
                                     "times_s": times}))


def run_case(shape, grads, method, args, tmp):
    out = os.path.join(tmp, f"{shape}-{grads}-{method}.json")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", shape, grads, method, str(args.tokens), out,
           "--repeat", str(args.repeat), "--threads", str(args.threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(Path(out).read_text())


def compare(tmp, shape, grads, method):
    import torch

    base = torch.load(os.path.join(tmp, f"{shape}-{grads}-hfpatch.json.pt"))
    other = torch.load(os.path.join(tmp, f"{shape}-{grads}-{method}.json.pt"))
    diffs = {"logp": (base["logp"] - other["logp"]).abs().max().item(),
             "grad_hidden": (base["grad_hidden"] - other["grad_hidden"]).abs().max().item()}
    if base["grad_weight_rows"] is not None:
        diffs["grad_weight"] = (base["grad_weight_rows"] - other["grad_weight_rows"]).abs().max().item()
    return diffs


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        shape, grads, method, tokens, out = args.worker
        return worker(shape, grads, method, int(tokens), out, args.repeat, args.threads)
    try:
        import trl
        trl_note = f"trl {trl.__version__}"
    except ImportError:
        trl_note = "TRL is not installed: the trl column is skipped (pip install trl)"
        args.methods = [m for m in args.methods if m != "trl"]
    import torch

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} threads, N={args.tokens} float32; {trl_note}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            for grads in args.grads:
                results = {}
                # hfpatch first (the others are compared with it); the rest in the given order.
                for method in ["hfpatch"] + [m for m in args.methods if m != "hfpatch"]:
                    results[method] = run_case(shape, grads, method, args, tmp)
                    if method != "hfpatch" and "error" not in results[method] and "error" not in results["hfpatch"]:
                        results[method]["max_abs_diff_vs_hfpatch"] = compare(tmp, shape, grads, method)
                rows.append({"shape": shape, "vocab": SHAPES[shape][0], "hidden": SHAPES[shape][1], "grads": grads,
                             "results": results})
                print(format_row(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "threads": args.threads, "trl": trl_note,
                                         "rows": rows}, indent=1))


def format_row(row):
    res = row["results"]
    h = res["hfpatch"]
    parts = [f"{row['shape']:<13} grads={row['grads']:<13}"]
    for method, r in res.items():
        if "error" in r:
            parts.append(f"{method}: error {r['error']}")
            continue
        t = statistics.median(r["times_s"]) if r["times_s"] else r["first_s"]
        txt = (f"{method}: {t:7.2f} s, peak +{r['peak_mib']:7.0f} MiB "
               f"(scratch {r['peak_mib'] - r['grad_out_mib']:6.0f})")
        if method != "hfpatch" and "error" not in h:
            th = statistics.median(h["times_s"]) if h["times_s"] else h["first_s"]
            txt += f" [hfpatch/{method}: time {th / t:.2f}x, peak {h['peak_mib'] / max(r['peak_mib'], 1):.2f}x]"
            if "max_abs_diff_vs_hfpatch" in r:
                txt += " diff " + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_diff_vs_hfpatch"].items())
        parts.append(txt)
    return "\n  ".join(parts)


if __name__ == "__main__":
    main()
