"""The OPD loss: a full-vocabulary divergence averaged over the kept tokens.

L = (1 / D) * sum_{t kept} div(P_S(.|c_t), P_T(.|c_t))

with D the number of kept tokens (``denominator='kept'``, the paper's Eq. 9) or of valid tokens
(``denominator='all'``, i.e. the all-token mean with dropped tokens contributing 0). Under gradient
accumulation and data parallelism, pass ``global_count``: the denominator summed over every
micro-batch and rank of the optimizer step, so that the step's gradient equals that of one big
batch. The caller then undoes whatever averaging its engine applies (``tip.step`` multiplies by
world_size x accumulation steps).

This is the training loss. ``tip.reference_loss`` holds the unfused reference (materialised logits,
autograd) that tests and benchmarks compare it with.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tip.signals import (
    SIGNAL_ROWS,
    RowSource,
    chunks,
    common_vocab,
    divergence,
    log_probs,
    row_signals,
    softcap,
    token_log_probs,
)

DENOMINATORS = ("auto", "kept", "all", "weight", "sequence")
"""train.denominator: D in L = (1/D) sum_{t kept} w_t div_t. kept: the kept tokens of the step (a
token mean over the global batch: the OPSD release's convention, and tip's default for hard masks);
all: the valid tokens (the all-token mean with dropped tokens as 0, what importance weights estimate
without bias); weight: the sum of the kept tokens' weights (a weighted mean; = kept for hard
masks); sequence: the paper's Eq. 1 and 9 read per rollout, the mean over rollouts of each
rollout's (weighted) mean over its kept tokens (``per_rollout_weights``; D = the rollouts with a
kept token), so a long episode counts as much as a short one; auto (the default): the rule's own
(``tip.selection.Rule.denominator``: kept for every hard-mask rule, all for entropy_sample_is,
weight for the other weighting rules)."""


@dataclass(frozen=True)
class FusedDivergence:
    """What ``fused_divergence_sum`` returns."""

    # scalar: the sum of the rows' divergences, differentiable w.r.t. hidden, weight, bias
    total: torch.Tensor
    per_row: torch.Tensor  # (K,) the rows' divergences, detached
    # (len(SIGNAL_ROWS), K): tip.signals.row_signals of the rows (detached), if asked
    signals: torch.Tensor | None
    # (K,) log P_S of each row's token, if tokens were given
    target_logp: torch.Tensor | None = None


class _FusedHeadDivergence(torch.autograd.Function):
    """The summed divergence of K rows through the student's output layer, with its gradients formed
    during the forward chunk loop (as Liger's fused linear cross-entropy does): each chunk's logits
    exist once, in forward, and what is held for backward is the gradient w.r.t. the hidden rows (K
    x H) and the output layer (V x H, accumulated across chunks in fp32), which backward scales by
    the incoming scalar gradient. The teacher's rows are projected once too. A ZeRO-3 layer receives
    one gradient per backward on every rank."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_rows, kind, beta, chunk_size, cap, with_signals,
                before_accumulate, row_weights, targets):
        rows = hidden.shape[0]
        per_row = torch.zeros(rows, dtype=torch.promote_types(hidden.dtype, torch.float32),
                              device=hidden.device)
        total = torch.zeros((), dtype=per_row.dtype, device=hidden.device)  # the (weighted) sum
        signals = torch.zeros(len(SIGNAL_ROWS), rows, dtype=torch.float32, device=hidden.device) \
            if with_signals else None
        target_logp = None if targets is None else \
            torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        # The weight and bias gradients are summed over chunks in (at least) fp32 and rounded to the
        # weight's dtype once: in bf16 every chunk's partial sum would be rounded to 8 bits.
        acc = torch.promote_types(weight.dtype, torch.float32)
        # The caller holds a ZeRO-3 weight whole around apply(): its gradient takes the full shape.
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device)
        for idx in chunks(torch.arange(rows, device=hidden.device), chunk_size):
            h = hidden[idx]
            with torch.enable_grad():
                logits = F.linear(h, weight, bias).detach().requires_grad_()
                s_logits, t_logits = common_vocab(softcap(logits, cap), teacher_rows(idx).detach())
                logp_s, logp_t = log_probs(s_logits), log_probs(t_logits)
                div = divergence(logp_s, logp_t, kind, beta)
                weighted = div if row_weights is None else div * row_weights[idx].to(div.dtype)
                (grad_logits,) = torch.autograd.grad(weighted.sum(), logits)
            per_row[idx] = div.detach().to(per_row.dtype)
            total += weighted.detach().sum().to(total.dtype)
            if signals is not None:
                signals[:, idx] = row_signals(logp_s.detach(), logp_t,
                                              reverse=div.detach() if kind == "reverse_kl"
                                              else None,
                                              forward=div.detach() if kind == "forward_kl"
                                              else None)
            if target_logp is not None:
                target_logp[idx] = token_log_probs(logp_s.detach(), targets[idx])
            if grad_hidden is not None:
                grad_hidden[idx] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().to(acc), h.to(acc))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.before_accumulate = before_accumulate
        outputs = [total, per_row] + [x for x in (signals, target_logp) if x is not None]
        ctx.mark_non_differentiable(*outputs[1:])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_total, *unused):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        # grad_total arrives in the sum's dtype (at least fp32); the scaling is done in
        # the accumulators' dtype.
        grad_hidden = None if grad_hidden is None else \
            (grad_hidden.to(grad_total.dtype) * grad_total).to(grad_hidden.dtype)
        grad_weight = None if grad_weight is None else \
            (grad_weight * grad_total.to(grad_weight.dtype)).to(weight_dtype)
        grad_bias = None if grad_bias is None else (grad_bias
                                                    * grad_total.to(grad_bias.dtype)).to(bias_dtype)
        if ctx.before_accumulate is not None:
            ctx.before_accumulate()
        return (grad_hidden, grad_weight, grad_bias, *[None] * 9)


def fused_divergence_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher: RowSource,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    chunk_size: int = 512,
    softcap: float | None = None,
    gather=contextlib.nullcontext,
    with_signals: bool = False,
    before_accumulate=None,
    row_weights: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> FusedDivergence:
    """Sum of the divergences of K rows, from the student's hidden states ``hidden`` (K, H) and
    output layer (``weight`` (V, H), ``bias``, optional final-logit ``softcap``), differentiable
    w.r.t. hidden, weight and bias.

    Equal to ``kept_token_divergence(...).sum()`` over ``F.linear(hidden, weight, bias)``, with each
    row projected once per model: logits exist one chunk (``chunk_size`` x V) at a time, and
    gradients are formed in the same loop. ``teacher(idx)`` returns the teacher's logits of rows
    ``idx`` (detached). ``gather`` is a context-manager factory entered once around the loop (ZeRO-3
    gathers sharded output layers there). With ``with_signals`` the loop also returns each row's
    ``tip.signals.row_signals`` (entropy / log|V| and both KL directions, unclamped;
    ``TokenSignals.from_flat`` clamps), so a step that keeps every token needs no scoring pass.
    ``before_accumulate()``, if given, is called at the end of backward, before autograd accumulates
    the returned gradients into ``weight`` and ``bias`` (ZeRO-3 makes an untied layer whole there).
    ``row_weights`` (K,), taken as constants: the sum is then sum_i w_i div_i, and so are its
    gradients (a weighting rule's per-token weights); ``per_row`` stays unweighted. ``targets``
    (K,): also log P_S of each row's token (``target_logp``).
    """
    # apply() runs inside gather(): autograd takes a parameter's shape from its first use in a
    # graph, and an output layer that no decoder module uses (untied) would otherwise be first used
    # as a ZeRO-3 shard of shape [0], and its whole-shaped gradient refused in backward.
    with gather():
        out = _FusedHeadDivergence.apply(hidden, weight, bias, teacher, kind, beta, chunk_size,
                                         softcap, with_signals, before_accumulate,
                                         None if row_weights is None else row_weights.detach(),
                                         targets)
    rest = list(out[2:])
    return FusedDivergence(total=out[0], per_row=out[1],
                           signals=rest.pop(0) if with_signals else None,
                           target_logp=rest.pop(0) if targets is not None else None)


def loss_denominator(keep_mask: torch.Tensor, valid_mask: torch.Tensor, denominator: str,
                     weights: torch.Tensor | None = None) -> float:
    """This micro-batch's contribution to the loss denominator (``DENOMINATORS``); ``weights`` (B,
    T) are the per-token weights (None: 1)."""
    kept = keep_mask.bool() & valid_mask.bool()
    if denominator == "kept" or (denominator == "weight" and weights is None):
        return float(kept.sum())
    if denominator == "all":
        return float(valid_mask.bool().sum())
    if denominator == "weight":
        return float(torch.where(kept, weights.double(), 0.0).sum())
    if denominator == "sequence":
        return float(kept.any(-1).sum())
    raise ValueError(f"unknown loss denominator {denominator!r}; known: kept, all, weight, "
                     "sequence (the recipe resolves auto)")


def per_rollout_weights(keep_mask: torch.Tensor, valid_mask: torch.Tensor,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) weights for train.denominator=sequence: each kept token's weight (1 for a hard mask)
    over its rollout's summed kept weights, so that with D = the rollouts that kept a token the loss
    is the mean over rollouts of each rollout's weighted mean."""
    kept = keep_mask.bool() & valid_mask.bool()
    w = kept.double() if weights is None else torch.where(kept, weights.double(), 0.0)
    per_rollout = w.sum(-1, keepdim=True)
    return torch.where(per_rollout > 0, w / per_rollout.clamp_min(1e-300), 0.0).float()


def normalised_loss(divergence_sum: torch.Tensor, count: float) -> torch.Tensor:
    """The OPD loss from the kept tokens' (weighted) summed divergence and the denominator D: sum /
    D, and 0 (still in the graph) when nothing counts. The one place the loss is normalised (the
    paper's Eq. 9 when D counts the kept tokens)."""
    count = float(count)
    return divergence_sum / count if count > 0 else divergence_sum * 0.0
