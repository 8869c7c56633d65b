"""What a run holds on each GPU, phase by phase: the items of the memory plan (pure: sizes in, bytes
out). ``python -m tip.plan`` composes a run's config into a ``RunShape`` and prints the plan; its
docstring says what is counted and why."""

from __future__ import annotations

from dataclasses import dataclass

from tip.model_shape import ModelShape
from tip.models import packs_in_one_row

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


DRIVER_VISIBLE = 0.99
"""The share of a GPU's nominal GiB its driver reports as total (``torch.cuda.mem_get_info``: about
85.0e9 B, 79.2 GiB, on an H100-80GB), of which vLLM's ``gpu_memory_utilization`` takes its share."""


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
    # ZeRO++ hpZ: each node keeps a second copy of the bf16 weights partitioned over its GPUs
    hpz: int = 1
    # rollout=vllm with the ipc transfer: the packed transfer's staging buffer (tip.vllm_worker)
    staging_bytes: float = 0.0


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
    items = [Item("resident", f"student weights ({dtype_name(b)}{share_label(shard)})",
                  b * p / shard, run.offload_param)]
    grad_share = n if run.stage >= 2 else 1
    # ZeRO accumulates gradients in fp32 (tip.engine.deepspeed_config)
    grad_bytes = b if run.stage == 0 else 4
    items.append(Item("resident",
                      f"student gradients ({dtype_name(grad_bytes)}{share_label(grad_share)})",
                      grad_bytes * p / grad_share, run.offload_optimizer))
    if run.stage == 0:  # the torch optimizer on the fp32 weights: AdamW's two moments
        items.append(Item("resident", "optimizer state (AdamW m, v in fp32)", 8 * p))
    else:  # ZeRO keeps an fp32 master copy beside the two moments, partitioned from stage 1
        items.append(Item("resident", f"optimizer state (fp32 master, AdamW m, v{share_label(n)})",
                          12 * p / n, run.offload_optimizer))
    if teacher is not None:
        items.append(Item("resident", f"teacher weights ({dtype_name(b)}{share_label(shard)})",
                          teacher.weight_bytes * teacher.params / shard))
    if run.stage == 3 and run.hpz > 1:  # ZeRO++ hpZ's secondary partition, per node
        items.append(Item("resident", f"student hpZ secondary partition ({dtype_name(b)}, "
                          f"1/{run.hpz})", b * p / run.hpz))
        if teacher is not None:
            items.append(Item("resident", f"teacher hpZ secondary partition ({dtype_name(b)}, "
                              f"1/{run.hpz})", teacher.weight_bytes * teacher.params / run.hpz))
    if run.stage == 3:  # allocated once for the run, in fp32 (tip sets fp32 communication)
        items.append(Item("resident", "ZeRO-3 reduce bucket (fp32, held through the run)",
                          4 * run.reduce_bucket))
    if run.staging_bytes:
        items.append(Item("resident", "weight-sync staging buffer (packed CUDA IPC)",
                          run.staging_bytes))
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
                0.0 if packs_in_one_row(run.attention) else run.micro * seq ** 2)
    held = Item("", f"teacher hidden states, signals ({run.rollouts_per_rank} rollouts)",
                run.rollouts_per_rank * seq * (frozen.hidden * frozen.weight_bytes + 16))
    rows = min(run.chunk, tokens)  # a chunk never holds more rows than the micro-batch has
    chunk_loop = LOGIT_CHUNK_COPIES * rows * student.vocab * 4
    zero3 = []
    if run.stage == 3:
        working = (2 * student.largest_layer + min(run.prefetch_bucket, p)) * b
        heads = student.head * b + (frozen.head * frozen.weight_bytes if teacher is not None else 0)
        zero3 = [Item("", "ZeRO-3 gathered layers and prefetch bucket", working),
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


def dtype_name(width: int) -> str:
    return {2: "bf16", 4: "fp32"}.get(width, f"{width} bytes")


def share_label(parts: int) -> str:
    return f", 1/{parts}" if parts > 1 else ""


def driver_total(gpu_gb: float) -> float:
    """The bytes a GPU of ``gpu_gb`` nominal GiB reports as its total (``DRIVER_VISIBLE``)."""
    return gpu_gb * 2**30 * DRIVER_VISIBLE
