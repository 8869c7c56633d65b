"""What a step logs, summed over ranks: token counts and signal sums per quadrant, the sampler's
log-probability gap, the gradient's outcome, and the metrics record built from them."""

from __future__ import annotations

import math
import time

import torch

from tip.distributed import DistInfo, all_reduce_sum
from tip.signals import TokenSignals
from tip.taxonomy import quadrant_sums, summarise_quadrants

STEP_SUMS = ("valid_tokens", "kept_tokens", "sum_h", "sum_delta", "sum_delta_fwd", "sum_h_teacher",
             "sum_w", "sum_w2", "loss", "sum_logp_gap", "logp_gap_tokens", "target_tokens")


def reduce_step_sums(sig: TokenSignals, kept: torch.Tensor, labels: torch.Tensor,
                     loss_sum: torch.Tensor, dist: DistInfo,
                     weights: torch.Tensor | None = None,
                     sampler_logp: torch.Tensor | None = None,
                     target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's additive statistics summed over ranks: ``STEP_SUMS`` (fp64) and ``quadrant_sums``.
    Device tensors throughout (what NCCL needs), with no host synchronisation. ``sampler_logp``
    (B, T): the rollout engine's log-probabilities of the tokens, compared with the student's."""
    m = sig.mask.bool()
    kept_valid = kept.bool() & m
    w = kept_valid.double() if weights is None else torch.where(kept_valid, weights.double(), 0.0)
    local = torch.stack([m.sum().double(), kept_valid.sum().double(),
                         *(torch.where(m, x, 0.0).double().sum()
                           for x in (sig.entropy, sig.reverse_kl, sig.forward_kl,
                                     sig.teacher_entropy)),
                         w.sum(), w.square().sum(), loss_sum.double(),
                         *logp_gap_sums(sig, sampler_logp),
                         (m.sum() if target is None else target).double()])
    quad = quadrant_sums(labels, sig.entropy, sig.reverse_kl, kept, sig.teacher_entropy)
    return all_reduce_sum(local, dist), all_reduce_sum(quad, dist)


def logp_gap_sums(sig: TokenSignals, sampler_logp: torch.Tensor | None) -> list[torch.Tensor]:
    """Sum of |log P_engine - log P_S| over the sampled tokens, and their count (0, 0 without the
    engine's log-probabilities)."""
    if sampler_logp is None or sig.sampled_logp is None:
        zero = torch.zeros((), dtype=torch.float64, device=sig.mask.device)
        return [zero, zero]
    m = sig.mask.bool()
    gap = (sig.sampled_logp.double() - sampler_logp.double()).abs()
    return [torch.where(m, gap, 0.0).sum(), m.sum().double()]


def gradient_outcome(engine, loss: float) -> tuple[float | None, str]:
    """The step's gradient norm before clipping, and why the engine discarded the update ('' when it
    did not: the step is then skipped). Raises ``NonFiniteStep`` when the engine applied a
    non-finite update."""
    raw = engine.get_global_grad_norm()  # GuardedAdamW's without ZeRO
    grad_norm = None if raw is None else float(raw.item() if torch.is_tensor(raw) else raw)
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return grad_norm, ""
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    if not engine.was_step_applied():  # a non-finite norm discards the update at every ZeRO stage
        return grad_norm, (f"the gradient pass (the {what} went non-finite: loss {loss}, gradient "
                           f"norm {grad_norm}; the update was discarded)")
    raise NonFiniteStep(f"the {what} of the gradient pass went non-finite (loss {loss}, grad norm "
                        f"{grad_norm}) after finite signals, and the engine applied the update, so "
                        "the weights may hold NaN/inf; stopping here (checkpoints saved before "
                        "this step are intact)")


def step_metrics(totals: dict, quad: torch.Tensor, grad_norm: float | None,
                 clock: StepClock) -> dict:
    """What a step logs, from its summed statistics."""
    valid = max(totals["valid_tokens"], 1.0)
    # A weighted rule's kept tokens count as (sum w)^2 / sum w^2 tokens (= kept tokens with hard
    # masks).
    effective = totals["sum_w"] ** 2 / max(totals["sum_w2"], 1e-30)
    return {
        "loss": totals["loss"], "valid_tokens": int(totals["valid_tokens"]),
        "kept_tokens": int(totals["kept_tokens"]), "kept_frac": totals["kept_tokens"] / valid,
        # below 1 when a quadrant-only rule's quadrant held fewer tokens than it was asked to keep
        "kept_of_target": totals["kept_tokens"] / max(totals["target_tokens"], 1.0),
        "mean_h": totals["sum_h"] / valid, "mean_delta": totals["sum_delta"] / valid,
        "mean_delta_fwd": totals["sum_delta_fwd"] / valid,
        "mean_h_teacher": totals["sum_h_teacher"] / valid,
        "effective_tokens": effective,
        # effective tokens per kept token: 1 for hard masks, small when a few weights dominate
        "effective_frac": effective / max(totals["kept_tokens"], 1.0),
        "mean_weight": totals["sum_w"] / max(totals["kept_tokens"], 1.0),
        "grad_norm": grad_norm,
        "trained_tokens_per_s": totals["kept_tokens"] / max(clock.totals.get("gradient_s", 0.0),
                                                            1e-9),
        **clock.rounded(), **summarise_quadrants(quad),
        **({"rollout/logp_gap": totals["sum_logp_gap"] / totals["logp_gap_tokens"]}
           if totals["logp_gap_tokens"] else {}),
    }


class NonFiniteStep(RuntimeError):
    """Training cannot go on: non-finite values that no skipped step can keep out of the weights."""


class StepClock:
    """Wall time of a step's phases, summed per phase. On GPUs the device is synchronised at each
    lap, so a phase is charged with its own kernels (a few synchronisations per micro-batch)."""

    def __init__(self, device: torch.device):
        self.device, self.totals, self.last = device, {}, time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.last = now

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.totals.items()}
