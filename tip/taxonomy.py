"""TIP taxonomy: normalised entropy and divergence, quadrant labels Q1-Q4, and per-quadrant
statistics.

All statistics (percentiles, min/max, medians) are taken over valid positions only, so padding,
prompt and tool tokens never move a threshold. ``scope='batch'`` pools all valid tokens of the
tensor passed in (the paper's "within each batch"); ``scope='sequence'`` takes them per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NORM_SCOPES = ("batch", "sequence")
QUADRANTS = ("q1", "q2", "q3", "q4")  # labels 1..4, in this order
QUADRANT_NAMES = {"q1": "uncertain+disagree", "q2": "uncertain+agree", "q3": "confident+disagree",
                  "q4": "confident+agree"}


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a 1-D tensor with linear interpolation, as ``torch.quantile`` computes it,
    but without its limit of 2^24 values (a batch-scoped statistic over 16k-token rollouts of many
    GPUs passes it)."""
    if x.numel() == 0:
        raise ValueError("quantile of an empty tensor")
    pos = q * (x.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, x.numel() - 1)
    return torch.lerp(x.kthvalue(lo + 1).values, x.kthvalue(hi + 1).values, pos - lo)


def lower_median(x: torch.Tensor) -> torch.Tensor:
    """``torch.median``'s median: the lower of the two middle values for an even count."""
    return x.kthvalue((x.numel() + 1) // 2).values


@dataclass(frozen=True)
class BatchStats:
    """Statistics of a batch's valid tokens that selection and the taxonomy use (0-dim tensors, on
    the signals' device). In a run they come from the step's *global* batch, gathered over ranks, so
    that the same rollouts select the same tokens on 1 or 8 GPUs."""

    entropy_cap: torch.Tensor  # the clip_quantile of h
    entropy_min: torch.Tensor
    divergence_min: torch.Tensor
    divergence_max: torch.Tensor
    entropy_median: torch.Tensor
    divergence_median: torch.Tensor

    @classmethod
    def of(cls, entropy: torch.Tensor, divergence: torch.Tensor,
           clip_quantile: float = 0.98) -> BatchStats:
        """From the 1-D valid values of h and delta (empty: every statistic is 0)."""
        _check_clip(clip_quantile)
        if entropy.numel() == 0:
            zero = entropy.new_zeros((), dtype=torch.float32)
            return cls(zero, zero, zero, zero, zero, zero)
        h, d = entropy.float(), divergence.float()
        return cls(quantile(h, clip_quantile), h.min(), d.min(), d.max(), lower_median(h),
                   lower_median(d))


def _check_clip(clip_quantile: float) -> None:
    if not 0.0 < clip_quantile <= 1.0:
        raise ValueError(f"clip_quantile must lie in (0, 1], got {clip_quantile}")


def _scaled(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    # A constant group carries no ranking information; map it to 0 rather than dividing by zero.
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(x))


def _per_scope(values: torch.Tensor, mask: torch.Tensor, scope: str, fn: Callable) -> torch.Tensor:
    """Apply ``fn(valid_values_1d) -> transformed_1d`` to each scope group; invalid positions become
    0."""
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
    return _scaled(x, x.min(), x.max())


def minmax_normalise(values: torch.Tensor, mask: torch.Tensor, scope: str = "batch",
                     stats: BatchStats | None = None) -> torch.Tensor:
    """Min-max normalise delta to [0, 1] over the valid positions of each scope group. With
    ``scope='batch'``, ``stats`` (if given) supplies the batch's min and max (the global batch's, in
    a run)."""
    mask = mask.bool()
    if scope == "batch" and stats is not None:
        return torch.where(mask, _scaled(values.float(), stats.divergence_min,
                                         stats.divergence_max), 0.0)
    return _per_scope(values, mask, scope, _minmax)


def clipped_minmax_normalise(
    values: torch.Tensor, mask: torch.Tensor, clip_quantile: float = 0.98, scope: str = "batch",
    stats: BatchStats | None = None,
) -> torch.Tensor:
    """Clip at the given quantile of the valid values, then min-max normalise (the paper's entropy
    h-hat). With ``scope='batch'``, ``stats`` (if given) supplies the batch's cap and minimum."""
    _check_clip(clip_quantile)
    mask = mask.bool()
    if scope == "batch" and stats is not None:
        clipped = torch.minimum(values.float(), stats.entropy_cap)
        return torch.where(mask, _scaled(clipped, stats.entropy_min, stats.entropy_cap), 0.0)

    def clip_then_minmax(x: torch.Tensor) -> torch.Tensor:
        return _minmax(x.clamp(max=quantile(x, clip_quantile)))

    return _per_scope(values, mask, scope, clip_then_minmax)


def resolve_threshold(values: torch.Tensor, mask: torch.Tensor, threshold: float | str,
                      median: torch.Tensor | None = None) -> torch.Tensor | float:
    """A threshold given as a number, or 'median' of the valid values (``median``, if given, is that
    median)."""
    if isinstance(threshold, str):
        if threshold != "median":
            raise ValueError(f"quadrant threshold must be a number or 'median', got {threshold!r}")
        if median is not None:
            return median
        valid = values[mask.bool()]
        return lower_median(valid.float()) if valid.numel() else 0.0
    return float(threshold)


def quadrant_labels(
    entropy: torch.Tensor,
    divergence: torch.Tensor,
    mask: torch.Tensor,
    entropy_threshold: float | str = "median",
    divergence_threshold: float | str = "median",
    stats: BatchStats | None = None,
) -> torch.Tensor:
    """Label each valid position 1..4 (Q1 high h/high delta, Q2 high h/low delta, Q3 low h/high
    delta, Q4 low h/low delta); invalid positions get 0. 'High' means strictly above the threshold.
    'median' thresholds are the medians in ``stats`` (the global batch's, in a run) or else of the
    valid values given."""
    mask = mask.bool()
    high_h = entropy > resolve_threshold(entropy, mask, entropy_threshold,
                                         None if stats is None else stats.entropy_median)
    high_d = divergence > resolve_threshold(divergence, mask, divergence_threshold,
                                            None if stats is None else stats.divergence_median)
    labels = torch.where(high_h, torch.where(high_d, 1, 2), torch.where(high_d, 3, 4))
    return torch.where(mask, labels, torch.zeros_like(labels)).to(torch.int8)


def quadrant_sums(
    labels: torch.Tensor, entropy: torch.Tensor, divergence: torch.Tensor, keep: torch.Tensor,
    teacher_entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive per-quadrant sums, shape (4, 5): rows Q1..Q4, columns (count, sum h, sum delta, kept
    count, sum of the teacher's entropy, 0 when not given).

    Sums add across micro-batches and ranks (all-reduce them), then ``summarise_quadrants`` turns
    them into rates.
    """
    rows = []
    for q in range(1, len(QUADRANTS) + 1):
        in_q = labels == q
        rows.append(
            torch.stack(
                [
                    in_q.sum().float(),
                    torch.where(in_q, entropy.float(), 0.0).sum(),
                    torch.where(in_q, divergence.float(), 0.0).sum(),
                    (in_q & keep.bool()).sum().float(),
                    torch.where(in_q, teacher_entropy.float(), 0.0).sum()
                 if teacher_entropy is not None
                    else torch.zeros((), device=entropy.device),
                ]
            )
        )
    return torch.stack(rows)


def summarise_quadrants(sums: torch.Tensor) -> dict[str, float]:
    """Rates from ``quadrant_sums``: for each quadrant its token fraction, mean h, mean delta, mean
    teacher entropy (``{q}/mean_h_teacher``), and the fraction of its tokens that the active rule
    kept (``{q}/kept``), plus its share of all kept tokens (``{q}/of_kept``)."""
    count, sum_h, sum_d, kept, sum_ht = sums.double().unbind(-1)
    total, total_kept = count.sum().clamp_min(1), kept.sum().clamp_min(1)
    out: dict[str, float] = {}
    for i, q in enumerate(QUADRANTS):
        n = count[i].clamp_min(1)
        out[f"{q}/frac"] = float(count[i] / total)
        out[f"{q}/mean_h"] = float(sum_h[i] / n)
        out[f"{q}/mean_delta"] = float(sum_d[i] / n)
        out[f"{q}/mean_h_teacher"] = float(sum_ht[i] / n)
        out[f"{q}/kept"] = float(kept[i] / n)
        out[f"{q}/of_kept"] = float(kept[i] / total_kept)
    return out
