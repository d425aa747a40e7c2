"""Peers on the transplant benchmark: mergekit's `mergekit-tokensurgeon` and the `tokenizer-adapter` package,
each run as a separate tool from its own virtual environment (never an hfpatch dependency), on the same pairs,
documents and scorer as benchmarks/transplant/bpb.py.

    python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 && /tmp/mk/bin/pip install mergekit
    python -m venv /tmp/ta && /tmp/ta/bin/pip install torch==2.13.0 && \\
        /tmp/ta/bin/pip install tokenizer-adapter transformers==5.24.0 sentencepiece protobuf
    python benchmarks/transplant/peers.py --pairs gemma --peers mergekit:subword mergekit:omp:k=8 \\
        tokenizer-adapter:average --docs 8 --max-chars 2000 --timeout 3600 --json peers.json

A peer is `TOOL:METHOD[:OPTION...]`:
- `mergekit:METHOD[:k=K][:bm=yes][:pm=yes]`: `mergekit-tokensurgeon BASE DONOR OUT -a METHOD -k K` (bm/pm: its
  --byte-match / --prefix-match, e.g. to match SentencePiece byte-fallback pieces). mergekit needs a donor model
  folder. The GPT-2 and Mistral pairs have none, so there it gets a vocabulary-only donor (the new tokenizer
  beside a zero embedding matrix) and only methods that never read donor weights are allowed (`subword`:
  mean of the old pieces; `mean`: the mean of all old rows; `zero`; `randn`).
- `tokenizer-adapter:METHOD[:sp]`: benchmarks/transplant/run_tokenizer_adapter.py in the peer's venv; `sp` adds
  the package's `custom_preprocessing` hook mapping `▁` to `Ġ` (SentencePiece new vocabulary).

Each peer writes its model under ~/.cache/hfpatch/peers/ (outside the repository); its wall time and peak
resident memory are those of the peer process (load, transplant, save). The saved folder is then scored
with the pair's new tokenizer by `bpb.score_folder`. A peer that runs past --timeout is killed and reported.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bpb import PAIRS, baseline, documents, machine, pair_sources, run_measured, score_folder  # noqa: E402

from hfpatch.apps import assets  # noqa: E402

DONOR_FREE_MERGEKIT = ("subword", "mean", "zero", "randn")


def vocabulary_donor(pair: str, tokenizer_dir: str) -> Path:
    """A stand-in donor for mergekit on a pair without a donor model: the base model's config resized to the
    new vocabulary, a zero embedding matrix and the new tokenizer. Only usable with methods that never read
    the donor's weights (DONOR_FREE_MERGEKIT)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    target = assets.cache_dir() / "peers" / f"vocab-donor-{pair}"
    if (target / "model.safetensors").is_file():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.from_pretrained(assets.smollm2_dir())
    config.vocab_size = len(tok)
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_file({"model.embed_tokens.weight": torch.zeros(len(tok), config.hidden_size)}, str(tmp / "model.safetensors"))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def peer_command(peer: str, pair: str, out: Path, args) -> list[str]:
    """The command line that makes peer `peer` write its transplanted model for `pair` into `out`."""
    tool, method, *options = peer.split(":")
    tok_dir, donor = pair_sources(pair)
    base = str(assets.smollm2_dir())
    if tool == "mergekit":
        opts = dict(o.split("=", 1) for o in options)
        if donor is None:
            if method not in DONOR_FREE_MERGEKIT:
                raise ValueError(f"mergekit method {method!r} needs a donor model; pair {pair!r} has none (use one of "
                                 f"{', '.join(DONOR_FREE_MERGEKIT)})")
            donor = str(vocabulary_donor(pair, tok_dir))
        cmd = [str(Path(args.mergekit_bin) / "mergekit-tokensurgeon"), base, donor, str(out), "-a", method,
               "--no-write-model-card"]
        for key, flag in (("k", "-k"), ("bm", "--byte-match"), ("pm", "--prefix-match")):
            if key in opts:
                cmd += [flag, opts.pop(key)]
        if opts:
            raise ValueError(f"unknown mergekit option(s) {sorted(opts)} in {peer!r}; use k=, bm=, pm=")
        return cmd
    if tool == "tokenizer-adapter":
        cmd = [args.tokenizer_adapter_python, str(HERE / "run_tokenizer_adapter.py"), base, tok_dir, str(out),
               "--method", method]
        return cmd + (["--sp-to-bytelevel"] if "sp" in options else [])
    raise ValueError(f"unknown peer tool {tool!r} in {peer!r}; use mergekit:METHOD or tokenizer-adapter:METHOD")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["gemma"], choices=PAIRS)
    parser.add_argument("--peers", nargs="+", default=["mergekit:subword", "tokenizer-adapter:average"])
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--max-chars", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a peer run is killed")
    parser.add_argument("--mergekit-bin", default="/tmp/mk/bin")
    parser.add_argument("--tokenizer-adapter-python", default="/tmp/ta/bin/python")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of each peer process (OMP_NUM_THREADS / MKL_NUM_THREADS)")
    parser.add_argument("--keep", action="store_true", help="keep the transplanted model folders")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)

    docs = documents(args.docs, args.max_chars)
    start, base = baseline(docs)
    results = {"machine": machine(), "docs_per_domain": args.docs, "max_chars": args.max_chars, "rows": [
        {"pair": "SmolLM2 (own tokenizer)", "peer": "-", **base}]}
    print("SmolLM2 own tokenizer: " + ", ".join(f"{k} {v:.4f} bpb" for k, v in base.items()), flush=True)
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        results["peer_threads"] = args.threads
    root = assets.cache_dir() / "peers"
    root.mkdir(parents=True, exist_ok=True)
    for pair in args.pairs:
        tok_dir, _ = pair_sources(pair)
        for peer in args.peers:
            out = root / f"{pair}-{peer.replace(':', '-').replace('=', '')}"
            shutil.rmtree(out, ignore_errors=True)
            row = {"pair": f"SmolLM2 -> {pair}", "peer": peer, "command": None}
            try:
                cmd = peer_command(peer, pair, out, args)
            except ValueError as exc:
                print(f"{pair} {peer}: skipped ({exc})", flush=True)
                continue
            row["command"] = " ".join(cmd)
            with open(root / f"{out.name}.log", "w") as log:
                proc = run_measured(cmd, log=log, timeout=args.timeout, env=env)
            row.update(seconds=proc["seconds"], peak_rss_gib=proc["peak_rss_gib"])
            if proc["timed_out"]:
                row["status"] = f"did not finish in {args.timeout:.0f} s (killed)"
            elif proc["rc"] != 0:
                row["status"] = f"failed (exit {proc['rc']}; log {root / (out.name + '.log')})"
            else:
                scores = score_folder(out, docs, start, tokenizer=tok_dir)
                row.update(status="ok", **scores, **{f"{dom}_ratio": scores[dom] / base[dom] for dom in scores})
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
            results["rows"].append(row)
            scored = "  ".join(f"{dom} {row[dom]:.4f} bpb (x{row[dom + '_ratio']:.3f})" for dom in base) \
                if row["status"] == "ok" else row["status"]
            peak = f"{row['peak_rss_gib']:.2f} GiB" if row["peak_rss_gib"] is not None else "n/a"
            print(f"{row['pair']:<22} {peer:<28} {scored}  {row['seconds']:.0f} s, peak RSS {peak}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
