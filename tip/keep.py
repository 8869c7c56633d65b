"""How many tokens a rule keeps, and which: the kernel every selection rule ends in.

- ``scope='sequence'``: k = max(1, floor(rho * m)) in each rollout with m valid tokens (the paper's
  Eq. 8);
- ``scope='batch'``:    K = max(1, floor(rho * M)) over all M valid tokens of the batch (the release
  helper). In a run the batch is the step's global batch: with ``gather`` (the run's all-gather over
  ranks) the top K is taken over every rank's tokens, so a deterministic rule keeps the same tokens
  on any number of processes, and a sampled rule draws from the same distribution (its noise comes
  from each rank's own stream).

Sampling without replacement with p proportional to w is done with the Gumbel-top-k trick (top-k of
log w + Gumbel noise), which is exactly sequential sampling without replacement and works for both
scopes. Also here: rho over training (``keep_at``) and its allowed values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SCOPES = ("sequence", "batch")


FINE_LEVELS, FINE_STEP = 3, 2.0 ** -50


def fine_uniform(shape: torch.Size, generator: torch.Generator | None, device) -> torch.Tensor:
    """U(0, 1) in fp64 resolved far below torch.rand's spacing near 0 (2^-53): a draw below 2^-50
    is redrawn uniformly inside [0, 2^-50), twice, so the smallest values reach about 2^-150.
    Three uniforms per element, whatever the values (the stream does not depend on them)."""
    draws = [torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
             for _ in range(FINE_LEVELS)]
    u, scale = draws[0], 1.0
    for finer in draws[1:]:
        scale *= FINE_STEP
        u = torch.where(u < scale, finer * scale, u)
    return u


def gumbel(shape: torch.Size, generator: torch.Generator | None, device) -> torch.Tensor:
    """Gumbel(0, 1) keys in fp64, -log E with E = -log(1 - V) ~ Exp(1), V ``fine_uniform``: keys
    reach about 100 (and 690 at E's fp64 floor). The former -log(-log u) with fp32 u clamped below 1
    stopped at 15.9, so a token whose log-weight lay more than that below the threshold (the
    lowest-entropy tokens) could never be drawn, which biased entropy_sample_is."""
    exponential = -torch.log1p(-fine_uniform(shape, generator, device))
    return -torch.log(exponential.clamp_min(1e-300))


def keep_count(num_valid: torch.Tensor, keep: float) -> torch.Tensor:
    """k = max(1, floor(rho * m)) where m > 0, and 0 where m = 0. A tiny epsilon absorbs float error
    (0.29 * 100 = 28.999...)."""
    k = torch.floor(num_valid.double() * keep + 1e-9).long().clamp_min(1)
    return torch.where(num_valid > 0, k, torch.zeros_like(k))


def keep_extreme(score: torch.Tensor, mask: torch.Tensor, keep: float, scope: str = "sequence",
                 order: str = "top", eligible: torch.Tensor | None = None,
                 generator: torch.Generator | None = None,
                 gather: BatchGather | None = None) -> torch.Tensor:
    """Boolean mask of the k highest (``order='top'``) or lowest (``'bottom'``) scores among valid
    positions, with k per scope as in the module docstring (of the valid positions). ``eligible``:
    only these may be kept (fewer than k when they are fewer). Ties are broken at random with
    ``generator`` (Soft-OR ties at 1.0 for every token of the clipped top entropy quantile: the
    earliest of them would win), or go to the earlier position without one. ``gather``: the batch
    scope's top K is taken over every rank's tokens (``global_top``)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown selection scope {scope!r}; known: {', '.join(SCOPES)}")
    mask = mask.bool()
    candidates = mask if eligible is None else mask & eligible.bool()
    key = score if score.dtype == torch.float64 else score.float()  # fp64 Gumbel keys stay fp64
    key = (key if order == "top" else -key).masked_fill(candidates.logical_not(), -math.inf)
    if scope == "batch" and gather is not None:
        return global_top(key, mask, candidates, keep, generator, gather)
    rows = key.reshape(1, -1) if scope == "batch" else key
    row_mask = mask.reshape(1, -1) if scope == "batch" else mask
    k = keep_count(row_mask.sum(-1), keep)
    priorities = None if generator is None else \
        torch.rand(rows.shape, generator=generator, device=rows.device)
    order_idx = ranked(rows, priorities)
    rank = torch.empty_like(order_idx)
    rank.scatter_(-1, order_idx,
                  torch.arange(rows.shape[-1], device=rows.device).expand_as(order_idx))
    kept = (rank < k.unsqueeze(-1)).reshape(mask.shape) & candidates
    return kept


@dataclass(frozen=True)
class BatchGather:
    """The step's global batch for ``scope='batch'``: ``concat`` concatenates a 1-D tensor over the
    ranks in rank order (an all-gather), ``rank`` is this process's place in that order."""

    concat: Callable[[torch.Tensor], torch.Tensor]
    rank: int


def global_top(key: torch.Tensor, mask: torch.Tensor, candidates: torch.Tensor, keep: float,
               generator: torch.Generator | None, gather: BatchGather) -> torch.Tensor:
    """The batch scope over every rank: the top K = keep_count(global valid count) of every rank's
    candidate keys, ties broken by random priorities from ``generator`` (else by rank, then
    position); this rank keeps its share. Gathers the counts, the keys and the priorities."""
    local = key[candidates]
    counts = gather.concat(torch.stack([candidates.sum(), mask.sum()]))  # (candidates, valid)
    keys_all = gather.concat(local)
    k = int(keep_count(counts[1::2].sum(), keep))
    priorities = None if generator is None else \
        gather.concat(torch.rand(local.shape, generator=generator, device=local.device))
    order = ranked(keys_all, priorities)
    chosen = torch.zeros(keys_all.numel(), dtype=torch.bool, device=key.device)
    chosen[order[:k]] = True
    start = int(counts[0::2][: gather.rank].sum())
    kept = torch.zeros(mask.numel(), dtype=torch.bool, device=key.device)
    kept[candidates.reshape(-1).nonzero(as_tuple=True)[0]] = chosen[start:start + local.numel()]
    return kept.reshape(mask.shape)


def ranked(keys: torch.Tensor, priorities: torch.Tensor | None = None) -> torch.Tensor:
    """Indices that sort each row of ``keys`` from largest to smallest; equal keys in the order of
    ``priorities`` (random draws, of keys' shape: a shuffle, then a stable sort), else in position
    order."""
    if priorities is None:
        return keys.argsort(dim=-1, descending=True, stable=True)
    shuffle = priorities.argsort(dim=-1)
    within = keys.gather(-1, shuffle).argsort(dim=-1, descending=True, stable=True)
    return shuffle.gather(-1, within)


def target_count(mask: torch.Tensor, keep: float, scope: str,
                 gather: BatchGather | None = None) -> torch.Tensor:
    """The number of tokens a rule is asked to keep on this rank: k per rollout, or K over the
    batch; with ``gather`` the global batch's K, counted on rank 0 (so the ranks' sum is K)."""
    if scope == "batch" and gather is not None:
        k = keep_count(gather.concat(mask.bool().sum().reshape(1)).sum(), keep)
        return k if gather.rank == 0 else torch.zeros_like(k)
    m = mask.bool().sum() if scope == "batch" else mask.bool().sum(-1)
    return keep_count(m, keep).sum()


KEEP_SCHEDULES = ("constant", "linear", "cosine", "step")


def keep_at(step: int, steps: int, keep: float, kind: str = "constant", start: float = 1.0,
            milestones=()) -> float:
    """rho at (0-based) ``step`` of ``steps``. constant: ``keep``; linear / cosine: from ``start``
    at the first step to ``keep`` at the last; step: ``start`` until the first of ``milestones``
    ([[step, rho], ...], 1-based steps as logged), then each milestone's rho from its step on."""
    if kind == "constant":
        return float(keep)
    if kind in ("linear", "cosine"):
        progress = step / max(steps - 1, 1)
        if kind == "linear":
            return float(start + (keep - start) * progress)
        return float(keep + (start - keep) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "step":
        value = float(start)
        for at, rho in sorted((int(a), float(r)) for a, r in milestones):
            if step + 1 >= at:
                value = rho
        return value
    raise ValueError(f"unknown keep schedule {kind!r}; known: {', '.join(KEEP_SCHEDULES)}")


def validate_keep(keep: float) -> float:
    keep = float(keep)
    if not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    return keep



def gumbel_threshold(keys: torch.Tensor, mask: torch.Tensor, keep: float,
                     scope: str, gather: BatchGather | None = None) -> torch.Tensor:
    """The (k+1)-th largest key of each scope group (k as the rules keep), broadcast to (B, T); -inf
    where the group keeps every valid token. ``gather``: the batch scope's group is every rank's."""
    mask = mask.bool()
    if scope == "batch" and gather is not None:
        every = gather.concat(keys.double()[mask])
        k = int(keep_count(torch.tensor(every.numel(), device=every.device), keep))
        kappa = every.sort(descending=True).values[k] if k < every.numel() else -math.inf
        return torch.full(mask.shape, float(kappa), dtype=torch.float64, device=mask.device)
    key = keys.double().masked_fill(~mask, -math.inf)
    rows = key.reshape(1, -1) if scope == "batch" else key
    m = (mask.reshape(1, -1) if scope == "batch" else mask).sum(-1)
    k = keep_count(m, keep)
    ordered = rows.sort(dim=-1, descending=True).values
    nxt = ordered.gather(-1, k.clamp(max=rows.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    nxt = torch.where(k < m, nxt, torch.full_like(nxt, -math.inf))  # k = m: nothing was left out
    return (nxt.expand(mask.numel()) if scope == "batch"
            else nxt.unsqueeze(-1).expand_as(key)).reshape(mask.shape)


