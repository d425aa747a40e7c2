"""Encoder-level quality of visual-token selection on the real DINOv2-S/14 tower and real digits.

For each image the tower gives 256 patch tokens (the features the assembled LLaVA's projector reads:
hidden_states[-1], CLS dropped) and, per layer, the column-mean attention each patch token receives (mean over
heads and all 257 queries, CLS column dropped: HiPrune's score). Each method keeps ``budget`` tokens
(11% / 22% / 33% of 256 by default); quality is measured three ways on the EVALUATION split:

- probe: a linear probe (multinomial logistic regression) trained on the mean of ALL 256 tokens of the tuning
  split, evaluated frozen on the mean of the KEPT tokens (it rewards selections whose mean looks like all
  tokens' mean, e.g. pooling and random, and punishes any biased choice);
- attention probe: a set reader closer to how a language model uses the tokens (``AttentionProbe``: learned
  queries attend over the tokens, a linear head reads the pooled vectors), trained on ALL 256 tokens of the
  tuning split, evaluated frozen on the KEPT tokens;
- kept on ink: the share of kept tokens whose patch holds the digit's ink (descriptive only);
- refit (diagnostic): the mean probe refitted on each method's kept tokens of the tuning split, evaluated on
  the evaluation split's kept tokens: how much the kept tokens still say, once the reader is not shifted;
- kNN: 10-nearest-neighbour vote (cosine) of the kept-token mean against the tuning split's all-token means;
- coverage: for each of the 256 tokens, the best cosine similarity to a kept token, averaged (1.0 = every
  token has an identical kept token).

Methods: unpruned, random (5 seeds, mean and spread), pooling (2D average pooling of the 16x16 grid to the
largest near-square grid within the budget), DivPrune (``hfpatch.kernels.diverse_select``, max-min on the
tower features), HiPrune (``hfpatch.techniques.vision.hiprune.hiprune_select``; its object layer is chosen on
the TUNING split only: a probe trained on the first half of the tuning split, accuracy of each candidate layer
on the second half at the two smallest budgets).

    python benchmarks/vision/encoder_quality.py --threads 2 --out /tmp/vision_encoder.json

Tower outputs are cached under hfpatch's asset cache (``bench/``), so a rerun skips the ~10 min of encoding.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from hfpatch.apps import vision_assets as va
from hfpatch.apps.assets import cache_dir

N_TOKENS = va.NUM_PATCHES
GRID = va.GRID


# ---------------------------------------------------------------------------------------------- features


def encode(split: str, n: int, batch: int = 16, progress: bool = True) -> dict:
    """Patch features [n, 256, 384] of the layer LLaVA reads and column-mean attention scores [n, 12, 256]."""
    tower_dir = va.dinov2_tower_dir()
    key = hashlib.sha256(f"{tower_dir.name}|{split}|{n}|v1".encode()).hexdigest()[:16]
    path = cache_dir() / "bench" / f"vision-encoder-{split}-{n}-{key}.pt"
    if path.is_file():
        return torch.load(path)
    data = va.mnist_digits(split, n=n)
    # Eager attention: the bench needs the attention weights; this is the measurement, not the technique.
    tower = va.dinov2_tower(attn_implementation="eager")
    feats, scores = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, batch):
            out = tower(pixel_values=data.pixels[i:i + batch], output_hidden_states=True, output_attentions=True)
            feats.append(out.hidden_states[-1][:, 1:].clone())
            # column mean over heads and all queries, CLS column dropped -> [B, layers, 256]
            scores.append(torch.stack([a.mean(dim=(1, 2))[:, 1:] for a in out.attentions], dim=1))
            if progress:
                print(f"  encoded {min(i + batch, n)}/{n} {split} digits ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
    result = {"features": torch.cat(feats), "scores": torch.cat(scores), "labels": data.labels,
              "index": data.index}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


# ---------------------------------------------------------------------------------------------- methods


def pool_grid(budget: int) -> tuple[int, int]:
    """The largest near-square grid (h, w), |h - w| <= 1, with h * w <= budget (and within 16x16)."""
    best = (1, 1)
    for h in range(1, GRID + 1):
        for w in (h, h + 1):
            if w <= GRID and h * w <= budget and h * w > best[0] * best[1]:
                best = (h, w)
    return best


def pooled_tokens(features: torch.Tensor, budget: int) -> torch.Tensor:
    """[n, 256, D] -> [n, h*w, D] by 2D adaptive average pooling of the 16x16 grid."""
    n, _, d = features.shape
    h, w = pool_grid(budget)
    x = features.transpose(1, 2).reshape(n, d, GRID, GRID)
    return torch.nn.functional.adaptive_avg_pool2d(x, (h, w)).reshape(n, d, h * w).transpose(1, 2)


def random_indices(n: int, budget: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N_TOKENS, generator=g)[:budget].sort().values for _ in range(n)])


def divprune_indices(features: torch.Tensor, budget: int) -> torch.Tensor:
    from hfpatch.kernels.diverse_select import diverse_select

    return diverse_select(features, budget, method="max_min")  # [B, N, D] -> [B, budget], each image on its own


def hiprune_indices(scores: torch.Tensor, object_layer: int, deep_layer: int, budget: int) -> torch.Tensor:
    from hfpatch.techniques.vision.hiprune import hiprune_select

    return torch.stack([
        torch.as_tensor(hiprune_select(s[object_layer], s[deep_layer], (GRID, GRID), budget, alpha=0.1)).sort().values
        for s in scores])


def gather(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(features, 1, idx.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


# ---------------------------------------------------------------------------------------------- metrics


class Probe:
    """Multinomial logistic regression on standardised 384-d means (L-BFGS, small L2)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3):
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - self.mean) / self.std
        self.w = torch.zeros(x.shape[1], 10, requires_grad=True)
        self.b = torch.zeros(10, requires_grad=True)
        opt = torch.optim.LBFGS([self.w, self.b], max_iter=300, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ self.w + self.b, y) + l2 * self.w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float((((x - self.mean) / self.std) @ self.w + self.b).argmax(-1).eq(y).float().mean())


class AttentionProbe:
    """A set reader: learned queries attend over the tokens given, a linear head reads the pooled vectors.

    A language model reads visual tokens by attention, not by averaging them, so a selection that keeps the
    informative tokens (e.g. the digit's strokes) and drops most of the background should not be punished
    the way the mean probe punishes it. Per token: channel standardisation (tuning statistics), then keys
    ``[key_dim]`` and values ``[value_dim]`` (linear); each of ``queries`` learned queries takes a softmax
    over the tokens present; the pooled values are concatenated and a linear head gives the 10 logits.
    Trained once on ALL 256 tokens of the tuning digits (Adam, fixed steps and sizes, seeded; nothing is
    chosen on the evaluation split), then evaluated frozen on whatever tokens a method keeps: the softmax
    simply runs over fewer tokens.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, queries: int = 4, key_dim: int = 32,
                 value_dim: int = 64, steps: int = 300, batch: int = 64, lr: float = 3e-3,
                 weight_decay: float = 1e-4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        d = x.shape[-1]
        flat = x.reshape(-1, d)
        self.mean, self.std = flat.mean(0), flat.std(0).clamp_min(1e-6)

        def init(*shape):
            return (torch.randn(*shape, generator=g) / shape[0] ** 0.5).requires_grad_(True)

        self.wk, self.wv = init(d, key_dim), init(d, value_dim)
        self.q = init(key_dim, queries)
        self.head = init(queries * value_dim, 10)
        self.bias = torch.zeros(10, requires_grad=True)
        params = [self.wk, self.wv, self.q, self.head, self.bias]
        # AdamW written out: torch.optim's first step imports torch._dynamo (~20 s on a loaded core), which
        # would cost more than this whole probe
        m = [torch.zeros_like(t) for t in params]
        v = [torch.zeros_like(t) for t in params]
        self.losses = []
        for step in range(1, steps + 1):
            pick = torch.randint(len(x), (min(batch, len(x)),), generator=g)
            loss = torch.nn.functional.cross_entropy(self.logits(x[pick]), y[pick])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for t, grad, m_t, v_t in zip(params, grads, m, v):
                    m_t.mul_(0.9).add_(grad, alpha=0.1)
                    v_t.mul_(0.999).addcmul_(grad, grad, value=0.001)
                    update = (m_t / (1 - 0.9 ** step)) / ((v_t / (1 - 0.999 ** step)).sqrt() + 1e-8)
                    t.mul_(1 - lr * weight_decay).sub_(update, alpha=lr)
            self.losses.append(float(loss.detach()))
        for t in params:
            t.requires_grad_(False)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[n, T, D]`` tokens (any T >= 1) -> ``[n, 10]``."""
        z = (tokens - self.mean) / self.std
        k, v = z @ self.wk, z @ self.wv  # [n, T, key], [n, T, value]
        attn = torch.softmax((k @ self.q) / self.q.shape[0] ** 0.5, dim=1)  # [n, T, queries], over tokens
        pooled = torch.einsum("ntq,ntv->nqv", attn, v).flatten(1)
        return pooled @ self.head + self.bias

    def accuracy(self, tokens: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self.logits(tokens).argmax(-1).eq(y).float().mean())


def knn_accuracy(db: torch.Tensor, db_y: torch.Tensor, q: torch.Tensor, q_y: torch.Tensor, k: int = 10) -> float:
    dbn = torch.nn.functional.normalize(db, dim=-1)
    qn = torch.nn.functional.normalize(q, dim=-1)
    nn_idx = (qn @ dbn.T).topk(k, dim=-1).indices
    votes = torch.nn.functional.one_hot(db_y[nn_idx], 10).sum(1).float()
    votes += 1e-3 * torch.nn.functional.one_hot(db_y[nn_idx[:, 0]], 10)  # ties: nearest neighbour decides
    return float(votes.argmax(-1).eq(q_y).float().mean())


def coverage(features: torch.Tensor, kept: torch.Tensor) -> float:
    f = torch.nn.functional.normalize(features, dim=-1)
    k = torch.nn.functional.normalize(kept, dim=-1)
    return float((f @ k.transpose(1, 2)).max(-1).values.mean())


def ink_mask(split: str, n: int, threshold: float = 0.05) -> torch.Tensor:
    """``[n, 256]`` bool: the patch holds the digit's ink (more than ``threshold`` of its pixels are brighter
    than halfway between background and full white). Describes what a method keeps; never used to choose."""
    px = va.mnist_digits(split, n=n).pixels[:, 0]  # channel 0 of the normalised grey image
    lo, hi = px.amin(), px.amax()
    bright = (px > (lo + hi) / 2).float()
    return bright.reshape(n, GRID, va.PATCH_SIZE, GRID, va.PATCH_SIZE).mean((2, 4)).reshape(n, N_TOKENS) > threshold


def evaluate(kept: torch.Tensor, ev: dict, probe: Probe, db: torch.Tensor, db_y: torch.Tensor,
             attention: AttentionProbe | None = None, idx: torch.Tensor | None = None) -> dict:
    """Scores of one method's kept tokens ``[n, k, D]``; ``idx`` ``[n, k]`` (None for merged tokens) gives the
    share of kept tokens on ink (``ev["ink"]``)."""
    mean = kept.mean(1)
    res = {"probe": probe.accuracy(mean, ev["labels"]), "knn": knn_accuracy(db, db_y, mean, ev["labels"]),
           "coverage": coverage(ev["features"], kept)}
    if attention is not None:
        res["attention_probe"] = attention.accuracy(kept, ev["labels"])
    if idx is not None and "ink" in ev:
        res["ink_share"] = float(torch.gather(ev["ink"], 1, idx).float().mean())
    return res


# ---------------------------------------------------------------------------------------------- study


def choose_object_layer(tune: dict, budgets: list[int], deep_layer: int, candidates: list[int]) -> tuple[int, dict]:
    """HiPrune's object layer for this tower, from the tuning split alone (see the module docstring)."""
    half = len(tune["labels"]) // 2
    probe = Probe(tune["features"][:half].mean(1), tune["labels"][:half])
    held = {k: v[half:] for k, v in tune.items()}
    table = {}
    for layer in candidates:
        accs = [probe.accuracy(gather(held["features"], hiprune_indices(held["scores"], layer, deep_layer, b)).mean(1),
                               held["labels"]) for b in budgets[:2]]
        table[layer] = sum(accs) / len(accs)
    best = max(table, key=lambda layer: (table[layer], -abs(layer - len(candidates) // 2)))
    return best, table


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tuning", type=int, default=1000, help="tuning-split digits (probe, kNN base, layer choice)")
    ap.add_argument("--evaluation", type=int, default=1000, help="evaluation-split digits (reported numbers)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[round(N_TOKENS * r) for r in (1 / 9, 2 / 9, 1 / 3)])
    ap.add_argument("--seeds", type=int, default=5, help="random-selection seeds")
    ap.add_argument("--deep-layer", type=int, default=11, help="HiPrune register layer (the layer LLaVA reads)")
    ap.add_argument("--object-layer", type=int, default=None, help="fix HiPrune's object layer (default: chosen "
                    "on the tuning split among --candidates)")
    ap.add_argument("--candidates", type=int, nargs="+", default=list(range(1, 11)))
    ap.add_argument("--methods", nargs="+", default=["random", "pooling", "divprune", "hiprune"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    tune = encode("tuning", args.tuning)
    ev = encode("evaluation", args.evaluation)
    db, db_y = tune["features"].mean(1), tune["labels"]
    probe = Probe(db, db_y)
    t1 = time.perf_counter()
    attention = AttentionProbe(tune["features"], tune["labels"], seed=0)
    attention_seconds = round(time.perf_counter() - t1, 1)
    ev["ink"] = ink_mask("evaluation", args.evaluation)
    everything = torch.arange(N_TOKENS).expand(len(ev["labels"]), -1)
    results: dict = {"unpruned": evaluate(ev["features"], ev, probe, db, db_y, attention, everything)}
    rows = [("unpruned", N_TOKENS, results["unpruned"], "")]
    missing = {}
    layer_table = None
    object_layer = args.object_layer
    if "hiprune" in args.methods and object_layer is None:
        try:
            object_layer, layer_table = choose_object_layer(tune, args.budgets, args.deep_layer, args.candidates)
        except ImportError as e:
            missing["hiprune"] = str(e)
    def keep(method: str, data: dict, budget: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One method's kept tokens ``[n, k, D]`` of ``data`` and their indices (None when merged)."""
        if method == "random":
            idx = random_indices(len(data["labels"]), budget, seed)
        elif method == "pooling":
            return pooled_tokens(data["features"], budget), None
        elif method == "divprune":
            idx = divprune_indices(data["features"], budget)
        elif method == "hiprune":
            idx = hiprune_indices(data["scores"], object_layer, args.deep_layer, budget)
        else:
            raise SystemExit(f"unknown method {method!r}; choose from random pooling divprune hiprune")
        return gather(data["features"], idx), idx

    def score(method: str, budget: int, seed: int = 0) -> dict:
        kept, idx = keep(method, ev, budget, seed)
        res = evaluate(kept, ev, probe, db, db_y, attention, idx)
        # Diagnostic, not a reader a VLM has: the mean probe refitted on this method's kept tokens of the
        # TUNING digits. It separates "the kept tokens lost the digit" from "the all-token reader is shifted".
        refit = Probe(keep(method, tune, budget, seed)[0].mean(1), tune["labels"])
        res["probe_refit"] = refit.accuracy(kept.mean(1), ev["labels"])
        return res

    for budget in args.budgets:
        for method in args.methods:
            if method == "hiprune" and "hiprune" in missing:
                continue
            try:
                if method == "random":
                    runs = [score(method, budget, s) for s in range(args.seeds)]
                    res = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
                    res.update({f"{k}_min": min(r[k] for r in runs) for k in runs[0]})
                    res.update({f"{k}_max": max(r[k] for r in runs) for k in runs[0]})
                    note = f"mean of {args.seeds} seeds"
                else:
                    res = score(method, budget)
                    note = {"pooling": "x".join(map(str, pool_grid(budget))) + " grid", "divprune": "max_min",
                            "hiprune": f"object layer {object_layer}, deep layer {args.deep_layer}"}.get(method, "")
            except ImportError as e:
                missing[method] = str(e)
                continue
            results[f"{method}@{budget}"] = res
            rows.append((method, budget, res, note))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit, "machine": machine(),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "tuning": args.tuning, "evaluation": args.evaluation, "budgets": args.budgets,
        "object_layer": object_layer, "object_layer_tuning_accuracy": layer_table, "deep_layer": args.deep_layer,
        "attention_probe": {"seconds": attention_seconds, "first_loss": attention.losses[0],
                            "last_loss": attention.losses[-1]},
        "results": results, "missing": missing, "seconds": round(time.perf_counter() - t0, 1),
    }
    base = results["unpruned"]
    print("| method | tokens kept | mean probe acc | % of unpruned | attention probe acc | % of unpruned | kNN acc "
          "| coverage | kept on ink | mean probe refit on kept (diagnostic) | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method, budget, res, note in rows:
        ink = f"{100 * res['ink_share']:.0f}%" if "ink_share" in res else "(merged)"
        refit = f"{100 * res['probe_refit']:.1f}" if "probe_refit" in res else ""
        print(f"| {method} | {budget} ({100 * budget / N_TOKENS:.0f}%) | {100 * res['probe']:.1f} | "
              f"{100 * res['probe'] / base['probe']:.1f} | {100 * res['attention_probe']:.1f} | "
              f"{100 * res['attention_probe'] / base['attention_probe']:.1f} | {100 * res['knn']:.1f} | "
              f"{res['coverage']:.3f} | {ink} | {refit} | {note} |")
    print(f"attention probe: trained {attention_seconds} s on {args.tuning} tuning digits (all 256 tokens), "
          f"loss {attention.losses[0]:.3f} -> {attention.losses[-1]:.3f}")
    if layer_table:
        print("HiPrune object layer on the tuning split (probe on tuning[:half], accuracy on tuning[half:], "
              f"mean of budgets {args.budgets[:2]}): " + ", ".join(f"{k}: {100 * v:.1f}" for k, v in layer_table.items())
              + f" -> {object_layer}")
    for method, why in missing.items():
        print(f"missing: {method}: {why}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
