"""The unfused reference OPD loss: divergences from materialised logits, differentiated by autograd.

Tests and benchmarks check the training loss (``tip.losses.fused_divergence_sum``, which never holds
the kept rows' logits) against this one; training never calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tip.losses import loss_denominator, normalised_loss
from tip.signals import RowSource, chunks, common_vocab, divergence, log_probs, logits_rows


def kept_token_divergence(
    student: RowSource,
    teacher: RowSource,
    rows: torch.Tensor,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Divergence at each of ``rows`` (flat positions), differentiable through the student's row
    source.

    Teacher logits are detached. fp32 math; at most ``chunk_size x V`` fp32 log-probs are formed per
    chunk.
    """
    pieces = []
    for idx in chunks(rows, chunk_size):
        s_logits, t_logits = common_vocab(student(idx), teacher(idx).detach())
        pieces.append(divergence(log_probs(s_logits), log_probs(t_logits), kind, beta))
    if not pieces:
        return torch.zeros(0, dtype=torch.float32, device=rows.device)
    return torch.cat(pieces)


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    kept_tokens: int
    valid_tokens: int
    divergence_sum: float  # sum of the kept tokens' divergences (for logging a per-token mean)


def opd_loss(
    kept_divergences: torch.Tensor,
    keep_mask: torch.Tensor,
    valid_mask: torch.Tensor,
    denominator: str = "kept",
    global_count: float | None = None,
    weights: torch.Tensor | None = None,
) -> LossOutput:
    """Reduce per-kept-token divergences to the OPD loss, (1/D) sum_{t kept} w_t div_t.

    kept_divergences: shape (K,), one value per kept valid position
    global_count:     the step's total denominator over micro-batches and ranks; defaults to
                      this batch's own
    weights:          (B, T) per-token weights of a weighting rule (None: 1, a hard mask)
    """
    kept_mask = keep_mask.bool() & valid_mask.bool()
    kept = int(kept_mask.sum())
    if kept != kept_divergences.numel():
        raise ValueError(f"got {kept_divergences.numel()} divergences for {kept} kept valid tokens")
    total = (kept_divergences.sum() if weights is None
             else (kept_divergences * weights[kept_mask]).sum())
    if global_count is None:
        global_count = loss_denominator(keep_mask, valid_mask, denominator, weights)
    return opd_loss_of_sum(total, keep_mask, valid_mask, denominator, global_count)


def opd_loss_of_sum(
    divergence_sum: torch.Tensor,
    keep_mask: torch.Tensor,
    valid_mask: torch.Tensor,
    denominator: str = "kept",
    global_count: float | None = None,
) -> LossOutput:
    """``opd_loss`` from the kept tokens' (weighted) summed divergence (what
    ``fused_divergence_sum`` returns)."""
    keep_mask, valid_mask = keep_mask.bool(), valid_mask.bool()
    count = (loss_denominator(keep_mask, valid_mask, denominator) if global_count is None
             else global_count)
    loss = normalised_loss(divergence_sum, count)
    return LossOutput(loss=loss, kept_tokens=int((keep_mask & valid_mask).sum()),
                      valid_tokens=int(valid_mask.sum()),
                      divergence_sum=float(divergence_sum.detach()))


def opd_loss_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    keep_mask: torch.Tensor,
    valid_mask: torch.Tensor,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    denominator: str = "kept",
    global_count: float | None = None,
    chunk_size: int = 512,
) -> LossOutput:
    """The OPD loss over materialised (B, T, V) logits: divergence at kept valid positions, then
    ``opd_loss``."""
    rows = (keep_mask.bool() & valid_mask.bool()).reshape(-1).nonzero(as_tuple=True)[0]
    divs = kept_token_divergence(
        logits_rows(student_logits), logits_rows(teacher_logits), rows, kind, beta, chunk_size
    )
    return opd_loss(divs, keep_mask, valid_mask, denominator, global_count)
