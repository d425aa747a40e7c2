"""Encoder-level quality of visual-token selection on the real DINOv2-S/14 tower and real digits.

For each image the tower gives 256 patch tokens (the features the assembled LLaVA's projector reads:
hidden_states[-1], CLS dropped) and, per layer, the column-mean attention each patch token receives (mean over
heads and all 257 queries, CLS column dropped: HiPrune's score). Each method keeps ``budget`` tokens
(11% / 22% / 33% of 256 by default); quality is measured three ways on the EVALUATION split:

- probe: a linear probe (multinomial logistic regression) trained on the mean of ALL 256 tokens of the tuning
  split, evaluated frozen on the mean of the KEPT tokens;
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


def evaluate(kept: torch.Tensor, ev: dict, probe: Probe, db: torch.Tensor, db_y: torch.Tensor) -> dict:
    mean = kept.mean(1)
    return {"probe": probe.accuracy(mean, ev["labels"]), "knn": knn_accuracy(db, db_y, mean, ev["labels"]),
            "coverage": coverage(ev["features"], kept)}


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
    results: dict = {"unpruned": evaluate(ev["features"], ev, probe, db, db_y)}
    rows = [("unpruned", N_TOKENS, results["unpruned"], "")]
    missing = {}
    layer_table = None
    object_layer = args.object_layer
    if "hiprune" in args.methods and object_layer is None:
        try:
            object_layer, layer_table = choose_object_layer(tune, args.budgets, args.deep_layer, args.candidates)
        except ImportError as e:
            missing["hiprune"] = str(e)
    for budget in args.budgets:
        for method in args.methods:
            try:
                if method == "random":
                    runs = [evaluate(gather(ev["features"], random_indices(len(ev["labels"]), budget, s)), ev, probe,
                                     db, db_y) for s in range(args.seeds)]
                    res = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
                    res.update({f"{k}_min": min(r[k] for r in runs) for k in runs[0]})
                    res.update({f"{k}_max": max(r[k] for r in runs) for k in runs[0]})
                    note = f"mean of {args.seeds} seeds"
                elif method == "pooling":
                    kept = pooled_tokens(ev["features"], budget)
                    res, note = evaluate(kept, ev, probe, db, db_y), "x".join(map(str, pool_grid(budget))) + " grid"
                elif method == "divprune":
                    res, note = evaluate(gather(ev["features"], divprune_indices(ev["features"], budget)), ev, probe,
                                         db, db_y), "max_min"
                elif method == "hiprune":
                    if "hiprune" in missing:
                        continue
                    idx = hiprune_indices(ev["scores"], object_layer, args.deep_layer, budget)
                    res = evaluate(gather(ev["features"], idx), ev, probe, db, db_y)
                    note = f"object layer {object_layer}, deep layer {args.deep_layer}"
                else:
                    raise SystemExit(f"unknown method {method!r}; choose from random pooling divprune hiprune")
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
        "results": results, "missing": missing, "seconds": round(time.perf_counter() - t0, 1),
    }
    base = results["unpruned"]
    print(f"| method | tokens kept | probe acc | % of unpruned | kNN acc | coverage | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method, budget, res, note in rows:
        print(f"| {method} | {budget} ({100 * budget / N_TOKENS:.0f}%) | {100 * res['probe']:.1f} | "
              f"{100 * res['probe'] / base['probe']:.1f} | {100 * res['knn']:.1f} | {res['coverage']:.3f} | {note} |")
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
