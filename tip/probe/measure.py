"""One (probed, held-out) pair of batches measured: per-token losses and statistics, per-quadrant
and per-rule alignments with the held-out gradient (the package docstring defines them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from tip.config import selection_of
from tip.models import final_logit_softcap, hidden_states
from tip.probe.tail import cut_before_tail, train_tail_only
from tip.rollout import RolloutBatch
from tip.selection import SelectionParams, select
from tip.signals import (
    SIGNAL_ROWS,
    TokenSignals,
    common_vocab,
    divergence,
    log_probs,
    row_signals,
    softcap,
)
from tip.taxonomy import BatchStats, quadrant_labels

QUADRANTS = ("Q1", "Q2", "Q3", "Q4")
TOKEN_STATS = ("entropy", "reverse_kl", "forward_kl", "logit_signal", "curvature")
"""Per-token numbers the probe averages per quadrant (``ProbedTokens``)."""


@dataclass
class ProbedTokens:
    """A batch's valid response tokens, flat (N,) in the order of ``RolloutBatch.target_mask``."""

    losses: torch.Tensor  # (N,) the run's divergence per token, with graph to the tail parameters
    stats: dict[str, torch.Tensor]  # TOKEN_STATS, (N,) each, without graph
    signals: TokenSignals  # (B, T-1) for the selection rules


def probe_tokens(student, teacher, batch: RolloutBatch, kind: str, beta: float,
                 blocks: int) -> ProbedTokens:
    """Score ``batch``: the student's forward keeps a graph from its last ``blocks`` blocks on (its
    other parameters must not require gradients), the teacher's none."""
    mask = batch.target_mask
    valid = mask.reshape(-1).nonzero(as_tuple=True)[0]

    def response_logits(model):
        hidden = hidden_states(model, batch.input_ids, batch.attention_mask)[:, :-1]
        logits = model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[valid])
        return softcap(logits, final_logit_softcap(model))

    with torch.no_grad():
        t_logits = response_logits(teacher)
    with cut_before_tail(student, blocks):
        s_logits = response_logits(student)
    s_logits, t_logits = common_vocab(s_logits, t_logits)
    logp_s, logp_t = log_probs(s_logits), log_probs(t_logits)
    losses = divergence(logp_s, logp_t, kind, beta)
    with torch.no_grad():
        rows = row_signals(logp_s, logp_t)
        p_s, p_t = logp_s.exp(), logp_t.exp()
        stats = {"entropy": rows[0], "reverse_kl": rows[1].clamp_min(0),
                 "forward_kl": rows[2].clamp_min(0),
                 "logit_signal": (p_s - p_t).square().sum(-1),
                 "curvature": 1 - p_s.square().sum(-1)}
        flat = torch.zeros(len(SIGNAL_ROWS), mask.numel(), device=mask.device)
        flat[:, valid] = rows
        signals = TokenSignals.from_flat(flat, mask)
    return ProbedTokens(losses, stats, signals)


def summed_gradient(losses: torch.Tensor, params: list, weights: torch.Tensor) -> torch.Tensor:
    """The flat gradient of sum_t weights_t * losses_t over ``params`` (zeros for an empty set; the
    graph is kept for the next set)."""
    grads = torch.autograd.grad(losses, params, grad_outputs=weights.to(losses.dtype),
                                retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                      for p, g in zip(params, grads)])


def quadrant_masks(tokens: ProbedTokens, absolute: dict | None = None) -> dict[str, torch.Tensor]:
    """(N,) bool per quadrant: median thresholds of the batch's own valid tokens (as a run labels
    them), or ``absolute`` ones (``entropy``: h, ``divergence``: delta in nats)."""
    sig = tokens.signals
    stats = BatchStats.of(sig.entropy[sig.mask], sig.reverse_kl[sig.mask])
    h_cut = "median" if absolute is None else float(absolute["entropy"])
    d_cut = "median" if absolute is None else float(absolute["divergence"])
    labels = quadrant_labels(sig.entropy, sig.reverse_kl, sig.mask, h_cut, d_cut, stats)[sig.mask]
    return {q: labels == i + 1 for i, q in enumerate(QUADRANTS)}


def rule_params(cfg: DictConfig) -> dict[str, SelectionParams]:
    """Each of ``probe.rules`` as a run of it would select: the run's shared selection settings, the
    rule's own parameters (the configured selector's as configured, every other rule's from its
    own file)."""
    run = SelectionParams.of(cfg.selector, cfg.selection)
    return {rule: selection_of(run, rule) for rule in cfg.probe.rules}


def rule_mask(tokens: ProbedTokens, params: SelectionParams, keep: float,
              seed: int) -> torch.Tensor:
    """(N,) bool: the tokens the rule keeps at ``keep``, by the selection code training runs."""
    sig = tokens.signals
    generator = torch.Generator(device=sig.mask.device).manual_seed(seed)
    stats = BatchStats.of(sig.entropy[sig.mask], sig.reverse_kl[sig.mask], params.clip_quantile)
    return select(params, sig, keep, generator, stats).kept[sig.mask]


def token_alignments(losses: torch.Tensor, params: list, direction: torch.Tensor) -> torch.Tensor:
    """(N,) <grad of losses_t, direction> for every token t at once: the gradient of sum_t u_t
    losses_t is built with its graph (u = 0), its inner product with ``direction`` differentiated
    in u (the double-backward form of a Jacobian-vector product). Needs attention kernels with a
    double backward (eager: torch's SDPA kernels on CPU have none)."""
    u = torch.zeros_like(losses, requires_grad=True)
    grads = torch.autograd.grad(losses, params, grad_outputs=u, create_graph=True,
                                retain_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    (alignment,) = torch.autograd.grad(flat.double() @ direction, u)
    return alignment.double()


def probe_batch(student, teacher, probed: RolloutBatch, held_out: RolloutBatch, cfg,
                seed: int) -> dict:
    """Every measurement of one (probed, held-out) pair of batches (module docstring). Sums over
    token sets come from the per-token alignments (linear in the set); a rule's cosine needs its
    own gradient's norm, one backward per rule and keep."""
    params = train_tail_only(student, cfg.probe.blocks)
    kind, beta = cfg.divergence.name, cfg.divergence.beta
    held = probe_tokens(student, teacher, held_out, kind, beta, cfg.probe.blocks)
    g_ho = summed_gradient(held.losses, params, torch.ones_like(held.losses))
    del held
    tokens = probe_tokens(student, teacher, probed, kind, beta, cfg.probe.blocks)
    n = tokens.losses.numel()
    g_all = summed_gradient(tokens.losses, params, torch.ones_like(tokens.losses))
    phi = token_alignments(tokens.losses, params, g_ho)  # <g_t, g_ho>
    psi = token_alignments(tokens.losses, params, g_all)  # <g_t, g_all>
    descent = float(phi.sum())
    out = {"tokens": n, "held_out_tokens": int(held_out.target_mask.sum()),
           "tail_parameters": sum(p.numel() for p in params), "all_descent": descent,
           "all_descent_direct": float(g_all @ g_ho), "quadrants": {}, "rules": []}
    masks = {scheme: quadrant_masks(tokens, absolute)
             for scheme, absolute in (("median", None), ("absolute", cfg.probe.absolute))}
    for scheme, by_quadrant in masks.items():
        rows = {}
        for q, m in by_quadrant.items():
            count = int(m.sum())
            aligned = float(phi[m].sum())
            rows[q] = {"share": count / n, "descent_share": aligned / descent,
                       "phi": aligned / count if count else None,
                       "phi_relative": (aligned / count) / (descent / n) if count else None,
                       **{s: float(tokens.stats[s][m].mean()) if count else None
                          for s in TOKEN_STATS}}
        out["quadrants"][scheme] = rows
    q3 = masks["median"]["Q3"]
    q3_descent = float(phi[q3].sum())
    all_norm = float(g_all.norm())
    for rule, rule_selection in rule_params(cfg).items():
        for keep in cfg.probe.keeps:
            kept = rule_mask(tokens, rule_selection, float(keep), seed)
            norm = float(summed_gradient(tokens.losses, params, kept.float()).norm())
            out["rules"].append({
                "rule": rule, "keep": float(keep), "kept_frac": float(kept.float().mean()),
                "descent_share": float(phi[kept].sum()) / descent,
                "cosine_with_all": float(psi[kept].sum()) / max(norm * all_norm, 1e-300),
                "q3_descent_share": float(phi[kept & q3].sum()) / q3_descent
                if q3_descent else None})
    return out
