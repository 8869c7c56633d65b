"""Token-selection rules: which response positions the OPD loss trains on.

Every rule turns ``TokenSignals`` into a per-position score; the kernel of ``tip.keep`` then keeps
the top (or bottom) ``k`` valid positions per scope (its docstring: k per rollout or over the
global batch, Gumbel-top-k sampling). Stochastic rules draw from the given ``torch.Generator``.

Adding a rule is one small function decorated with ``@register_rule``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from tip.keep import (
    BatchGather,
    gumbel,
    gumbel_threshold,
    keep_extreme,
    target_count,
    validate_keep,
)
from tip.signals import TokenSignals
from tip.taxonomy import BatchStats, clipped_minmax_normalise, minmax_normalise, quadrant_labels


@dataclass(frozen=True)
class SelectionInputs:
    """What a rule's score may use: raw signals, the paper's normalised axes and a random
    generator."""

    signals: TokenSignals
    h_hat: torch.Tensor  # entropy clipped at a per-batch quantile, then min-max normalised
    d_hat: torch.Tensor  # reverse KL, min-max normalised
    generator: torch.Generator | None
    entropy_alpha: float
    log_vocab: float | None = None  # log|V|: turns the normalised entropies back into nats
    jsd_gamma: float = 1.0  # exponent of the normalised JSD in entropy_jsd_sample
    # each position's quadrant (1..4, 0 invalid) by the taxonomy's thresholds (tip.taxonomy)
    labels: torch.Tensor | None = None
    is_weight_cap: float = 10.0  # entropy_sample_is_capped: weights at most this / rho
    # the step's global batch over ranks, for scope='batch' (None: this process holds all of it)
    gather: BatchGather | None = None


ScoreFn = Callable[[SelectionInputs], torch.Tensor | None]
WeightFn = Callable[[SelectionInputs, "torch.Tensor | None", torch.Tensor, float,
                     str], torch.Tensor]
"""(inputs, the rule's score, the kept mask, keep, scope) -> per-token weights (B, T), read at kept
positions."""


@dataclass(frozen=True)
class Rule:
    name: str
    score: ScoreFn  # returns None for "keep every valid token"
    order: Literal["top", "bottom"]
    doc: str
    weight: WeightFn | None = None  # None: a hard mask (every kept token weighs 1)
    # the loss denominator under train.denominator=auto (tip.losses.DENOMINATORS)
    denominator: str = "kept"
    ignores_keep: bool = False  # keeps every valid token whatever rho (its score returns None)
    # optional TokenSignals fields the score reads (computed only for such rules)
    needs: tuple[str, ...] = ()
    # a quadrant-only rule: it keeps tokens of this quadrant (1..4) only, fewer when it is short
    quadrant: int | None = None


OPTIONAL_SIGNALS = {
    "jsd": "symmetric JSD(P_S, P_T) / log 2 (recorded when the step's rule reads it: Rule.needs)",
}
"""TokenSignals fields a rule may need that the scoring loop computes only when asked
(``Rule.needs``), with what each holds (token records keep them under the same names)."""

RULES: dict[str, Rule] = {}

SELECTOR_PARAMS = {"entropy_alpha": 1.0, "jsd_gamma": 1.0, "is_weight_cap": 10.0}
"""Parameters a selector's config file may carry (conf/selector/<rule>.yaml), with the value a rule
whose file has none would see: entropy_alpha, the exponent of h in the entropy-sampling rules;
jsd_gamma, the exponent of the JSD in entropy_jsd_sample; is_weight_cap, c in
entropy_sample_is_capped's bound c / rho on a token's weight."""


@dataclass(frozen=True)
class SelectionParams:
    """A rule and every knob ``select`` reads besides the tensors: built once from a run's settings
    (``of``) and passed whole, so that a run, the probe and the microscope select alike and no knob
    is dropped on the way.

    rule:           a registered name (see ``RULES``)
    scope:          'sequence' (k per rollout, default) or 'batch' (k over the batch)
    clip_quantile:  the entropy quantile clipped before min-max (paper: 0.98)
    norm_scope:     where h_hat and d_hat take their statistics: 'batch' (paper, default) or
                    'sequence'
    entropy_threshold, divergence_threshold: the quadrant thresholds (``quadrant_labels``), which
                    the quadrant-only rules keep to
    entropy_alpha, jsd_gamma, is_weight_cap: the rule's own parameters (``SELECTOR_PARAMS``)
    """

    rule: str
    scope: str = "sequence"
    clip_quantile: float = 0.98
    norm_scope: str = "batch"
    entropy_threshold: float | str = "median"
    divergence_threshold: float | str = "median"
    entropy_alpha: float = SELECTOR_PARAMS["entropy_alpha"]
    jsd_gamma: float = SELECTOR_PARAMS["jsd_gamma"]
    is_weight_cap: float = SELECTOR_PARAMS["is_weight_cap"]

    @classmethod
    def of(cls, selector, selection) -> SelectionParams:
        """From a run's ``selector`` block (the rule's own file: its name and parameters) and its
        ``selection`` block (what every rule shares); mappings, as the config holds them."""
        thresholds = selection["quadrant_thresholds"]
        return cls(rule=selector["name"], scope=selection["scope"],
                   clip_quantile=float(selection["clip_quantile"]),
                   norm_scope=selection["norm_scope"],
                   entropy_threshold=thresholds["entropy"],
                   divergence_threshold=thresholds["divergence"],
                   **{k: float(selector[k]) for k in SELECTOR_PARAMS if k in selector})

    def for_rule(self, selector) -> SelectionParams:
        """The same shared settings for another rule, with that rule's own parameters (``selector``:
        its file's block; a parameter it does not set takes the default)."""
        return dataclasses.replace(self, rule=selector["name"],
                                   **{k: float(selector.get(k, v))
                                      for k, v in SELECTOR_PARAMS.items()})

    def as_meta(self) -> dict:
        """As token records keep it (``of_meta`` reads it back)."""
        return {"selector": self.rule, "scope": self.scope, "norm_scope": self.norm_scope,
                "clip_quantile": float(self.clip_quantile),
                **{k: float(getattr(self, k)) for k in SELECTOR_PARAMS},
                "quadrant_thresholds": {"entropy": self.entropy_threshold,
                                        "divergence": self.divergence_threshold}}

    @classmethod
    def of_meta(cls, meta: dict) -> SelectionParams:
        """What a step's token records were selected with; records from before a parameter
        existed hold its default (and the medians as thresholds)."""
        thresholds = meta.get("quadrant_thresholds") or {}
        return cls(rule=meta["selector"], scope=meta["scope"],
                   clip_quantile=meta["clip_quantile"], norm_scope=meta["norm_scope"],
                   entropy_threshold=thresholds.get("entropy", "median"),
                   divergence_threshold=thresholds.get("divergence", "median"),
                   **{k: meta.get(k, v) for k, v in SELECTOR_PARAMS.items()})


def register_rule(name: str, order: Literal["top", "bottom"] = "top",
                  weight: WeightFn | None = None, denominator: str = "kept",
                  ignores_keep: bool = False, needs: tuple[str, ...] = (),
                  quadrant: int | None = None):
    """Register a score function as a selection rule under ``name`` (with ``weight``: a weighting
    rule, whose ``denominator`` is the loss's D under train.denominator=auto)."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        if name in RULES:
            raise ValueError(f"selection rule {name!r} is already registered")
        unknown = set(needs) - set(OPTIONAL_SIGNALS)
        if unknown:
            raise ValueError(f"rule {name!r} needs {sorted(unknown)}; optional signals are "
                             f"{tuple(OPTIONAL_SIGNALS)}")
        RULES[name] = Rule(name=name, score=fn, order=order, doc=(fn.__doc__ or "").strip(),
                           weight=weight, denominator=denominator, ignores_keep=ignores_keep,
                           needs=tuple(needs), quadrant=quadrant)
        return fn

    return wrap


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown selector {name!r}; known: {', '.join(sorted(RULES))}") from None


@register_rule("all", ignores_keep=True)
def _all(x: SelectionInputs):
    """Every valid token (all-token OPD); ignores keep."""
    return None


@register_rule("random")
def _random(x: SelectionInputs):
    """Uniformly random tokens, without replacement."""
    return torch.rand(x.signals.mask.shape, generator=x.generator, device=x.signals.mask.device)


@register_rule("entropy_sample")
def _entropy_sample(x: SelectionInputs):
    """Sample without replacement with p proportional to h^alpha (h = H/log|V|, floored at 1e-8 as
    in the release helper); the paper's 'entropy sampling'."""
    log_w = _entropy_log_weights(x)
    return log_w + gumbel(log_w.shape, x.generator, log_w.device)


@register_rule("entropy_topk")
def _entropy_topk(x: SelectionInputs):
    """Deterministic top-k by student entropy h."""
    return x.signals.entropy


@register_rule("div_topk")
def _div_topk(x: SelectionInputs):
    """Top-k by reverse KL delta (the paper's Div-only, LATF/AdaKD style)."""
    return x.signals.reverse_kl


@register_rule("q3")
def _q3(x: SelectionInputs):
    """Overconfidence score delta_fwd * (1 - h_hat), top-k (paper Sec. 7.3; forward KL used raw)."""
    return x.signals.forward_kl * (1.0 - x.h_hat)


def _soft_or(x: SelectionInputs) -> torch.Tensor:
    return x.h_hat + x.d_hat - x.h_hat * x.d_hat


@register_rule("soft_or")
def _soft_or_top(x: SelectionInputs):
    """TIP Soft-OR s = h_hat + d_hat - h_hat*d_hat, top-k."""
    return _soft_or(x)


@register_rule("soft_or_bottom", order="bottom")
def _soft_or_bottom(x: SelectionInputs):
    """Soft-OR, bottom-k (the paper's sanity check)."""
    return _soft_or(x)


# Quadrant-only rules keep tokens of their quadrant only, by the thresholds the taxonomy logs
# (selection.quadrant_thresholds: the global batch's medians by default), filling k inside the
# quadrant by the quadrant's own score; when the quadrant holds fewer than k tokens they keep all of
# it and no more (the step logs kept_of_target). Scores alone cannot do it: delta is heavy-tailed,
# so d_hat sits near 0 for almost every token and h_hat * (1 - d_hat) is entropy top-k, whichever
# quadrant the tokens are in.


@register_rule("q1", quadrant=1)
def _q1(x: SelectionInputs):
    """Q1 only (uncertain and disagreeing), filled by h_hat * d_hat."""
    return x.h_hat * x.d_hat


@register_rule("q2", quadrant=2)
def _q2(x: SelectionInputs):
    """Q2 only (uncertain and agreeing), filled by h_hat * (1 - d_hat)."""
    return x.h_hat * (1.0 - x.d_hat)


@register_rule("q3_only", quadrant=3)
def _q3_only(x: SelectionInputs):
    """Q3 only (confident and disagreeing), filled by the Q3 score delta_fwd * (1 - h_hat)."""
    return _q3(x)


@register_rule("q4", quadrant=4)
def _q4(x: SelectionInputs):
    """Q4 only (confident and agreeing, 'solved'), filled by (1 - h_hat) * (1 - d_hat)."""
    return (1.0 - x.h_hat) * (1.0 - x.d_hat)


def _need_teacher_entropy(x: SelectionInputs) -> torch.Tensor:
    if x.signals.teacher_entropy is None:
        raise ValueError("this rule needs the teacher's entropy (TokenSignals.teacher_entropy)")
    return x.signals.teacher_entropy


@register_rule("teacher_entropy_topk")
def _teacher_entropy_topk(x: SelectionInputs):
    """Top-k by the teacher's entropy H(P_T)/log|V| (the paper's App. B.1 axis): where the teacher
    is unsure."""
    return _need_teacher_entropy(x)


def _entropy_log_weights(x: SelectionInputs) -> torch.Tensor:
    return x.entropy_alpha * torch.log(x.signals.entropy.double().clamp_min(1e-8))


@register_rule("entropy_jsd_sample", needs=("jsd",))
def _entropy_jsd_sample(x: SelectionInputs):
    """Sample without replacement with p proportional to h^alpha * JSD^gamma (both floored at 1e-8;
    JSD the symmetric one over log 2, full vocabulary): the OPSD release's unused helper
    (``entropy_weighted_sample``), which joins the paper's two axes in one draw. gamma = 0 is
    entropy_sample."""
    if x.signals.jsd is None:
        raise ValueError("entropy_jsd_sample needs the JSD signal (token_signals(..., "
                         "with_jsd=True))")
    log_jsd = torch.log(x.signals.jsd.double().clamp_min(1e-8))
    log_w = _entropy_log_weights(x) + x.jsd_gamma * log_jsd
    return log_w + gumbel(log_w.shape, x.generator, log_w.device)


def _inverse_inclusion(x: SelectionInputs, score, kept, keep: float, scope: str) -> torch.Tensor:
    """1/q_t with q_t = P(log w_t + G > kappa) = 1 - exp(-exp(log w_t - kappa)), kappa the (k+1)-th
    largest perturbed key of the scope: the inclusion probability of t given the threshold (priority
    sampling; Duffield et al. 2007, Kool et al. 2020). sum_{t kept} x_t / q_t is then an unbiased
    estimate of sum_t x_t."""
    kappa = gumbel_threshold(score, x.signals.mask, keep, scope, x.gather)
    q = -torch.expm1(-torch.exp(_entropy_log_weights(x) - kappa))
    return torch.where(kept, 1.0 / q.clamp_min(1e-30), 0.0)  # finite in fp32


@register_rule("entropy_sample_is", weight=_inverse_inclusion, denominator="all")
def _entropy_sample_is(x: SelectionInputs):
    """Entropy sampling (p ~ h^alpha without replacement) with each kept token weighted by 1/q_t,
    its inclusion probability given the sample's threshold; D = the valid tokens. Unbiased given the
    rollouts and their signals, before gradient clipping: over the draws, the weighted kept sum
    averages to the all-token sum, so the loss and its gradient are unbiased estimates of the
    all-token ones (the correction the paper derives in App. A.3). Weights reach 1/q_t, which is
    large for low-entropy tokens (the step logs max_weight and effective_frac)."""
    log_w = _entropy_log_weights(x)
    return log_w + gumbel(log_w.shape, x.generator, log_w.device)


def _capped_inverse_inclusion(x: SelectionInputs, score, kept, keep: float,
                              scope: str) -> torch.Tensor:
    return _inverse_inclusion(x, score, kept, keep, scope).clamp(max=x.is_weight_cap / keep)


@register_rule("entropy_sample_is_capped", weight=_capped_inverse_inclusion, denominator="all")
def _entropy_sample_is_capped(x: SelectionInputs):
    """entropy_sample_is with each weight capped at c / rho (c = selector.is_weight_cap, 10): a
    bounded variance, and a bias: a token whose inclusion probability q_t is below rho / c counts
    c / rho instead of 1/q_t, so the estimate is low by sum over such tokens of x_t (1 - q_t c /
    rho) in expectation: the lowest-entropy tokens are under-weighted."""
    return _entropy_sample_is(x)


def _relative_confidence(x: SelectionInputs, *_) -> torch.Tensor:
    """sigmoid(H_student - H_teacher) in nats, as constants."""
    if x.log_vocab is None:
        raise ValueError("relative confidence needs log|V| (select(..., log_vocab=...)) to compare "
                         "entropies in nats")
    return torch.sigmoid((x.signals.entropy - _need_teacher_entropy(x)) * x.log_vocab)


@register_rule("rel_conf", weight=_relative_confidence, denominator="all", ignores_keep=True)
def _rel_conf(x: SelectionInputs):
    """TSD-KD's direct-distillation weight only: every token weighted by sigmoid(H_S - H_T) (more
    where the student is less sure than the teacher), the weighted sum divided by the valid-token
    count as TSD-KD's code does (kmswin1/TSD-KD); TSD-KD uses JSD, which a cell pairs with it as
    rel_conf@1.0/jsd. The rest of TSD-KD is not in tip. Ignores keep."""
    return None


@register_rule("rel_conf_topk", weight=_relative_confidence, denominator="weight")
def _rel_conf_topk(x: SelectionInputs):
    """tip's own budgeted variant (not in TSD-KD): the top-k tokens by TSD-KD's weight
    sigmoid(H_S - H_T), each weighted by it, a weighted mean."""
    return _relative_confidence(x)


def _position_ramp(x: SelectionInputs, *_) -> torch.Tensor:
    """2 (i + 1) / (m + 1) at the i-th of a rollout's m valid tokens: rises linearly, mean 1 per
    rollout."""
    mask = x.signals.mask.bool()
    position = mask.long().cumsum(-1)
    m = mask.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(mask, 2.0 * position / (m + 1), 0.0)


@register_rule("position_weight", weight=_position_ramp, denominator="weight", ignores_keep=True)
def _position_weight(x: SelectionInputs):
    """A linear position ramp, PW-OPSD-inspired: every token weighted by 2 (i + 1) / (m + 1) over
    its response (mean 1), so later tokens count more. PW-OPSD's own ramp is not published in a form
    tip could copy (this one is a guess), and its clipped forward-KL target is not in tip. Ignores
    keep."""
    return None


def keeps_every_token(rule: str, keep: float) -> bool:
    """Whether ``rule`` at ``keep`` keeps every valid token with weight 1 whatever the signals:
    ``all``, or any hard-mask rule at keep = 1 (k = m in every scope). Such a step needs no
    selection and so no scoring before its loss."""
    spec = get_rule(rule)
    return spec.weight is None and (spec.ignores_keep or validate_keep(keep) >= 1.0)


@dataclass(frozen=True)
class Selection:
    """What ``select`` decided, with what it decided from (for token records and rule
    comparisons)."""

    kept: torch.Tensor  # bool (B, T)
    # the rule's score at each position (None: the rule keeps every valid token)
    score: torch.Tensor | None
    # per-token loss weights of a weighting rule (0 off the kept tokens; None: 1)
    weights: torch.Tensor | None
    h_hat: torch.Tensor  # the normalised axes the rule saw
    d_hat: torch.Tensor
    labels: torch.Tensor  # each position's quadrant (tip.taxonomy.quadrant_labels)
    target: torch.Tensor  # how many tokens the rule was asked to keep (a quadrant may be short)


def select(
    params: SelectionParams | str,
    signals: TokenSignals,
    keep: float,
    generator: torch.Generator | None = None,
    stats: BatchStats | None = None,
    log_vocab: float | None = None,
    gather: BatchGather | None = None,
) -> Selection:
    """Which valid positions the loss trains on, with the rule's score, its weights (a weighting
    rule's) and the normalised axes it saw.

    params:         the rule and its knobs (``SelectionParams``; a rule's name: every knob at its
                    default)
    keep:           rho in (0, 1]
    generator:      must live on the signals' device (PyTorch refuses a CPU generator for CUDA
                    draws)
    stats:          with norm_scope='batch', the batch statistics to normalise with (a run passes
                    the global batch's, gathered over ranks); default: those of the valid
                    positions of ``signals``
    log_vocab:      log|V|, for rules that compare entropies in nats (rel_conf)
    gather:         with scope='batch', the run's ranks (the top K of the step's global batch)
    """
    p = SelectionParams(params) if isinstance(params, str) else params
    if generator is not None and generator.device.type != signals.mask.device.type:
        raise ValueError(f"the selection generator is on {generator.device} but the signals are on "
                         f"{signals.mask.device}: make it with torch.Generator(device=<the "
                         "signals' device>)")
    spec = get_rule(p.rule)
    keep = validate_keep(keep)
    mask = signals.mask.bool()
    inputs = SelectionInputs(
        signals=signals,
        h_hat=clipped_minmax_normalise(signals.entropy, mask, p.clip_quantile, p.norm_scope,
                                       stats),
        d_hat=minmax_normalise(signals.reverse_kl, mask, p.norm_scope, stats),
        generator=generator,
        entropy_alpha=p.entropy_alpha,
        log_vocab=log_vocab,
        jsd_gamma=p.jsd_gamma,
        labels=quadrant_labels(signals.entropy, signals.reverse_kl, mask, p.entropy_threshold,
                               p.divergence_threshold, stats),
        is_weight_cap=p.is_weight_cap,
        gather=gather,
    )
    score = spec.score(inputs)
    eligible = None if spec.quadrant is None else inputs.labels == spec.quadrant
    kept = mask.clone() if score is None else keep_extreme(score, mask, keep, p.scope, spec.order,
                                                           eligible, generator, gather)
    weights = None if spec.weight is None else \
        torch.where(kept, spec.weight(inputs, score, kept, keep, p.scope).float(), 0.0).detach()
    target = mask.sum() if score is None else target_count(mask, keep, p.scope, gather)
    return Selection(kept, score, weights, inputs.h_hat, inputs.d_hat, inputs.labels, target)


def select_tokens(rule: SelectionParams | str, signals: TokenSignals, keep: float,
                  generator: torch.Generator | None = None, **knobs) -> torch.Tensor:
    """Keep-mask (bool, same shape as ``signals.mask``) of the positions the loss trains on:
    ``select(...).kept``; ``knobs`` are ``SelectionParams`` fields (``scope="batch"``) or
    ``select``'s own (``stats``, ``log_vocab``, ``gather``)."""
    own = {k: knobs.pop(k) for k in ("stats", "log_vocab", "gather") if k in knobs}
    params = SelectionParams(rule, **knobs) if isinstance(rule, str) else \
        dataclasses.replace(rule, **knobs)
    return select(params, signals, keep, generator, **own).kept
