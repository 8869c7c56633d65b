"""The OPD loss: a full-vocabulary divergence averaged over the kept tokens.

L = (1 / D) * sum_{t kept} div(P_S(.|c_t), P_T(.|c_t))

with D the number of kept tokens (``denominator='kept'``, the paper's Eq. 9) or of valid tokens
(``denominator='all'``, i.e. the all-token mean with dropped tokens contributing 0). Under gradient accumulation
and data parallelism, pass ``global_count``: the denominator summed over every micro-batch and rank of the
optimizer step, so that the step's gradient equals that of one big batch. The caller then undoes whatever
averaging its engine applies (``tip.train`` multiplies by world_size x accumulation steps).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tip.signals import RowSource, chunks, common_vocab, divergence, log_probs, logits_rows, softcap

DENOMINATORS = ("kept", "all")


def kept_token_divergence(
    student: RowSource,
    teacher: RowSource,
    rows: torch.Tensor,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Divergence at each of ``rows`` (flat positions), differentiable through the student's row source.

    Teacher logits are detached. fp32 math; at most ``chunk_size x V`` fp32 log-probs are formed per chunk.
    """
    pieces = []
    for idx in chunks(rows, chunk_size):
        s_logits, t_logits = common_vocab(student(idx), teacher(idx).detach())
        pieces.append(divergence(log_probs(s_logits), log_probs(t_logits), kind, beta))
    if not pieces:
        return torch.zeros(0, dtype=torch.float32, device=rows.device)
    return torch.cat(pieces)


def _chunk_divergence(logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, beta: float,
                      cap: float | None) -> torch.Tensor:
    logits = softcap(logits, cap)
    s_logits, t_logits = common_vocab(logits, teacher_logits.detach())
    return divergence(log_probs(s_logits), log_probs(t_logits), kind, beta)


class _RecomputedHeadDivergence(torch.autograd.Function):
    """Divergence of kept rows through the student's output layer, chunk by chunk. Forward keeps no logits; backward
    recomputes each chunk's logits, takes the divergence's gradient w.r.t. them (autograd over chunk x V), and
    folds it into the hidden-state and weight gradients at once. The weight gradient is accumulated across chunks
    and handed to autograd once, so a ZeRO-3 parameter receives one gradient per backward on every rank."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_rows, kind, beta, chunk_size, softcap, gather):
        ctx.save_for_backward(hidden, weight, bias)
        ctx.args = (teacher_rows, kind, beta, chunk_size, softcap, gather)
        pieces = []
        with gather():
            for idx in chunks(torch.arange(hidden.shape[0], device=hidden.device), chunk_size):
                logits = F.linear(hidden[idx], weight, bias)
                pieces.append(_chunk_divergence(logits, teacher_rows(idx), kind, beta, softcap))
        if not pieces:
            return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias = ctx.saved_tensors
        teacher_rows, kind, beta, chunk_size, softcap, gather = ctx.args
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        # Weight and bias gradients are summed over chunks in (at least) fp32 and rounded to the weight's dtype
        # once: in bf16 every chunk's partial sum would be rounded to 8 bits.
        acc = torch.promote_types(weight.dtype, torch.float32)
        with gather():
            # Inside gather() a ZeRO-3 weight is whole again; its gradient takes the weight's full shape.
            if ctx.needs_input_grad[1]:
                grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            if bias is not None and ctx.needs_input_grad[2]:
                grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device)
            for idx in chunks(torch.arange(hidden.shape[0], device=hidden.device), chunk_size):
                h = hidden[idx]
                with torch.enable_grad():
                    logits = F.linear(h, weight, bias).detach().requires_grad_()
                    div = _chunk_divergence(logits, teacher_rows(idx), kind, beta, softcap)
                    (grad_logits,) = torch.autograd.grad(div, logits, grad_out[idx].to(div.dtype))
                if grad_hidden is not None:
                    grad_hidden[idx] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.t().to(acc), h.to(acc))
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0).to(acc)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def recomputed_kept_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher: RowSource,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    chunk_size: int = 512,
    softcap: float | None = None,
    gather=contextlib.nullcontext,
) -> torch.Tensor:
    """Divergence at each kept row, from the student's hidden states ``hidden`` (K, H) and output layer
    (``weight`` (V, H), ``bias``, optional final-logit ``softcap``), differentiable w.r.t. hidden, weight and bias.

    Equal to ``kept_token_divergence`` over ``F.linear(hidden, weight, bias)``, but what autograd holds for
    backward is ``hidden`` itself: logits exist only one chunk (``chunk_size`` x V) at a time, in forward and again
    in backward. ``teacher(idx)`` returns the teacher's logits of kept rows ``idx`` (detached; called in both
    passes). ``gather`` is a context-manager factory entered once in forward and once in backward, around every
    use of ``weight`` and ``teacher`` (ZeRO-3 gathers sharded output layers there).
    """
    return _RecomputedHeadDivergence.apply(hidden, weight, bias, teacher, kind, beta, chunk_size, softcap, gather)


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    kept_tokens: int
    valid_tokens: int
    divergence_sum: float  # sum of the kept tokens' divergences (for logging a per-token mean)


def loss_denominator(keep_mask: torch.Tensor, valid_mask: torch.Tensor, denominator: str) -> int:
    """This micro-batch's contribution to the loss denominator."""
    if denominator == "kept":
        return int((keep_mask.bool() & valid_mask.bool()).sum())
    if denominator == "all":
        return int(valid_mask.bool().sum())
    raise ValueError(f"unknown loss denominator {denominator!r}; known: {', '.join(DENOMINATORS)}")


def opd_loss(
    kept_divergences: torch.Tensor,
    keep_mask: torch.Tensor,
    valid_mask: torch.Tensor,
    denominator: str = "kept",
    global_count: float | None = None,
) -> LossOutput:
    """Reduce per-kept-token divergences to the OPD loss.

    kept_divergences: shape (K,), one value per kept valid position
    global_count:     the step's total denominator over micro-batches and ranks; defaults to this batch's own
    """
    keep_mask, valid_mask = keep_mask.bool(), valid_mask.bool()
    kept = int((keep_mask & valid_mask).sum())
    if kept != kept_divergences.numel():
        raise ValueError(f"got {kept_divergences.numel()} divergences for {kept} kept valid tokens")
    count = loss_denominator(keep_mask, valid_mask, denominator) if global_count is None else float(global_count)
    total = kept_divergences.sum()
    loss = total / count if count > 0 else total * 0.0
    return LossOutput(
        loss=loss, kept_tokens=kept, valid_tokens=int(valid_mask.sum()), divergence_sum=float(total.detach())
    )


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
    """The OPD loss over materialised (B, T, V) logits: divergence at kept valid positions, then ``opd_loss``."""
    rows = (keep_mask.bool() & valid_mask.bool()).reshape(-1).nonzero(as_tuple=True)[0]
    divs = kept_token_divergence(
        logits_rows(student_logits), logits_rows(teacher_logits), rows, kind, beta, chunk_size
    )
    return opd_loss(divs, keep_mask, valid_mask, denominator, global_count)
