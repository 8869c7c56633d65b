"""One OPD optimizer step: score -> select -> backward -> result.

``StepSettings`` is built once from the config; ``opd_step`` takes a rank's rollouts and returns a
``StepResult``. Scoring reads the student's hidden states (of the gradient forward itself when the
rank's rollouts form one micro-batch); the selection is made over the rank's whole batch with the
statistics of the step's global batch, so it does not depend on the number of processes; the loss
projects only the kept positions, once per output layer, with its gradients formed in the same chunk
loop (``tip.losses.fused_divergence_sum``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tip.distributed import DistInfo, all_gather_rows, all_reduce_max, all_reduce_sum
from tip.keep import BatchGather
from tip.losses import (
    FusedDivergence,
    fused_divergence_sum,
    loss_denominator,
    normalised_loss,
    per_rollout_weights,
)
from tip.models import (
    final_logit_softcap,
    gathered_heads,
    head_logits_raw,
    hidden_states,
    output_width,
    whole_until_accumulated,
)
from tip.rollout import RolloutBatch, aligned_targets, with_prompts
from tip.selection import (
    Rule,
    Selection,
    SelectionParams,
    get_rule,
    keeps_every_token,
    select,
)
from tip.signals import SIGNAL_ROWS, TokenSignals, token_signals
from tip.step_metrics import (
    STEP_SUMS,
    StepClock,
    gradient_outcome,
    reduce_step_sums,
    step_metrics,
)
from tip.taxonomy import BatchStats, quadrant_labels
from tip.token_records import stats_dict, token_table


@dataclass(frozen=True)
class StepSettings:
    """What every step reads from the config, looked up once."""

    rule: Rule
    selection: SelectionParams  # the rule and every knob select reads
    divergence: str
    beta: float
    # train.denominator with auto resolved to the rule's own (tip.losses.DENOMINATORS)
    denominator: str
    chunk_size: int  # positions per chunk of signal and loss math
    micro_size: int  # rollouts per forward/backward on one rank
    # each micro-batch's rollouts run as one row of real tokens (tip.models.pack_rows)
    packed: bool = False
    pad_id: int = 0  # the tokenizer's, where the teacher's view re-pads the rollouts

    @classmethod
    def of(cls, cfg, chunk_size: int, micro_size: int, pad_id: int = 0) -> StepSettings:
        rule = get_rule(cfg.selector.name)
        return cls(rule=rule, selection=SelectionParams.of(cfg.selector, cfg.selection),
                   divergence=cfg.divergence.name, beta=cfg.divergence.beta,
                   denominator=rule.denominator if cfg.train.denominator == "auto"
                   else cfg.train.denominator,
                   chunk_size=chunk_size, micro_size=micro_size, packed=cfg.train.packing,
                   pad_id=pad_id)

    def selection_meta(self) -> dict:
        """What token records need beside the signals to re-run any rule on them exactly."""
        return {**self.selection.as_meta(), "divergence": self.divergence}


@dataclass
class StepResult:
    """A step's outcome: its metrics, or why it was skipped (nothing applied), and its token
    records."""

    metrics: dict = field(default_factory=dict)
    skipped: str = ""  # the cause, when non-finite values kept the update out
    # every valid token's numbers (tip.token_records), when recorded
    token_table: dict | None = None
    batch_stats: dict | None = None


def response_rows(hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states -> (B*(T-1), H): the rows that predict the next token, in the order
    of ``RolloutBatch.target_mask`` and ``RolloutBatch.targets`` (the response shift's other two
    places)."""
    return hidden[:, :-1].reshape(-1, hidden.shape[-1])


def pad_cat(tensors: list[torch.Tensor], width: int, value=0) -> torch.Tensor:
    """Concatenate (b_i, t_i) tensors along the batch after right-padding them to ``width``."""
    return torch.cat([F.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])


# ---- score
# -------------------------------------------------------------------------------------------------


@dataclass
class ScoredMicro:
    """One micro-batch after scoring: its signals, and what its gradient pass will need."""

    signals: TokenSignals
    # the teacher's final hidden states at the valid positions (flat order)
    teacher_rows: torch.Tensor
    # (B*T, H) with the graph, when the one forward is shared
    student_rows: torch.Tensor | None = None
    # loss and gradients already formed (every token kept, shared)
    fused: FusedDivergence | None = None


def head_divergence(s: StepSettings, student, teacher, student_rows: torch.Tensor,
                    teacher_rows: torch.Tensor, with_signals: bool = False,
                    row_weights: torch.Tensor | None = None,
                    targets: torch.Tensor | None = None) -> FusedDivergence:
    """The divergence summed over rows whose final hidden states are given (the student's with
    gradient, the teacher's without), each row projected once per output layer; both layers gathered
    once (ZeRO-3)."""
    head = student.get_output_embeddings()
    return fused_divergence_sum(
        student_rows, head.weight, head.bias, lambda i: head_logits_raw(teacher, teacher_rows[i]),
        s.divergence, s.beta, s.chunk_size, softcap=final_logit_softcap(student),
        gather=lambda: gathered_heads(student, teacher), with_signals=with_signals,
        before_accumulate=lambda: whole_until_accumulated(student), row_weights=row_weights,
        targets=targets)


def score_micro(s: StepSettings, forward, student, teacher, micro: RolloutBatch,
                teacher_view: RolloutBatch, keeps_all: bool = False, with_top1: bool = False,
                with_jsd: bool = False) -> ScoredMicro:
    """Signals at every response position of ``micro``, and the teacher's final hidden states there.
    The teacher reads ``teacher_view`` (the same responses, possibly after a privileged prompt).

    ``forward``: the engine (its forward returns hidden states, with gradient), whose forward the
    gradient pass then reuses; or None, for a scoring forward of ``student`` without gradient. With
    a shared forward and ``keeps_all``, the loss's own chunk loop yields the signals (no separate
    scoring loop). ``with_top1``: each model's top token too; ``with_jsd``: the JSD signal too (a
    rule that reads it; ``Rule.needs``). Rollouts that carry the engine's log-probabilities get
    the student's log P_S of the same tokens (``TokenSignals.sampled_logp``)."""
    index = aligned_targets(micro, teacher_view)  # student target position -> the teacher's
    check = micro.sampler_logp is not None  # the engine's log-probabilities to compare with
    mask = micro.target_mask
    valid = mask.reshape(-1).nonzero(as_tuple=True)[0]
    with torch.no_grad():
        t_flat = response_rows(hidden_states(teacher, teacher_view.input_ids,
                                             teacher_view.attention_mask, s.packed))
    teacher_rows = t_flat[index[valid]]
    if forward is not None:
        s_flat = response_rows(forward(micro.input_ids, micro.attention_mask, s.packed))
        if keeps_all and not with_top1:  # (a step that keeps every token selects nothing: no JSD)
            fused = head_divergence(s, student, teacher, s_flat[valid], teacher_rows,
                                    with_signals=True,
                                    targets=micro.targets.reshape(-1)[valid] if check else None)
            per_position = torch.zeros(len(SIGNAL_ROWS) + int(check), mask.numel(),
                                       dtype=torch.float32, device=mask.device)
            per_position[:len(SIGNAL_ROWS), valid] = fused.signals
            if check:
                per_position[-1, valid] = fused.target_logp
            return ScoredMicro(TokenSignals.from_flat(per_position, mask, with_sampled=check),
                               teacher_rows, None, fused)
        scoring_rows = s_flat.detach()
    else:
        with torch.no_grad():
            scoring_rows = response_rows(hidden_states(student, micro.input_ids,
                                                       micro.attention_mask, s.packed))
    # One gather of each output layer (one for the live self-teacher, the student) for the
    # whole loop.
    with torch.no_grad(), gathered_heads(student, teacher):
        signals = token_signals(lambda i: head_logits_raw(student, scoring_rows[i]),
                                lambda i: head_logits_raw(teacher, t_flat[index[i]]), mask,
                                s.chunk_size, with_top1, with_jsd,
                                micro.targets if check else None)
    return ScoredMicro(signals, teacher_rows, s_flat if forward is not None else None)


def merged_signals(scored: list[ScoredMicro], with_top1: bool) -> TokenSignals:
    """The micro-batches' signals as one (B, T) batch, right-padded to the widest."""
    width = max(m.signals.mask.shape[1] for m in scored)
    fields = (*SIGNAL_ROWS, "mask", *(["jsd"] if scored[0].signals.jsd is not None else []),
              *(["sampled_logp"] if scored[0].signals.sampled_logp is not None else []))
    top1 = torch.cat([F.pad(m.signals.top1, (0, width - m.signals.top1.shape[-1])) for m in scored],
                     dim=1) if with_top1 else None
    return TokenSignals(**{f: pad_cat([getattr(m.signals, f) for m in scored],
                                      width) for f in fields},
                        top1=top1)


def nonfinite_signals(entropy: torch.Tensor, divergence: torch.Tensor) -> str:
    """Why a step's signals (the scoring pass's valid h and delta) make its loss non-finite, or ''
    if they are all finite. h comes from the student alone, delta from both models, so a non-finite
    delta beside finite h points at the teacher."""
    bad_h = int((~torch.isfinite(entropy)).sum())
    bad_d = int((~torch.isfinite(divergence)).sum())
    if bad_h:
        return (f"the student's logits (scoring pass: entropy non-finite at {bad_h} of "
                f"{entropy.numel()} tokens)")
    if bad_d:
        return (f"the teacher's logits (scoring pass: divergence non-finite at {bad_d} of "
                f"{divergence.numel()} tokens where the student's entropy is finite)")
    return ""


# ---- select
# ------------------------------------------------------------------------------------------------


@dataclass
class Choice:
    """What the select stage decided over the rank's batch."""

    selection: Selection | None  # None: every valid token kept, nothing scored
    kept: torch.Tensor  # bool (B, T)
    weights: torch.Tensor | None  # a weighting rule's per-token weights; None: every kept token 1
    labels: torch.Tensor  # quadrant of each position
    stats: BatchStats  # of the step's global batch
    log_vocab: float
    target: torch.Tensor  # how many tokens the rule was asked to keep on this rank


def choose(s: StepSettings, sig: TokenSignals, stats: BatchStats, keep: float, generator,
           log_vocab: float, keeps_all: bool, record_tokens: bool,
           gather: BatchGather | None = None) -> Choice:
    """Selection and taxonomy over the rank's whole batch ("per batch" in the paper) with the batch
    statistics of the step's global batch; with scope=batch, the top K of the global batch
    (``gather``)."""
    selection = None if keeps_all and not record_tokens else select(
        s.selection, sig, keep, generator, stats, log_vocab, gather)
    if selection is not None:
        return Choice(selection, selection.kept, selection.weights, selection.labels, stats,
                      log_vocab, selection.target)
    labels = quadrant_labels(sig.entropy, sig.reverse_kl, sig.mask, s.selection.entropy_threshold,
                             s.selection.divergence_threshold, stats)
    return Choice(None, sig.mask.clone(), None, labels, stats, log_vocab, sig.mask.sum())


# ---- backward
# ----------------------------------------------------------------------------------------------


def backward(s: StepSettings, engine, teacher, micros: list[RolloutBatch],
             scored: list[ScoredMicro], sig: TokenSignals, choice: Choice, dist: DistInfo,
             clock: StepClock) -> torch.Tensor:
    """One backward (and engine step) per micro-batch; returns the summed loss. The loss is
    normalised by the step's global count and the engine's averaging over accumulation steps and
    ranks is undone, so the step's gradient is that of one batch holding every rank's rollouts (the
    paper's Eq. 9)."""
    student = engine.module.lm
    local = loss_denominator(choice.kept, sig.mask, s.denominator, choice.weights)
    global_count = float(all_reduce_sum(torch.tensor([local], dtype=torch.float64,
                                                     device=dist.device),
                                        dist))
    undo_engine_mean = dist.world_size * len(micros)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    for micro, m, (kept_m, w_m) in zip(micros, scored, _per_micro(scored, choice)):
        fused = m.fused
        if fused is None:
            s_flat = m.student_rows if m.student_rows is not None else \
                response_rows(engine(micro.input_ids, micro.attention_mask, s.packed))
            # The output layer runs only on kept rows, chunk by chunk, with their gradients formed
            # in the same loop: no kept-rows x V logits are held for backward.
            fused = head_divergence(s, student, teacher,
                                    s_flat[kept_m.reshape(-1).nonzero(as_tuple=True)[0]],
                                    m.teacher_rows, row_weights=w_m)
        loss = normalised_loss(fused.total, global_count)
        # The sum is in the graph even when this rank kept nothing, so every rank runs the
        # same backward.
        engine.backward(loss * undo_engine_mean)
        clock.lap("gradient_s")
        # DeepSpeed wants a step per backward; it updates only at the accumulation
        # boundary
        engine.step()
        clock.lap("optimizer_s")
        loss_sum += loss.detach().double()
    return loss_sum


def _per_micro(scored: list[ScoredMicro], choice: Choice):
    """Each micro-batch's kept mask and kept tokens' weights; between the passes only the teacher's
    hidden states at kept positions are held (rho x N x H)."""
    out, offset = [], 0
    for m in scored:
        rows = slice(offset, offset + m.signals.mask.shape[0])
        offset += m.signals.mask.shape[0]
        kept_m = choice.kept[rows, : m.signals.mask.shape[1]]
        w_m = (None if choice.weights is None
               else choice.weights[rows, : m.signals.mask.shape[1]][kept_m])
        m.teacher_rows = m.teacher_rows[kept_m[m.signals.mask]]
        out.append((kept_m, w_m))
    return out


# ---- result
# ------------------------------------------------------------------------------------------------


# ---- the step
# ----------------------------------------------------------------------------------------------


@dataclass
class StepInputs:
    """What one step trains on, as the run's parts make it (``tip.parts.RunParts.step_inputs``)."""

    rollouts: RolloutBatch  # on the run's device
    keep: float  # rho at this step (the keep schedule's)
    generator: torch.Generator  # the selection's draws (``tip.rollout.StepSeeds.selection``)
    # one prompt per prompt of the rank, replacing the student's in the teacher's view (the
    # self-teacher's privileged context); None: the teacher sees the student's prompts
    teacher_prompts: list[list[int]] | None = None
    record_tokens: bool = False  # the result holds every valid token's numbers


def opd_step(s: StepSettings, engine, teacher, inputs: StepInputs,
             dist: DistInfo) -> StepResult:
    """Score, select, then one backward per micro-batch; the optimizer updates once, after the last
    one.

    When the rank's rollouts form one micro-batch, the student runs once: the scoring reads the
    hidden states of the gradient forward, and a step that keeps every token takes its signals from
    the loss's own chunk loop. With several micro-batches the selection needs every micro-batch's
    signals before the first backward, so the student runs twice (a scoring forward without
    gradient, then the gradient forward). ``record_tokens``: the result holds every valid token's
    numbers (``tip.token_records``)."""
    clock, student = StepClock(dist.device), engine.module.lm
    keep, generator, record_tokens = inputs.keep, inputs.generator, inputs.record_tokens
    micros = inputs.rollouts.split(s.micro_size)
    views = [m if inputs.teacher_prompts is None else with_prompts(
        m, [inputs.teacher_prompts[i] for i in m.example_index], s.pad_id).to(dist.device)
        for m in micros]
    shared = engine if len(micros) == 1 else None
    # (per-rollout means weigh each token: no unweighted loss from the scoring pass)
    keeps_all = keeps_every_token(s.rule.name, keep) and s.denominator != "sequence"
    scored = [score_micro(s, shared, student, teacher, m, v, keeps_all, record_tokens,
                          "jsd" in s.rule.needs)
              for m, v in zip(micros, views)]
    clock.lap("scoring_s")

    sig = merged_signals(scored, record_tokens)
    # Every rank's valid h and delta are gathered, so the tokens selected do not depend on the
    # world size.
    h_all, d_all = (all_gather_rows(x[sig.mask].float(), dist)
                    for x in (sig.entropy, sig.reverse_kl))
    # every rank sees the same gathered values: all skip together
    cause = nonfinite_signals(h_all, d_all)
    if cause:
        return StepResult(clock.rounded(), skipped=cause)
    stats = BatchStats.of(h_all, d_all, s.selection.clip_quantile)
    # the signals' normaliser
    log_vocab = math.log(min(output_width(student), output_width(teacher)))
    gather = BatchGather(lambda x: all_gather_rows(x, dist), dist.rank)
    choice = choose(s, sig, stats, keep, generator, log_vocab, keeps_all, record_tokens, gather)
    if s.denominator == "sequence":
        choice.weights = per_rollout_weights(choice.kept, sig.mask, choice.weights)
    clock.lap("selection_s")

    loss_sum = backward(s, engine, teacher, micros, scored, sig, choice, dist, clock)
    del scored
    return step_result(engine, micros, sig, choice, loss_sum, dist, clock, record_tokens)


def step_result(engine, micros: list[RolloutBatch], sig: TokenSignals, choice: Choice,
                loss_sum: torch.Tensor, dist: DistInfo, clock: StepClock,
                record_tokens: bool) -> StepResult:
    sampler = None
    if micros[0].sampler_logp is not None:
        sampler = pad_cat([m.sampler_target_logp for m in micros], sig.mask.shape[1])
    sums, quad = reduce_step_sums(sig, choice.kept, choice.labels, loss_sum, dist, choice.weights,
                                  sampler, choice.target)
    totals = dict(zip(STEP_SUMS, sums.tolist()))
    grad_norm, discarded = gradient_outcome(engine, totals["loss"])
    if discarded:
        return StepResult(clock.rounded(), skipped=discarded)
    result = StepResult(step_metrics(totals, quad, grad_norm, clock))
    if choice.weights is not None:  # a weighting rule: its largest weight over the step's ranks
        largest = torch.where(choice.kept, choice.weights, 0.0).max().reshape(1).double()
        result.metrics["max_weight"] = float(all_reduce_max(largest, dist))
    if record_tokens:
        targets = pad_cat([m.targets for m in micros], sig.mask.shape[1])
        result.token_table = token_table(sig, choice.selection, choice.kept, choice.labels, targets)
        result.batch_stats = {**stats_dict(choice.stats), "log_vocab": choice.log_vocab}
    return result
