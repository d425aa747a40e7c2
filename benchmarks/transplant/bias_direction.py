"""Experiment (not a library feature yet): donor-free rows of a tied model, corrected on the output side.

With tied embeddings a new token's row is also its output vector. The mean of a multi-piece token's old
pieces gives it a logit near the average of its pieces' logits, while its real log-probability is the sum
of the pieces' conditional log-probabilities: one more piece, one more negative term. SmolLM2's final
hidden states h have a direction u with h . u ~ 1 at every position (a ridge fit on the tune documents:
mean 0.997, std 0.05, |u| = 0.23 against rows of norm ~3.2), so adding `beta * (pieces - 1) * u` to a
new row shifts its logit by about beta per extra piece, like a per-token bias, while moving the row only a
little. u is always fitted on the tune documents (the even-indexed half); `--split` picks the documents
scored.

    python benchmarks/transplant/bias_direction.py --pairs gpt2 --split tune --variants mean scale=0.5 \
        first last beta=-1 beta=-2 beta=-4
    python benchmarks/transplant/bias_direction.py --pairs gpt2 mistral --split heldout --variants beta=-2 \
        --methods mean tokenadapt

Variants change the initialised (non-shared) rows only: `mean` (as initialised), `scale=S` (S * rows),
`first` / `last` (the first / last old piece's row), `beta=B` (rows + B * (pieces - 1) * u).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bpb  # noqa: E402

import hfpatch  # noqa: E402
from hfpatch import assets  # noqa: E402
from hfpatch.techniques.tokenizer.tokenadapt import pad_pieces  # noqa: E402


@torch.no_grad()
def constant_direction(model, tokenizer, docs: dict[str, list[str]], ridge: float = 1e-2) -> torch.Tensor:
    """u minimising |H u - 1|^2 + ridge * n |u|^2 over the final hidden states H of `docs`."""
    states = [model.model(input_ids=torch.tensor([tokenizer(d, add_special_tokens=False)["input_ids"]]))
              .last_hidden_state[0] for d in sum(docs.values(), [])]
    H = torch.cat(states)
    u = torch.linalg.solve(H.T @ H + ridge * H.shape[0] * torch.eye(H.shape[1]), H.T @ torch.ones(H.shape[0]))
    fit = H @ u
    print(f"u: |u| {u.norm():.3f}, h.u mean {fit.mean():.3f} std {fit.std():.3f} over {H.shape[0]} positions",
          flush=True)
    return u


def variant_rows(name: str, rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, old: torch.Tensor,
                 u: torch.Tensor) -> torch.Tensor:
    count = mask.sum(1)
    if name == "mean":
        return rows
    if name == "first":
        return old[ids[:, 0]]
    if name == "last":
        return old[ids.gather(1, (count - 1).clamp_min(0)[:, None])[:, 0]]
    kind, _, value = name.partition("=")
    if kind == "scale":
        return float(value) * rows
    if kind == "beta":
        return rows + float(value) * (count - 1).clamp_min(0).float()[:, None] * u
    raise ValueError(f"unknown variant {name!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["gpt2"], choices=["gpt2", "mistral", "gemma"])
    parser.add_argument("--methods", nargs="+", default=["mean"])
    parser.add_argument("--variants", nargs="+", default=["mean", "beta=-2"])
    parser.add_argument("--split", default="tune", choices=["tune", "heldout"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    docs = bpb.documents(8, 2000, args.split)
    model, tok = assets.load_smollm2()
    start = bpb.start_vector(model, tok)
    _, base = bpb.baseline(docs)
    u = constant_direction(model, tok, bpb.documents(8, 2000, "tune"))
    old = model.get_input_embeddings().weight.detach().clone()
    for pair in args.pairs:
        tok_dir, _ = bpb.pair_sources(pair)
        for method in args.methods:
            spec = {"type": "tokenizer_transplant", "tokenizer": tok_dir, "method": method, "progress": False}
            with hfpatch.patch(model, hfpatch.Recipe([spec])) as handle:
                alignment = handle.technique("tokenizer_transplant").alignment
                todo = torch.tensor(alignment.todo)
                ids, mask = pad_pieces([alignment.pieces[i] for i in alignment.todo])
                weight = model.get_input_embeddings().weight  # tied: also the output rows
                rows = weight[todo].detach().clone()
                for name in args.variants:
                    with torch.no_grad():
                        weight[todo] = variant_rows(name, rows, ids, mask, old, u).to(weight.dtype)
                    scores = bpb.score(model, handle.tokenizer, docs, start)
                    print(f"{args.split} {pair} {method} {name}: " + "  ".join(
                        f"{dom} {v:.4f} (x{v / base[dom]:.3f})" for dom, v in scores.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
