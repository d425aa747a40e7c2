"""Experiment (its `beta=B` with `--u-from generated` is now the library option `length_bias`): donor-free rows of a tied model, corrected on the output side,
plus two diagnostics that say how far any new-row initialisation can go.

With tied embeddings a new token's row is also its output vector. The mean of a multi-piece token's old
pieces gives it a logit near the average of its pieces' logits, while its real log-probability is the sum
of the pieces' conditional log-probabilities: one more piece, one more negative term. SmolLM2's final
hidden states h have a direction u with h . u ~ 1 at every position (a ridge fit: on the tune documents
h . u = 0.997 +- 0.05, |u| = 0.23 against rows of norm ~3.2), so adding `beta * (pieces - 1) * u` to a new
row shifts its logit by about beta per extra piece, like a per-token bias, while moving the row only a
little. u is fitted either on the tune documents (`--u-from tune`) or, needing no text at all, on 4 x 256
tokens the model samples itself from <|endoftext|> (`--u-from generated`, seed 0, top-p 0.95; ~20 s on
one thread). `--split` picks the documents scored; nothing is ever fitted on the held-out ones.

    python benchmarks/transplant/bias_direction.py --pairs gpt2 --split tune --variants mean scale=0.5 \
        first last beta=-1 beta=-2 beta=-4
    python benchmarks/transplant/bias_direction.py --pairs mistral --split tune --u-from generated \
        --variants beta=-2 beta=-2+ws=4:12 beta=-2+oracle beta=-2+ws=4:12+oracle --breakdown

Variants change rows of the transplanted model (parts joined by `+`, applied left to right):
- `mean` (as initialised), `scale=S` (S * rows), `first` / `last` (the first / last old piece's row),
  `beta=B` (rows + B * (pieces - 1) * u): the initialised (non-shared) rows only;
- `ws=MIN:MAX`: SentencePiece runs of MIN..MAX spaces (`▁▁▁▁`, shared by bytes with SmolLM2's `ĠĠĠĠ`) get
  the row of round(n / 4) tabs instead. A SentencePiece vocabulary writes `\\n    if` as `<0x0A> ▁▁▁▁ if`,
  a bare word after the run, which byte-level BPE only ever does after a tab (SmolLM2: `Ċ ĉ if`; spaces
  give `ĊĠĠĠ Ġif`). This changes rows that are otherwise copied because their bytes match;
- `oracle` (scoring, not rows): positions whose target is a new token cost what SmolLM2 paid for the same
  bytes with its own tokenizer, and at every other position the new tokens get no probability. It bounds
  what any output-side initialisation of the new rows could gain (the hidden states stay those of the
  rows in place).

`--breakdown` splits the excess bits (transplanted model minus SmolLM2 on the same bytes) by the kind of
target token: new (initialised), shared whitespace-only, other shared.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bpb  # noqa: E402

import hfpatch  # noqa: E402
from hfpatch.apps import assets  # noqa: E402
from hfpatch.techniques.tokenizer.alignment import canonical_vocab  # noqa: E402
from hfpatch.techniques.tokenizer.length_bias import ridge_direction  # noqa: E402
from hfpatch.techniques.tokenizer.tokenadapt import pad_pieces  # noqa: E402


@torch.no_grad()
def constant_direction(model, tokenizer, texts: list[str], ridge: float = 1e-2) -> torch.Tensor:
    """u minimising |H u - 1|^2 + ridge * n |u|^2 over the final hidden states H of `texts`."""
    H = torch.cat([model.model(input_ids=torch.tensor([tokenizer(d, add_special_tokens=False)["input_ids"]]))
                   .last_hidden_state[0] for d in texts])
    u, fit = ridge_direction(H, ridge)
    print(f"u: |u| {u.norm():.3f}, h.u mean {fit['mean']:.3f} std {fit['std']:.3f} over {fit['positions']} "
          "positions", flush=True)
    return u


@torch.no_grad()
def sampled_texts(model, tokenizer, n: int = 4, tokens: int = 256, seed: int = 0) -> list[str]:
    """n texts the model samples itself after <|endoftext|> (top-p 0.95): text for fits that needs no corpus."""
    torch.manual_seed(seed)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    t0 = time.perf_counter()
    out = model.generate(torch.full((n, 1), eot), do_sample=True, top_p=0.95, max_new_tokens=tokens,
                         min_new_tokens=tokens, pad_token_id=eot)
    print(f"sampled {n} x {tokens} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
    return tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)


@torch.no_grad()
def token_bits(model, tokenizer, doc: str, start: torch.Tensor, hide: torch.Tensor | None = None):
    """(ids, bits of each token) of `doc` scored as bpb.bits_per_byte does; `hide` (a bool mask over the
    vocabulary) removes those tokens from every softmax."""
    ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
    emb = model.get_input_embeddings()
    x = torch.cat([start[None, None, :].to(emb.weight.dtype), emb(torch.tensor([ids]))], dim=1)
    logits = model(inputs_embeds=x).logits[0, :-1].float()
    if hide is not None:
        logits[:, hide] = -math.inf
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids)[:, None])[:, 0]
    return ids, (-logp / math.log(2)).tolist()


def token_spans(ids: list[int], keys: dict, nbytes: int) -> list[tuple[int, int]]:
    """[start, end) byte span of each token in the document. A SentencePiece tokenizer prepends a space the
    document does not have; that byte is dropped from the first token's span."""
    lens = [len(keys[i]) if isinstance(keys.get(i), bytes) else 0 for i in ids]
    pos = nbytes - sum(lens)  # -1 with a dummy prefix, else 0
    spans = []
    for n in lens:
        spans.append((max(pos, 0), pos + n))
        pos += n
    return spans


def byte_costs(model, tokenizer, doc: str, start: torch.Tensor) -> list[float]:
    """Bits per byte position of the original model with its own tokenizer (a token's bits spread evenly)."""
    _, keys = canonical_vocab(tokenizer)
    ids, bits = token_bits(model, tokenizer, doc, start)
    data = doc.encode("utf-8")
    out = [0.0] * len(data)
    for (a, b), v in zip(token_spans(ids, keys, len(data)), bits):
        for p in range(a, b):
            out[p] = v / (b - a)
    return out


def score_variant(model, tokenizer, docs, start, base_bytes, new_mask: torch.Tensor, *, oracle: bool) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Bits per byte per domain (the oracle when asked) and, per domain, excess bits per target kind."""
    _, keys = canonical_vocab(tokenizer)
    scores, parts = {}, {}
    for dom, texts in docs.items():
        total, nbytes, excess = 0.0, 0, {"new": 0.0, "shared whitespace": 0.0, "shared other": 0.0}
        for j, doc in enumerate(texts):
            ids, bits = token_bits(model, tokenizer, doc, start, hide=new_mask if oracle else None)
            data = doc.encode("utf-8")
            for i, (a, b), v in zip(ids, token_spans(ids, keys, len(data)), bits):
                paid = sum(base_bytes[dom][j][a:b])
                if oracle and new_mask[i]:
                    v = paid
                total += v
                key = keys.get(i)
                kind = "new" if new_mask[i] else \
                    "shared whitespace" if isinstance(key, bytes) and key and not key.strip() else "shared other"
                excess[kind] += v - paid
            nbytes += len(data)
        scores[dom] = total / nbytes
        parts[dom] = {k: v / nbytes for k, v in excess.items()}
    return scores, parts


def apply_variant(name: str, weight: torch.Tensor, start_rows: torch.Tensor, todo: torch.Tensor, ids, mask,
                  old: torch.Tensor, u: torch.Tensor, new_vocab: dict[str, int], old_vocab: dict[str, int]) -> bool:
    """Write the rows of variant `name` into `weight` (from `start_rows`, the full initialised matrix);
    returns whether the variant asks for oracle scoring."""
    weight.copy_(start_rows)
    count = mask.sum(1)
    oracle = False
    for part in name.split("+"):
        kind, _, value = part.partition("=")
        rows = weight[todo]
        if kind == "mean":
            continue
        if kind == "oracle":
            oracle = True
        elif kind == "first":
            weight[todo] = old[ids[:, 0]]
        elif kind == "last":
            weight[todo] = old[ids.gather(1, (count - 1).clamp_min(0)[:, None])[:, 0]]
        elif kind == "scale":
            weight[todo] = float(value) * rows
        elif kind == "beta":
            weight[todo] = rows + float(value) * (count - 1).clamp_min(0).float()[:, None] * u.to(rows.dtype)
        elif kind == "ws":
            low, high = (int(x) for x in value.split(":"))
            for piece, idx in new_vocab.items():
                if low <= len(piece) <= high and set(piece) == {"▁"}:
                    tabs = "ĉ" * max(1, round(len(piece) / 4))
                    weight[idx] = old[old_vocab[tabs] if tabs in old_vocab else old_vocab["ĉ"]]
        else:
            raise ValueError(f"unknown variant part {part!r}")
    return oracle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["gpt2"], choices=["gpt2", "mistral", "gemma"])
    parser.add_argument("--methods", nargs="+", default=["mean"])
    parser.add_argument("--variants", nargs="+", default=["mean", "beta=-2"])
    parser.add_argument("--split", default="tune", choices=["tune", "heldout"])
    parser.add_argument("--u-from", default="tune", choices=["tune", "generated"],
                        help="text u is fitted on: the tune documents, or the model's own samples")
    parser.add_argument("--breakdown", action="store_true", help="print excess bits per byte by target kind")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    docs = bpb.documents(8, 2000, args.split)
    model, tok = assets.load_smollm2()
    start = bpb.start_vector(model, tok)
    _, base = bpb.baseline(docs)
    fit_texts = sampled_texts(model, tok) if args.u_from == "generated" else \
        sum(bpb.documents(8, 2000, "tune").values(), [])
    u = constant_direction(model, tok, fit_texts)
    need_bytes = args.breakdown or any("oracle" in v for v in args.variants)
    with torch.no_grad():
        base_bytes = {dom: [byte_costs(model, tok, d, start) for d in texts] for dom, texts in docs.items()} \
            if need_bytes else None
    old = model.get_input_embeddings().weight.detach().clone()
    old_vocab = tok.get_vocab()
    for pair in args.pairs:
        tok_dir, _ = bpb.pair_sources(pair)
        for method in args.methods:
            spec = {"type": "tokenizer_transplant", "tokenizer": tok_dir, "method": method, "progress": False}
            with hfpatch.patch(model, hfpatch.Recipe([spec])) as handle:
                alignment = handle.technique("tokenizer_transplant").alignment
                todo = torch.tensor(alignment.todo)
                ids, mask = pad_pieces([alignment.pieces[i] for i in alignment.todo])
                weight = model.get_input_embeddings().weight  # tied: also the output rows
                initial = weight.detach().clone()
                new_mask = torch.zeros(weight.shape[0], dtype=torch.bool)
                new_mask[todo] = True
                new_vocab = handle.tokenizer.get_vocab()
                for name in args.variants:
                    with torch.no_grad():
                        oracle = apply_variant(name, weight, initial, todo, ids, mask, old, u, new_vocab, old_vocab)
                    if need_bytes:
                        scores, parts = score_variant(model, handle.tokenizer, docs, start, base_bytes, new_mask,
                                                      oracle=oracle)
                    else:
                        scores, parts = bpb.score(model, handle.tokenizer, docs, start), None
                    print(f"{args.split} {pair} {method} {name} (u: {args.u_from}): " + "  ".join(
                        f"{dom} {v:.4f} (x{v / base[dom]:.3f})" for dom, v in scores.items()), flush=True)
                    if args.breakdown and parts:
                        for dom, p in parts.items():
                            print(f"    {dom} excess bits/byte: " + ", ".join(f"{k} {v:+.4f}" for k, v in p.items()),
                                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())