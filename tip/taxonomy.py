"""TIP taxonomy: normalised entropy and divergence, quadrant labels Q1-Q4, and per-quadrant statistics.

All statistics (percentiles, min/max, medians) are taken over valid positions only, so padding, prompt and tool
tokens never move a threshold. ``scope='batch'`` pools all valid tokens of the tensor passed in (the paper's
"within each batch"); ``scope='sequence'`` takes them per row.
"""

from __future__ import annotations

from typing import Callable

import torch

NORM_SCOPES = ("batch", "sequence")
QUADRANTS = ("q1", "q2", "q3", "q4")


def _per_scope(values: torch.Tensor, mask: torch.Tensor, scope: str, fn: Callable) -> torch.Tensor:
    """Apply ``fn(valid_values_1d) -> transformed_1d`` to each scope group; invalid positions become 0."""
    if scope not in NORM_SCOPES:
        raise ValueError(f"unknown normalisation scope {scope!r}; known: {', '.join(NORM_SCOPES)}")
    out = torch.zeros_like(values, dtype=torch.float32)
    if scope == "batch":
        if mask.any():
            out[mask] = fn(values[mask].float())
        return out
    for row in range(values.shape[0]):
        if mask[row].any():
            out[row][mask[row]] = fn(values[row][mask[row]].float())
    return out


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    # A constant group carries no ranking information; map it to 0 rather than dividing by zero.
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def minmax_normalise(values: torch.Tensor, mask: torch.Tensor, scope: str = "batch") -> torch.Tensor:
    """Min-max normalise to [0, 1] over the valid positions of each scope group."""
    return _per_scope(values, mask.bool(), scope, _minmax)


def clipped_minmax_normalise(
    values: torch.Tensor, mask: torch.Tensor, clip_quantile: float = 0.98, scope: str = "batch"
) -> torch.Tensor:
    """Clip at the given quantile of the valid values, then min-max normalise (the paper's entropy h-hat)."""
    if not 0.0 < clip_quantile <= 1.0:
        raise ValueError(f"clip_quantile must lie in (0, 1], got {clip_quantile}")

    def clip_then_minmax(x: torch.Tensor) -> torch.Tensor:
        return _minmax(x.clamp(max=torch.quantile(x, clip_quantile)))

    return _per_scope(values, mask.bool(), scope, clip_then_minmax)


def resolve_threshold(values: torch.Tensor, mask: torch.Tensor, threshold: float | str) -> float:
    """A threshold given as a number, or 'median' of the valid values."""
    if isinstance(threshold, str):
        if threshold != "median":
            raise ValueError(f"quadrant threshold must be a number or 'median', got {threshold!r}")
        valid = values[mask.bool()]
        return float(valid.float().median()) if valid.numel() else 0.0
    return float(threshold)


def quadrant_labels(
    entropy: torch.Tensor,
    divergence: torch.Tensor,
    mask: torch.Tensor,
    entropy_threshold: float | str = "median",
    divergence_threshold: float | str = "median",
) -> torch.Tensor:
    """Label each valid position 1..4 (Q1 high h/high delta, Q2 high h/low delta, Q3 low h/high delta,
    Q4 low h/low delta); invalid positions get 0. 'High' means strictly above the threshold."""
    mask = mask.bool()
    high_h = entropy > resolve_threshold(entropy, mask, entropy_threshold)
    high_d = divergence > resolve_threshold(divergence, mask, divergence_threshold)
    labels = torch.where(high_h, torch.where(high_d, 1, 2), torch.where(high_d, 3, 4))
    return torch.where(mask, labels, torch.zeros_like(labels)).to(torch.int8)


def quadrant_sums(
    labels: torch.Tensor, entropy: torch.Tensor, divergence: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Additive per-quadrant sums, shape (4, 4): rows Q1..Q4, columns (count, sum h, sum delta, kept count).

    Sums add across micro-batches and ranks (all-reduce them), then ``summarise_quadrants`` turns them into rates.
    """
    rows = []
    for q in range(1, 5):
        in_q = labels == q
        rows.append(
            torch.stack(
                [
                    in_q.sum().float(),
                    entropy[in_q].float().sum(),
                    divergence[in_q].float().sum(),
                    (in_q & keep.bool()).sum().float(),
                ]
            )
        )
    return torch.stack(rows)


def summarise_quadrants(sums: torch.Tensor) -> dict[str, float]:
    """Rates from ``quadrant_sums``: for each quadrant its token fraction, mean h, mean delta, and the fraction
    of its tokens that the active rule kept (``{q}/kept``), plus its share of all kept tokens (``{q}/of_kept``)."""
    count, sum_h, sum_d, kept = sums.double().unbind(-1)
    total, total_kept = count.sum().clamp_min(1), kept.sum().clamp_min(1)
    out: dict[str, float] = {}
    for i, q in enumerate(QUADRANTS):
        n = count[i].clamp_min(1)
        out[f"{q}/frac"] = float(count[i] / total)
        out[f"{q}/mean_h"] = float(sum_h[i] / n)
        out[f"{q}/mean_delta"] = float(sum_d[i] / n)
        out[f"{q}/kept"] = float(kept[i] / n)
        out[f"{q}/of_kept"] = float(kept[i] / total_kept)
    return out
