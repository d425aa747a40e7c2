"""The attention-pooling reader of benchmarks/vision/encoder_quality.py on synthetic token sets (no assets)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "vision"))
from encoder_quality import AttentionProbe  # noqa: E402


def _sets(n: int, seed: int, tokens: int = 32, dim: int = 16):
    """Each set: `tokens - 1` background tokens (one shared pattern plus noise) and, first, ONE token carrying
    the class (a marker channel plus the class's direction)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    classes = torch.randn(10, dim, generator=g) * 3
    classes[:, 0] = 0
    background = torch.randn(dim, generator=g)
    background[0] = 0
    x = background + 0.3 * torch.randn(n, tokens, dim, generator=g)
    x[:, 0] = classes[y] + 0.3 * torch.randn(n, dim, generator=g)
    x[:, 0, 0] = 6.0  # the marker a query can find
    return x, y


def test_attention_probe_is_a_set_reader_trained_on_all_tokens_read_on_a_subset():
    x, y = _sets(600, seed=0)  # one draw of class directions and background; 400 to train, 200 held out
    x, y, ex, ey = x[:400], y[:400], x[400:], y[400:]
    probe = AttentionProbe(x, y, steps=60, batch=64, lr=1e-2, seed=0)
    assert probe.accuracy(ex, ey) > 0.9
    # frozen, it reads any number of tokens: the class token and 3 background tokens are enough
    assert probe.accuracy(ex[:, :4], ey) > 0.9
    # and the order of the tokens does not matter (a softmax over the set, no positions)
    order = torch.randperm(ex.shape[1], generator=torch.Generator().manual_seed(1))
    assert float((probe.logits(ex[:, order]) - probe.logits(ex)).abs().max()) < 1e-4
    # without the class token the set says nothing about the class: near chance
    assert probe.accuracy(ex[:, 1:], ey) < 0.3


def test_attention_probe_is_seeded():
    x, y = _sets(100, seed=0)
    a = AttentionProbe(x, y, steps=20, seed=3)
    b = AttentionProbe(x, y, steps=20, seed=3)
    assert torch.equal(a.logits(x[:5]), b.logits(x[:5]))
