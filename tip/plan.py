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
from pathlib import Path

import torch

from tip.config import CONF_DIR, apply_cell, check_config, require_conf_dir
from tip.engine import resolve_precision
from tip.env import rollout_tokens
from tip.errors import UserError
from tip.memory_plan import (
    FIT_FRACTION,
    GB,
    PHASES,
    Plan,
    RunShape,
    driver_total,
    dtype_name,
    plan_memory,
)
from tip.model_shape import ModelShape, model_shape
from tip.models import PairError, resolve_attention, resolve_model_ref
from tip.signals import resolve_chunk_size

# the paper's maximum prompt length (Table 9), where the prompts cannot be measured
PAPER_PROMPT_TOKENS = 2048
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def run_shape(cfg, gpus: int, device: torch.device, student: ModelShape,
              prompt_tokens: int, gpus_per_node: int = 8) -> RunShape:
    """The run's sizes as a run derives them (``tip.parts.RunSizes``; chunk, ZeRO settings, vLLM's
    sleep, hpZ, the weight sync's staging buffer)."""
    from tip.engine import hpz_partition_size
    from tip.parts import RunSizes, vllm_speed_settings
    from tip.vllm_worker import STAGING_BYTES

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
        hpz=hpz_partition_size(cfg.engine.get("hpz_partition_size", 1), gpus, gpus_per_node)
        if cfg.engine.stage == 3 else 1,
        staging_bytes=max(float(cfg.rollout.get("sync_bucket_mb", 0)) * 2**20 or STAGING_BYTES,
                          student.head * student.weight_bytes)
        if vllm.get("weight_transfer") == "ipc" else 0.0,
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
        share = f"{FIT_FRACTION:.0%} of the driver's {gpu_bytes / GB:.1f} GB"
        lines.append(f"  {'fits':<11}{share:<58}{'yes' if fits else 'NO':>8}")
    return "\n".join(lines + [f"  note: {n}" for n in plan.notes])


def estimate(overrides: list[str], gpus: int, device: str = "cuda", gpu_gb: float = 80.0,
             prompt_tokens: int | None = None,
             gpus_per_node: int = 8) -> tuple[Plan, list[str]]:
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
    run = run_shape(cfg, gpus, dev, student, prompt_tokens, gpus_per_node)
    plan = plan_memory(run, student, teacher, driver_total(gpu_gb), dev.type == "cuda")
    ranks = f"{gpus} GPU{'s' if gpus > 1 else ''}" if dev.type == "cuda" else \
        f"{gpus} CPU process{'es' if gpus > 1 else ''}"
    header = [f"tip.plan {' '.join(overrides)}: {ranks}, {dtype_name(dtype.itemsize)}, "
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
                     "flash_attention_2; neither builds a T x T mask)" if asked == "auto"
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
                    help="a GPU's nominal memory (default 80: an H100-80GB, whose driver reports "
                         "about 85.0e9 B)")
    ap.add_argument("--gpus-per-node", type=int, default=8,
                    help="GPUs per node: a run over more spans nodes (hpZ; default 8)")
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
    if args.gpus_per_node < 1:
        ap.error(f"--gpus-per-node={args.gpus_per_node} is not allowed: at least 1")
    plan, header = estimate(args.overrides, args.gpus, args.device, args.gpu_gb, args.prompt_tokens,
                            args.gpus_per_node)
    print(render(plan, header, driver_total(args.gpu_gb) if args.device == "cuda" else None))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:  # a config value, a data file, a model path
        sys.exit(f"tip.plan: {err}")
