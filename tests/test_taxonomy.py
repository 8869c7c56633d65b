"""Normalisation and quadrant taxonomy over valid tokens only."""

import pytest
import torch

from tip.taxonomy import (
    clipped_minmax_normalise,
    minmax_normalise,
    quadrant_labels,
    quadrant_sums,
    summarise_quadrants,
)


def test_clip_at_98th_percentile_then_minmax():
    x = torch.arange(100, dtype=torch.float32).reshape(1, 100)  # 0..99
    mask = torch.ones_like(x, dtype=torch.bool)
    out = clipped_minmax_normalise(x, mask, 0.98)
    cap = torch.quantile(x, 0.98)  # 97.02
    assert out.max() == 1.0 and out.min() == 0.0
    assert torch.allclose(out[0, :97], x[0, :97] / cap)
    assert (out[0, 98:] == 1.0).all()  # the top 2% are clipped to the cap


def test_normalisation_ignores_masked_values_and_zeroes_them():
    x = torch.tensor([[1.0, 2.0, 3.0, 500.0], [-9.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    out = minmax_normalise(x, mask)
    assert out.tolist() == [[0.0, 0.25, 0.5, 0.0], [0.0, 1.0, 1.0, 1.0]]
    per_seq = minmax_normalise(x, mask, scope="sequence")
    assert per_seq.tolist() == [[0.0, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # a constant row maps to 0
    with pytest.raises(ValueError, match="unknown normalisation scope 'step'"):
        minmax_normalise(x, mask, scope="step")


def test_quadrants_with_median_and_fixed_thresholds():
    h = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.99]])
    d = torch.tensor([[2.0, 0.1, 3.0, 0.2, 99.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)  # the masked outlier must not move the medians
    labels = quadrant_labels(h, d, mask)
    assert labels.tolist() == [[1, 2, 3, 4, 0]]
    fixed = quadrant_labels(h, d, mask, entropy_threshold=0.05, divergence_threshold=2.5)
    assert fixed.tolist() == [[2, 2, 1, 2, 0]]
    with pytest.raises(ValueError, match="number or 'median'"):
        quadrant_labels(h, d, mask, entropy_threshold="mean")


def test_quadrant_statistics_add_up():
    g = torch.Generator().manual_seed(0)
    h, d = torch.rand(4, 30, generator=g), torch.rand(4, 30, generator=g)
    mask = torch.rand(4, 30, generator=g) > 0.2
    keep = (torch.rand(4, 30, generator=g) > 0.5) & mask
    labels = quadrant_labels(h, d, mask)
    # Sums computed on two halves (as two micro-batches or ranks would) add to the whole.
    whole = quadrant_sums(labels, h, d, keep)
    halves = quadrant_sums(labels[:2], h[:2], d[:2], keep[:2]) + quadrant_sums(labels[2:], h[2:], d[2:], keep[2:])
    torch.testing.assert_close(whole, halves)
    stats = summarise_quadrants(whole)
    assert abs(sum(stats[f"q{i}/frac"] for i in range(1, 5)) - 1) < 1e-9
    assert abs(sum(stats[f"q{i}/of_kept"] for i in range(1, 5)) - 1) < 1e-9
    q1 = labels == 1
    assert stats["q1/kept"] == pytest.approx(float((keep & q1).sum() / q1.sum()))
    assert stats["q3/mean_h"] == pytest.approx(float(h[labels == 3].mean()), rel=1e-6)
