"""Bits per byte of SmolLM2-135M after a tokenizer transplant, per domain, vs SmolLM2 with its own tokenizer.

Each held-out document (prose: Python documentation topics; code: standard-library sources; both from
hfpatch.apps.assets) is scored on its own: its tokens (no special tokens) follow one fixed start vector, the
original model's <|endoftext|> embedding, fed as inputs_embeds for every variant so that all start alike.
bits = sum of -log2 p(token); bytes = UTF-8 bytes of the document. Report: total bits / total bytes per
domain, and the ratio to the original model.

Every (pair, method) runs in its own process, so that its wall time and peak resident memory (model load +
initialisation, read with getrusage before scoring) are its own:

    python benchmarks/transplant/bpb.py --pairs gpt2 mistral --methods mean tokenadapt omp zero random \
        --docs 8 --max-chars 2000 --json bpb.json

`--split tune` scores the other half of the documents (the even-indexed ones), which is the only half any
setting may be tuned on. Machine noise does not affect bits per byte (only the times printed beside them).
`score_folder` scores a saved model folder with its tokenizer the same way (benchmarks/transplant/peers.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import hfpatch
from hfpatch.apps import assets

HERE = Path(__file__).resolve().parent
PAIRS = ("gpt2", "mistral", "gemma")


def documents(n: int, max_chars: int, split: str = "heldout") -> dict[str, list[str]]:
    """n prose and n code documents: from a spread of 2n, the odd-indexed ones ("heldout", what is reported)
    or the even-indexed ones ("tune", the only ones a setting may be chosen on)."""
    if split not in ("heldout", "tune"):
        raise ValueError(f"split must be 'heldout' or 'tune', got {split!r}")
    part = slice(1, None, 2) if split == "heldout" else slice(0, None, 2)
    prose = assets.prose_documents(2 * n, min_chars=1000)[part]
    code = assets.code_documents(2 * n, min_chars=2000)[part]
    return {"prose": [d[:max_chars] for d in prose], "code": [d[:max_chars] for d in code]}


def pair_sources(pair: str) -> tuple[str, str | None]:
    """(new tokenizer folder, donor model folder or None) of a benchmark pair."""
    if pair == "gpt2":
        return str(assets.gpt2_tokenizer_dir()), None
    if pair == "mistral":
        return str(assets.mistral_tokenizer_dir()), None
    if pair == "gemma":
        sys.path.insert(0, str(HERE))
        from gemma_asset import gemma3_dir

        return str(gemma3_dir()), str(gemma3_dir())
    raise ValueError(f"unknown pair {pair!r}; choose from {PAIRS}")


def start_vector(model, tokenizer) -> torch.Tensor:
    """The original SmolLM2's <|endoftext|> embedding: the first input of every scored document."""
    return model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<|endoftext|>")].detach().clone()


def baseline(docs: dict[str, list[str]]) -> tuple[torch.Tensor, dict[str, float]]:
    """(start vector, bits per byte per domain of SmolLM2 with its own tokenizer). The scores are cached per
    model folder and document set (~/.cache/hfpatch/bench/), since every run of every script needs them."""
    model, tok = assets.load_smollm2()
    start = start_vector(model, tok)
    model_dir = assets.smollm2_dir()
    key = hashlib.sha256(json.dumps([str(model_dir), torch.__version__, docs]).encode()).hexdigest()[:16]
    cached = assets.cache_dir() / "bench" / f"bpb-baseline-{key}.json"
    if cached.is_file():
        return start, json.loads(cached.read_text())
    base = score(model, tok, docs, start)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(base))
    return start, base


@torch.no_grad()
def bits_per_byte(model, tokenizer, docs: list[str], start: torch.Tensor) -> float:
    bits = 0.0
    nbytes = 0
    emb = model.get_input_embeddings()
    for doc in docs:
        ids = torch.tensor([tokenizer(doc, add_special_tokens=False)["input_ids"]])
        x = torch.cat([start[None, None, :].to(emb.weight.dtype), emb(ids)], dim=1)
        logits = model(inputs_embeds=x).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, :, None])[:, 0]
        bits += float(-logp.sum()) / float(torch.log(torch.tensor(2.0)))
        nbytes += len(doc.encode("utf-8"))
    return bits / nbytes


def score(model, tokenizer, docs: dict[str, list[str]], start: torch.Tensor) -> dict[str, float]:
    """Bits per byte per domain."""
    return {dom: bits_per_byte(model, tokenizer, d, start) for dom, d in docs.items()}


def score_folder(folder: str | os.PathLike, docs: dict[str, list[str]], start: torch.Tensor,
                 tokenizer: str | os.PathLike | None = None) -> dict[str, float]:
    """Bits per byte per domain of a saved model folder (plain transformers), with the tokenizer saved beside
    it unless `tokenizer` names another folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tokenizer or folder)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"{folder}: the tokenizer has {len(tok)} tokens but the model only "
                         f"{model.get_input_embeddings().weight.shape[0]} embedding rows")
    return score(model.eval(), tok, docs, start)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# Runs argv[2:] and writes its peak RSS (KiB) to argv[1]. A child's ru_maxrss starts at its parent's resident
# size at fork (Linux keeps the high-water mark across exec), so the command is forked from this small
# interpreter rather than from the benchmark process that may hold a loaded model.
_MEASURE = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
if os.WIFSIGNALED(status):  # die of the same signal (SIGKILL, e.g. the OOM killer, cannot be caught anyway)
    if os.WTERMSIG(status) not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.WEXITSTATUS(status))
"""


def run_measured(cmd: list[str], *, log=None, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `cmd` as a child process in its own session: exit code, wall seconds and its peak resident memory
    (GiB; None when it was killed). After `timeout` seconds the whole session is killed and "timed_out" is
    set."""
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as rss:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", _MEASURE, rss.name, *cmd], stdout=log,
                                stderr=subprocess.STDOUT if log else None, start_new_session=True, env=env)
        expired = threading.Event()

        def kill():
            expired.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            proc.wait()
        finally:
            if timer:
                timer.cancel()
        seconds = time.perf_counter() - t0
        text = rss.read().strip()
    return {"rc": proc.returncode, "seconds": round(seconds, 1),
            "peak_rss_gib": round(int(text) / 2**20, 2) if text else None, "timed_out": expired.is_set()}


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, " \
           f"torch {torch.__version__}".replace("  ", " ")


def run_one(pair: str, method: str, args) -> dict:
    """Transplant one pair with one method in this process and score it (the --one worker)."""
    model, tok = assets.load_smollm2()
    start = start_vector(model, tok)
    docs = documents(args.docs, args.max_chars, args.split)
    tok_dir, donor = pair_sources(pair)
    spec = {"type": "tokenizer_transplant", "tokenizer": tok_dir, "method": method, "k": args.k,
            "omp_candidates": args.omp_candidates,
            "donor": donor if method == "omp" and not args.no_donor else None,
            **json.loads(args.extra)}
    t0 = time.perf_counter()
    with hfpatch.patch(model, hfpatch.Recipe([spec])) as handle:
        seconds = time.perf_counter() - t0
        init_peak = peak_rss_gib()
        scores = score(model, handle.tokenizer, docs, start)
    return {"pair": f"SmolLM2 -> {pair}" + (" (donor)" if spec["donor"] else ""), "method": method,
            "settings": {k: v for k, v in spec.items() if k not in ("type", "tokenizer")}, **scores,
            "seconds": round(seconds, 1), "peak_rss_gib": round(init_peak, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["gpt2", "mistral"], choices=PAIRS)
    parser.add_argument("--methods", nargs="+", default=["mean", "tokenadapt", "omp", "zero", "random"])
    parser.add_argument("--docs", type=int, default=8, help="documents per domain")
    parser.add_argument("--max-chars", type=int, default=2000, help="characters kept per document")
    parser.add_argument("--split", default="heldout", choices=["heldout", "tune"])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--omp-candidates", type=int, default=128)
    parser.add_argument("--extra", default="{}", help="more transplant parameters, as JSON")
    parser.add_argument("--no-donor", action="store_true", help="omp without the pair's donor model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--one", nargs=2, metavar=("PAIR", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        row = run_one(*args.one, args)
        Path(args.out).write_text(json.dumps(row))
        return 0

    docs = documents(args.docs, args.max_chars, args.split)
    _, base = baseline(docs)
    results = {"machine": machine(), "docs_per_domain": args.docs, "max_chars": args.max_chars,
               "split": args.split, "rows": []}
    results["rows"].append({"pair": "SmolLM2 (own tokenizer)", "method": "-", **base, "seconds": 0})
    print("SmolLM2 own tokenizer: " + ", ".join(f"{k} {v:.4f} bpb" for k, v in base.items()), flush=True)
    out = Path(args.json or "bpb.json").with_suffix(".one.json")
    for pair in args.pairs:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--one", pair, method, "--out", str(out), "--docs", str(args.docs),
                   "--max-chars", str(args.max_chars), "--split", args.split, "--k", str(args.k),
                   "--omp-candidates", str(args.omp_candidates), "--extra", args.extra] + \
                (["--no-donor"] if args.no_donor else [])
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = run_measured(cmd)
            if proc["rc"] != 0:
                print(f"{pair} {method}: failed (exit {proc['rc']})", flush=True)
                continue
            row = json.loads(out.read_text())
            row.update({f"{dom}_ratio": row[dom] / base[dom] for dom in base}, process_seconds=proc["seconds"])
            results["rows"].append(row)
            print(f"{row['pair']:<28} {method:<11} " + "  ".join(
                f"{dom} {row[dom]:.4f} bpb (x{row[dom + '_ratio']:.3f})" for dom in base) +
                f"  init {row['seconds']:.0f} s, peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    out.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
