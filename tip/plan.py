"""Per-GPU memory of a training run, from the models' configs, before any weights load.

    python -m tip.plan experiment=paper_qwen3_8b_to_4b --gpus 8 --gpu-gb 80
    python -m tip.plan pair=qwen25_coder_cpu experiment=real_cpu --device cpu --gpus 1

The overrides are those of ``python -m tip.train``. Each model's config comes from a local
directory's config.json, else the Hugging Face cache, else the architecture snapshot tip ships for
the paper's models (``tip/assets/model_configs``: the hub's config.json fields that set the shapes).
The model is instantiated on the meta device (no memory), which gives exact parameter counts, and
one decoder layer is run there with a FlashAttention-like attention (what the CUDA kernels keep for
backward: q, k, v, output, log-sum-exp; no T x T matrix) to count the bytes autograd saves per
token.

What is counted per GPU (``plan_memory``), every figure at the worst case (every response at full
length):

- resident: the student's weights, gradients and optimizer state (AdamW; ZeRO partitions them over
  the GPUs: stage 1 the optimizer state, 2 also the gradients, 3 also the weights) and the teacher's
  weights (sharded at ZeRO-3, else whole);
- the training step, on top: the student's activations for one micro-batch (with or without
  activation checkpointing), the teacher's forward, the teacher's hidden states of the rank's
  rollouts (held until selection), the output-layer chunk loop (``LOGIT_CHUNK_COPIES`` x chunk x V
  fp32, and the whole output layer's fp32 gradient), and at ZeRO-3 the gathered layers, output
  layers and reduce bucket;
- rollouts, on top: vLLM's reservation (``rollout.gpu_memory_utilization`` of the GPU) or, with HF
  generate, the student gathered whole (ZeRO-3) and its KV cache; evaluation likewise with the
  evaluation's settings;
- on CUDA a fixed ``CUDA_RUNTIME_GB`` (context, NCCL, cuBLAS workspaces), which no config gives,
  and with rollout=vllm the worker's own process (``VLLM_PROCESS_GB``: a second CUDA context and
  what sleep keeps), held in every phase.

Two processes share the GPU with rollout=vllm: the trainer returns its cached blocks before every
wake-up of the engine (``torch.cuda.empty_cache``), so during a rollout it holds its resident state
and the engine its ``gpu_memory_utilization`` share; the engine sleeps from its start, so in every
other phase it holds only its process's context (with ``rollout.sleep=false`` its share is resident
through the run). The peak is resident + the largest phase + runtime. tip.plan says a run fits
when that is at most ``FIT_FRACTION`` of the GPU (the allocator's fragmentation takes the rest).
Checked against measured CPU peaks in docs/results/measurements.md ("tip.plan against measured
peaks").
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tip.config import CONF_DIR, apply_cell, check_config, require_conf_dir
from tip.engine import resolve_precision
from tip.env import rollout_tokens
from tip.errors import UserError
from tip.model_shape import ModelShape, model_shape
from tip.models import PairError, resolve_attention, resolve_model_ref
from tip.signals import resolve_chunk_size

LOGIT_CHUNK_COPIES = 11.25
"""Peak of the fused loss's chunk loop in chunk x V fp32 tensors (logits, both log-probabilities,
the divergence's intermediates and its gradient; the measurement: docs/results/measurements.md)."""
CUDA_RUNTIME_GB = 2.0
"""CUDA context, NCCL communicators and cuBLAS workspaces per GPU: not in any config (typically 1-3
GB)."""
VLLM_PROCESS_GB = 1.0
"""The vLLM worker's process beside the trainer's: its CUDA context and the buffers a level-1 sleep
keeps (its weights go to the host, its KV cache is freed), held awake or asleep."""
FIT_FRACTION = 0.9
# the paper's maximum prompt length (Table 9), where the prompts cannot be measured
PAPER_PROMPT_TOKENS = 2048
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000}
GB = 1e9
# what a step does one after another, on the resident state
PHASES = ("scoring", "gradient", "rollout", "evaluation")


@dataclass(frozen=True)
class Item:
    phase: str  # resident | one of PHASES | runtime
    what: str
    bytes: float
    host: bool = False  # offloaded to CPU memory: reported, not counted per GPU


@dataclass(frozen=True)
class Plan:
    items: list[Item]
    notes: list[str]

    def phase_bytes(self, phase: str) -> float:
        return sum(i.bytes for i in self.items if i.phase == phase and not i.host)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_bytes)

    @property
    def peak(self) -> float:
        return (self.phase_bytes("resident") + self.phase_bytes(self.peak_phase)
                + self.phase_bytes("runtime"))


@dataclass(frozen=True)
class RunShape:
    """The sizes of a run that the memory depends on, from its config and the number of GPUs."""

    gpus: int
    stage: int
    offload_optimizer: bool
    offload_param: bool
    gather_for_generate: bool
    prompt_tokens: int
    response_tokens: int
    rollouts_per_rank: int
    micro: int
    chunk: int
    checkpointing: bool
    backend: str
    vllm_fraction: float
    vllm_sleeps: bool  # outside rollouts and evaluations vLLM frees its KV cache and its weights
    rollout_seqs: int
    eval_seqs: int
    eval_response_tokens: int
    reduce_bucket: int
    prefetch_bucket: int
    # transformers' attention kernels (tip.models.resolve_attention): sdpa and eager build a boolean
    # T x T mask per row of a forward (packed rows are no wider than the longest rollout, so the
    # worst case is the padded one); FlashAttention builds none
    attention: str = "sdpa"
    # 1: a sleeping engine's weights wait in host memory; 2: discarded (re-sent by the next sync)
    vllm_sleep_level: int = 2
    prefix_caching: bool = True
    prompts_per_rank: int = 1


def plan_memory(run: RunShape, student: ModelShape, teacher: ModelShape | None, gpu_bytes: float,
                on_cuda: bool) -> Plan:
    """Per-GPU bytes of each part of a run (module docstring). ``teacher`` None: the live
    self-teacher."""
    items = (resident_items(run, student, teacher) + step_items(run, student, teacher)
             + generation_items(run, student, gpu_bytes))
    if on_cuda:
        items.append(Item("runtime", "CUDA context, NCCL, cuBLAS (fixed)", CUDA_RUNTIME_GB * GB))
        if run.backend == "vllm":
            items.append(Item("runtime", "vLLM worker's process: its CUDA context (any phase)",
                              VLLM_PROCESS_GB * GB))
    notes = []
    if run.backend == "vllm" and on_cuda:
        notes = vllm_kv_notes(run, student, gpu_bytes)
        if run.vllm_sleeps:  # the engine's phases: resident + its reservation + runtime
            fixed = sum(i.bytes for i in items if i.phase in ("resident", "runtime") and not i.host)
            most = max(0.0, (FIT_FRACTION * gpu_bytes - fixed) / gpu_bytes)
            notes.append(f"rollout.gpu_memory_utilization up to {most:.2f} keeps the rollout and "
                         f"evaluation phases within {FIT_FRACTION:.0%} of the GPU")
    if any(i.host for i in items):
        host = sum(i.bytes for i in items if i.host)
        notes.append(f"offloaded to CPU memory: {host / GB:.1f} GB per GPU (x{run.gpus} per node "
                     f"of {run.gpus} GPUs)")
    return Plan(items, notes)


def resident_items(run: RunShape, student: ModelShape, teacher: ModelShape | None) -> list[Item]:
    """Weights, gradients and optimizer state: held through the run."""
    n, b = run.gpus, student.weight_bytes
    p = student.params
    shard = n if run.stage == 3 else 1
    items = [Item("resident", f"student weights ({_dtype_name(b)}{_share(shard)})", b * p / shard,
                  run.offload_param)]
    grad_share = n if run.stage >= 2 else 1
    # ZeRO accumulates gradients in fp32 (tip.engine.deepspeed_config)
    grad_bytes = b if run.stage == 0 else 4
    items.append(Item("resident",
                      f"student gradients ({_dtype_name(grad_bytes)}{_share(grad_share)})",
                      grad_bytes * p / grad_share, run.offload_optimizer))
    if run.stage == 0:  # the torch optimizer on the fp32 weights: AdamW's two moments
        items.append(Item("resident", "optimizer state (AdamW m, v in fp32)", 8 * p))
    else:  # ZeRO keeps an fp32 master copy beside the two moments, partitioned from stage 1
        items.append(Item("resident", f"optimizer state (fp32 master, AdamW m, v{_share(n)})",
                          12 * p / n, run.offload_optimizer))
    if teacher is not None:
        items.append(Item("resident", f"teacher weights ({_dtype_name(b)}{_share(shard)})",
                          teacher.weight_bytes * teacher.params / shard))
    return items


def step_items(run: RunShape, student: ModelShape, teacher: ModelShape | None) -> list[Item]:
    """What the scoring and the gradient passes hold on top of the resident state."""
    b, p = student.weight_bytes, student.params
    seq = run.prompt_tokens + run.response_tokens
    tokens = run.micro * seq
    frozen = teacher or student
    per_token = (student.checkpointed_activations_per_token if run.checkpointing
                 else student.activations_per_token)
    activations = Item("", f"student activations ({run.micro} x {seq:,} tokens, checkpointing "
                       f"{'on' if run.checkpointing else 'off'})", per_token * tokens)
    mask = Item("", f"attention mask ({run.attention}: {run.micro} x {seq:,}^2 bool)",
                0.0 if run.attention.startswith("flash") else run.micro * seq ** 2)
    held = Item("", f"teacher hidden states, signals ({run.rollouts_per_rank} rollouts)",
                run.rollouts_per_rank * seq * (frozen.hidden * frozen.weight_bytes + 16))
    rows = min(run.chunk, tokens)  # a chunk never holds more rows than the micro-batch has
    chunk_loop = LOGIT_CHUNK_COPIES * rows * student.vocab * 4
    zero3 = []
    if run.stage == 3:
        working = (2 * student.largest_layer
                   + min(run.prefetch_bucket, p)) * b + min(run.reduce_bucket, p) * b
        heads = student.head * b + (frozen.head * frozen.weight_bytes if teacher is not None else 0)
        zero3 = [Item("", "ZeRO-3 gathered layers, prefetch and reduce buckets", working),
                 Item("", "output layers gathered for the signals and the loss", heads)]
    # Scoring: the teacher (and, with several micro-batches, the student without gradient) runs one
    # micro-batch at a time; with one micro-batch the student's gradient forward has already
    # run (its activations are held).
    one_forward = run.micro >= run.rollouts_per_rank
    scoring = ([activations, mask] if one_forward else []) + [
        Item("", "teacher forward (a layer's working set)", frozen.forward_per_token * tokens),
        mask, held, Item("", f"signal chunks ({rows} x {student.vocab:,} fp32)", chunk_loop),
        *zero3]
    if not mask.bytes:
        scoring = [i for i in scoring if i is not mask]
    loss = Item("", f"loss chunks ({rows} x {student.vocab:,} fp32), output layer's fp32 gradient",
                chunk_loop + 4 * student.head)
    gradient = [activations, *([mask] if mask.bytes else []), held, loss, *zero3]
    return [Item("scoring", i.what, i.bytes) for i in scoring] + [Item("gradient", i.what, i.bytes)
                                                                  for i in gradient]


def generation_items(run: RunShape, student: ModelShape, gpu_bytes: float) -> list[Item]:
    """Rollouts and evaluation: with rollout=vllm both through the engine (its reservation, held in
    those phases only when it sleeps); with rollout=hf through HF generate (the student gathered
    whole at ZeRO-3, and its KV cache)."""
    b, p, items = student.weight_bytes, student.params, []
    seq = run.prompt_tokens + run.response_tokens
    shard = run.gpus if run.stage == 3 else 1
    gathered = b * p * (1 - 1 / shard) if run.stage == 3 and run.gather_for_generate else 0.0
    if run.backend == "vllm":
        reservation = run.vllm_fraction * gpu_bytes
        what = f"vLLM: gpu_memory_utilization {run.vllm_fraction:g} of the GPU"
        if not run.vllm_sleeps:  # awake all the time
            return [Item("resident", what + " (rollout.sleep off: held through the step)",
                         reservation)]
        items = [Item(phase, what, reservation) for phase in ("rollout", "evaluation")]
        if run.vllm_sleep_level == 1:
            items.append(Item("resident", "vLLM's weights while it sleeps (level 1)", b * p,
                              host=True))
        return items
    if gathered:
        items.append(Item("rollout", "student gathered for HF generate", gathered))
    items.append(Item("rollout", f"KV cache ({run.rollout_seqs} x {seq:,} tokens)",
                      student.kv_per_token * run.rollout_seqs * seq))
    eval_seq = run.prompt_tokens + run.eval_response_tokens
    if gathered:
        items.append(Item("evaluation", "student gathered for HF generate", gathered))
    items.append(Item("evaluation", f"KV cache ({run.eval_seqs} x {eval_seq:,} tokens)",
                      student.kv_per_token * run.eval_seqs * eval_seq))
    return items


VLLM_OVERHEAD_GB = 1.5
"""What vLLM's reservation holds beside the weights and the KV cache (its profiled activations
and sampler buffers; CUDA graphs at most a few hundred MB more)."""


def vllm_kv_notes(run: RunShape, student: ModelShape, gpu_bytes: float) -> list[str]:
    """The engine's KV cache against a rollout's worst case (every response at full length; with
    prefix caching a prompt's n samples share its blocks), and the largest reservation that fits."""
    kv = run.vllm_fraction * gpu_bytes - student.weight_bytes * student.params \
        - VLLM_OVERHEAD_GB * GB
    capacity = max(0, int(kv // student.kv_per_token))
    prompts = run.prompts_per_rank if run.prefix_caching else run.rollouts_per_rank
    worst = prompts * run.prompt_tokens + run.rollouts_per_rank * run.response_tokens
    verdict = "enough" if capacity >= worst else \
        "short: vLLM preempts and recomputes sequences, stretching the longest rollout"
    return [f"vLLM KV cache: about {capacity:,} tokens for a rollout's worst case of {worst:,} "
            f"({run.rollouts_per_rank} rollouts, prefix caching "
            f"{'on' if run.prefix_caching else 'off'}): {verdict}"]


def _dtype_name(width: int) -> str:
    return {2: "bf16", 4: "fp32"}.get(width, f"{width} bytes")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _share(parts: int) -> str:
    return f", 1/{parts}" if parts > 1 else ""


def run_shape(cfg, gpus: int, device: torch.device, student: ModelShape,
              prompt_tokens: int) -> RunShape:
    """The run's sizes as a run derives them (``tip.parts.RunSizes``; chunk, ZeRO settings, vLLM's
    sleep)."""
    from tip.parts import RunSizes, vllm_speed_settings

    sizes = RunSizes.of(cfg, gpus, what="GPUs")
    rollouts = sizes.rollouts_per_rank
    vllm = vllm_speed_settings(cfg.rollout, device) if cfg.rollout.backend == "vllm" else \
        {"sleep_level": 0}
    zero = cfg.engine.deepspeed.zero_optimization
    return RunShape(
        gpus=gpus, stage=cfg.engine.stage, offload_optimizer=cfg.engine.offload_optimizer != "none",
        offload_param=cfg.engine.offload_param != "none",
        gather_for_generate=cfg.engine.get("gather_for_generate", "auto") != "never",
        prompt_tokens=prompt_tokens,
                    response_tokens=rollout_tokens(cfg.get("env"), cfg.rollout.max_new_tokens),
        rollouts_per_rank=rollouts,
        micro=sizes.micro_size,
        chunk=resolve_chunk_size(cfg.train.chunk_size, student.vocab, device),
        checkpointing=bool(cfg.train.gradient_checkpointing), backend=cfg.rollout.backend,
        vllm_fraction=float(cfg.rollout.get("gpu_memory_utilization", 0.0)),
        vllm_sleeps=bool(vllm["sleep_level"]), vllm_sleep_level=vllm["sleep_level"],
        prefix_caching=bool(cfg.rollout.get("prefix_caching", False)),
        prompts_per_rank=max(1, cfg.train.prompts_per_step // gpus),
        rollout_seqs=min(cfg.rollout.get("max_seqs_per_generate", rollouts), rollouts),
        eval_seqs=int(cfg.eval.get("max_seqs_per_generate", 64)),
        eval_response_tokens=rollout_tokens(cfg.get("env"), cfg.eval.max_new_tokens),
        reduce_bucket=int(zero.get("reduce_bucket_size", DEEPSPEED_DEFAULTS["reduce_bucket_size"])),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size",
                                     DEEPSPEED_DEFAULTS["stage3_prefetch_bucket_size"])),
        attention=resolve_attention(cfg.model.attn_implementation, device.type),
    )


def longest_prompt(cfg) -> tuple[int, str]:
    """The longest training prompt in tokens, when the tokenizer and the data are on this machine
    (nothing is downloaded); else the paper's maximum prompt length."""
    from transformers import AutoTokenizer

    from tip.data import load_examples
    from tip.parts import training_prompt_ids

    fallback = (PAPER_PROMPT_TOKENS, "the paper's maximum prompt ({}; --prompt-tokens sets it)")
    source = cfg.data.source
    if source.kind == "hub" or (source.kind in ("dapo", "jsonl")
                                and not Path(str(source.path)).exists()):
        return fallback[0], fallback[1].format("the data is not on this machine")
    try:
        path = resolve_model_ref(cfg.pair.tokenizer or cfg.pair.student)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, PairError):
        return fallback[0], fallback[1].format("the tokenizer is not on this machine")
    examples = load_examples(source, "train")
    return max(map(len,
                   training_prompt_ids(cfg, tokenizer, examples))), "the longest training prompt"


def render(plan: Plan, header: list[str], gpu_bytes: float | None) -> str:
    unit, scale = ("GB", GB) if plan.peak >= 10 * GB else ("MB", 1e6)
    lines = list(header) + ["", f"  {'per GPU' if gpu_bytes else 'per process':<69}{unit:>8}"]
    for phase in ("resident", *PHASES, "runtime"):
        for item in (i for i in plan.items if i.phase == phase):
            where = " (CPU)" if item.host else ""
            lines.append(f"  {phase:<11}{item.what + where:<58}{item.bytes / scale:>8.2f}")
        if phase != "runtime" and any(i.phase == phase for i in plan.items):
            lines.append(f"  {'':<11}{'= ' + phase:<58}{plan.phase_bytes(phase) / scale:>8.2f}")
    peak = "resident + " + plan.peak_phase + " + runtime"
    lines.append(f"  {'peak':<11}{peak:<58}{plan.peak / scale:>8.2f}")
    if gpu_bytes:
        fits = plan.peak <= FIT_FRACTION * gpu_bytes
        share = f"{FIT_FRACTION:.0%} of {gpu_bytes / GB:g} GB"
        lines.append(f"  {'fits':<11}{share:<58}{'yes' if fits else 'NO':>8}")
    return "\n".join(lines + [f"  note: {n}" for n in plan.notes])


def estimate(overrides: list[str], gpus: int, device: str = "cuda", gpu_gb: float = 80.0,
             prompt_tokens: int | None = None) -> tuple[Plan, list[str]]:
    """The plan of ``python -m tip.train <overrides>`` on ``gpus`` ranks, and the lines that
    describe its inputs."""
    from hydra import compose, initialize_config_dir

    require_conf_dir()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    apply_cell(cfg)
    check_config(cfg, files=False)  # the plan reads no benchmark, and training data only if here
    dev = torch.device(device)
    dtype = resolve_precision(cfg.precision, dev)
    self_teacher = cfg.teacher.mode == "self_privileged"
    student = model_shape(cfg.pair.student, dtype)
    teacher = None if self_teacher and cfg.teacher.weights != "snapshot" else \
        model_shape(cfg.pair.student if self_teacher else cfg.pair.teacher, dtype)
    prompt_note = "--prompt-tokens"
    if prompt_tokens is None:
        prompt_tokens, prompt_note = longest_prompt(cfg)
    run = run_shape(cfg, gpus, dev, student, prompt_tokens)
    plan = plan_memory(run, student, teacher, gpu_gb * GB, dev.type == "cuda")
    ranks = f"{gpus} GPU{'s' if gpus > 1 else ''}" if dev.type == "cuda" else \
        f"{gpus} CPU process{'es' if gpus > 1 else ''}"
    header = [f"tip.plan {' '.join(overrides)}: {ranks}, {_dtype_name(dtype.itemsize)}, "
              f"ZeRO-{run.stage}, rollout={run.backend}"]
    for role, shape in (("student", student), ("teacher", teacher)):
        if shape is None:
            header.append(f"  {role}: the student itself (self-distillation, live weights)")
            continue
        header.append(f"  {role} {shape.ref}: {_count(shape.params)} parameters, {shape.layers} "
                      f"layers; activations {shape.activations_per_token / 1e6:.3f} MB/token, "
                      f"{shape.checkpointed_activations_per_token / 1e6:.3f} with checkpointing "
                      f"(config: {shape.source})")
    asked = cfg.model.attn_implementation
    header.append(f"  attention: {run.attention} (model.attn_implementation={asked}"
                  + ("; flash-attn is not installed here: where it is, auto means "
                     "flash_attention_2, with no mask)" if asked == "auto"
                     and not run.attention.startswith("flash") else ")"))
    header.append(f"  per rank: {run.rollouts_per_rank} rollouts of up to {run.prompt_tokens:,} + "
                  f"{run.response_tokens:,} tokens (prompt: {prompt_note}); micro-batch "
                  f"{run.micro} ({math.ceil(run.rollouts_per_rank / run.micro)} per step); chunk "
                  f"{run.chunk} rows")
    return plan, header


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tip.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=8, help="GPUs (ranks) the run uses (default 8)")
    ap.add_argument("--gpu-gb", type=float, default=80.0,
                    help="memory of one GPU in GB (default 80)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="where the run trains (cpu: fp32 under precision=auto, no CUDA runtime)")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="longest prompt (default: measured from the data, else the paper's 2048)")
    ap.add_argument("overrides", nargs="*",
                    help="tip.train's overrides, e.g. experiment=paper_qwen3_8b_to_4b")
    args = ap.parse_args(argv)
    if args.gpus < 1:
        ap.error(f"--gpus={args.gpus} is not allowed: at least 1")
    if not args.gpu_gb > 0 or not math.isfinite(args.gpu_gb):
        ap.error(f"--gpu-gb={args.gpu_gb:g} is not allowed: a GPU's memory in GB, above 0 "
                 "(80 for an H100-80GB)")
    if args.prompt_tokens is not None and args.prompt_tokens < 1:
        ap.error(f"--prompt-tokens={args.prompt_tokens} is not allowed: at least 1")
    plan, header = estimate(args.overrides, args.gpus, args.device, args.gpu_gb, args.prompt_tokens)
    print(render(plan, header, args.gpu_gb * GB if args.device == "cuda" else None))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:  # a config value, a data file, a model path
        sys.exit(f"tip.plan: {err}")
