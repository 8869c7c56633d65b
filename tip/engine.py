"""DeepSpeed: precision, the engine config, engines for student and teacher, releasing them, weight
copies, HF checkpoints. (Processes and collectives: tip/distributed.py; atomic outputs:
tip/checkpoint.py.)

Training always goes through DeepSpeed (ZeRO-3 by default). On CPU the gloo backend is used and math
is fp32 (these CPUs have no bf16 units; docs/performance.md); on GPU bf16 is the default.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tip.checkpoint import atomic_dir
from tip.models import HiddenStatesLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *DTYPES)  # auto: bf16 on GPU, fp32 on CPU


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    return DTYPES[precision]


def deepspeed_config(engine_cfg: dict[str, Any], micro_batch: int, grad_accum: int,
                     grad_clip: float, dtype: torch.dtype, train: bool = True,
                     on_gpu: bool | None = None, world_size: int = 1,
                     gpus_per_node: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for one engine from ``conf/engine/*.yaml`` (its ``deepspeed`` block is
    that JSON; the batch sizes, clipping and precision are filled here so they cannot disagree with
    the recipe).

    ZeRO-3 over several nodes (``world_size`` above ``gpus_per_node``): with
    ``engine.hpz_partition_size`` auto, each node also keeps the weights partitioned over its own
    GPUs (ZeRO++'s hpZ, ``zero_hpz_partition_size``), so the forward and backward all-gathers stay
    on the node's NVLink instead of crossing InfiniBand; it costs a second bf16 partition of the
    weights per GPU (weights / GPUs per node). Gradients are reduce-scattered over all ranks in
    fp32 either way (docs/gpus.md, "Several nodes")."""
    cfg = {k: v for k, v in dict(engine_cfg["deepspeed"]).items()}
    zero = dict(cfg.get("zero_optimization", {}))
    hpz = hpz_partition_size(engine_cfg.get("hpz_partition_size", 1), world_size,
                             gpus_per_node or world_size)
    if zero.get("stage", 0) == 3 and hpz > 1:
        zero["zero_hpz_partition_size"] = hpz
    if not train:  # a frozen teacher has no optimizer state to offload
        zero.pop("offload_optimizer", None)
    if zero.get("stage3_param_persistence_threshold") == "auto":
        on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
        zero["stage3_param_persistence_threshold"] = 100_000 if on_gpu else 0
    cfg["zero_optimization"] = zero
    cfg.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=grad_accum,
        gradient_clipping=0.0 if tip_clips_gradients(zero.get("stage", 0)) else grad_clip,
        bf16={"enabled": dtype == torch.bfloat16},
        fp16={"enabled": dtype == torch.float16},
    )
    if dtype != torch.float32 and zero.get("stage", 0) >= 1:
        # Half-precision weights, but gradients are reduce-scattered and summed over micro-batches
        # in fp32 (by default DeepSpeed does both in the weights' dtype, rounding every
        # partial sum to bf16's 8 bits).
        cfg.update(communication_data_type="fp32", data_types={"grad_accum_dtype": "fp32"})
    return cfg


def hpz_partition_size(setting, world_size: int, gpus_per_node: int) -> int:
    """``engine.hpz_partition_size``: auto is the GPUs of a node when the run spans nodes, else 1
    (off); an integer must divide the world size."""
    if setting == "auto":
        return gpus_per_node if world_size > gpus_per_node else 1
    if world_size % setting:
        raise ValueError(f"engine.hpz_partition_size={setting} does not divide the world size "
                         f"({world_size} ranks)")
    return setting


def reuse_hpz_group() -> None:
    """Let every ZeRO-3 model of the process share one hpZ group. DeepSpeed creates the group in
    each ``zero.Init`` (every ``from_pretrained`` of a ZeRO-3 model) and in each ZeRO-3 optimizer,
    and asserts that it did not exist before, so the teacher's load (or the student's optimizer)
    fails with "ZeRO parameter intra parallel group is already initialized" (DeepSpeed issue
    #4901). As the upstream fix does (DeepSpeed PR #8361): keep the existing group when its size is
    the one asked for, refuse a different size."""
    from deepspeed.utils import groups

    create = groups._create_zero_param_parallel_group
    if getattr(create, "tip_reuses", False):
        return

    def create_once(group_size):
        existing = groups._ZERO_PARAM_INTRA_PARALLEL_GROUP
        if existing is None:
            return create(group_size)
        size = torch.distributed.get_world_size(existing)
        if size != min(group_size, torch.distributed.get_world_size()):
            raise RuntimeError(f"an hpZ group of {size} ranks exists; another model asks for "
                               f"{group_size}: use one engine.hpz_partition_size")
        return None

    create_once.tip_reuses = True
    groups._create_zero_param_parallel_group = create_once


def tip_clips_gradients(stage: int) -> bool:
    """Without ZeRO (stage 0) DeepSpeed hands the step to the torch optimizer as it is: it would
    apply a NaN/inf gradient and log no norm. There ``GuardedAdamW`` clips and guards instead, and
    the engine clips nothing."""
    return stage == 0


class GuardedStep:
    """A torch optimizer's step that first takes the global gradient norm (fp32), as DeepSpeed's
    ZeRO optimizers do: a NaN/inf norm discards the step (``overflow``, which the DeepSpeed engine
    reads: no update, no scheduler step, ``was_step_applied()`` false), else the gradients are
    clipped to ``max_norm`` and the optimizer steps. The norm before clipping is
    ``_global_grad_norm`` (the engine's ``get_global_grad_norm``). ``max_norm=None``: the plain
    optimizer, for use inside a ZeRO optimizer, which does all of this itself."""

    def __init__(self, params, max_norm: float | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm, self.overflow, self._global_grad_norm = max_norm, False, None

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_norm is None:
            return super().step(closure)
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return super().step(closure)
        # torch's get_total_norm takes each norm in the gradients' dtype; here they
        # accumulate in fp32.
        norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        self._global_grad_norm = norm
        # one host synchronisation per optimizer step
        self.overflow = not bool(torch.isfinite(norm))
        if self.overflow:
            return None
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm)
        return super().step(closure)


class GuardedAdamW(GuardedStep, torch.optim.AdamW):
    """AdamW behind ``GuardedStep`` (train.optimizer=adamw, the paper's)."""


class GuardedSGD(GuardedStep, torch.optim.SGD):
    """Plain SGD behind ``GuardedStep`` (train.optimizer=sgd): the control that tells "these tokens
    carry signal" from "Adam turns any gradient into a step of the learning rate's size"."""


OPTIMIZERS = {"adamw": GuardedAdamW, "sgd": GuardedSGD}
"""train.optimizer: the student's optimizer (a DeepSpeed client optimizer at every ZeRO stage)."""


def build_student_engine(model, ds_config: dict, optimizer, scheduler):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config)
    return engine


def build_teacher_engine(model, ds_config: dict) -> HiddenStatesLM:
    """A frozen teacher under the same ZeRO stage (so a 70B teacher is sharded too), without
    optimizer. Wrapped like the student (``HiddenStatesLM``, the engine's root module): its forward
    returns hidden states, so every teacher forward enters through the root's hooks and DeepSpeed's
    trace of the teacher completes (prefetching, persistent parameters kept)."""
    import deepspeed

    model.requires_grad_(False)
    wrapped = HiddenStatesLM(model).eval()
    if ds_config["zero_optimization"].get("stage", 0) != 3:
        # stages 0-2 shard only optimizer state and gradients: a frozen model just sits on
        # the device
        return wrapped
    engine, *_ = deepspeed.initialize(model=wrapped, config=ds_config)
    engine.module.eval()
    return engine.module


GATHER_FOR_GENERATE = ("auto", "always", "never")
"""engine.gather_for_generate (ZeRO-3): gather the student whole for each generate call. auto: when
its whole parameters take at most half of what every rank can allocate (``fits_whole``); always;
never (per-module gathers)."""


def fits_whole(whole_bytes: float, driver_free: float, reserved: float, allocated: float) -> bool:
    """Whether a rank has room for the whole student: its full parameters under half of what the
    rank could allocate, which is the driver's free memory plus the blocks the trainer's caching
    allocator holds but does not use (``reserved - allocated``). The driver's figure alone misses
    those: after a training step they can be tens of GB, and the check would fall back to
    gathering every layer for every decoded token."""
    return whole_bytes <= 0.5 * (driver_free + reserved - allocated)


def _fits_whole(engine, dist) -> bool:
    """``fits_whole`` on every rank (on CUDA; elsewhere always)."""
    device = dist.device
    if device.type != "cuda":
        return True
    size = sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
               for p in engine.module.parameters())
    ok = fits_whole(size, torch.cuda.mem_get_info(device)[0], torch.cuda.memory_reserved(device),
                    torch.cuda.memory_allocated(device))
    ok = torch.tensor([float(ok)], device=device)
    if dist.world_size > 1:  # every rank must take the same branch: the gather is a collective
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


@contextmanager
def whole_for_generation(engine, dist, setting: str = "auto"):
    """Under ZeRO-3, the student's parameters gathered once for the duration and DeepSpeed's
    per-module hooks off (DeepSpeed's unwrap_model_for_generation, what TRL does for generation):
    otherwise every decoded token gathers and releases every layer. Outside ZeRO-3, or when it does
    not fit (``GATHER_FOR_GENERATE``), nothing."""
    if setting not in GATHER_FOR_GENERATE:
        raise ValueError(f"unknown engine.gather_for_generate {setting!r}; known: "
                         f"{', '.join(GATHER_FOR_GENERATE)}")
    zero3 = any(hasattr(p, "ds_id") for p in engine.module.parameters())
    if not zero3 or setting == "never" or (setting == "auto" and not _fits_whole(engine, dist)):
        yield
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(engine):
        yield


def release_engines(*engines) -> None:
    """Free what a run's engines hold, so a sweep's next cell in the same process starts with the
    memory of the first. DeepSpeed's ZeRO-3 keeps every root module on a global forward-module stack
    that nothing clears, and its hooks and optimizer keep references to the engine: after a cell,
    both models would stay alive."""
    from deepspeed.runtime.zero import parameter_offload

    ours: set[int] = set()
    for engine in engines:
        if engine is None:
            continue
        module = getattr(engine, "module", engine)
        ours.update(id(m) for m in module.modules())
        if hasattr(engine, "destroy"):
            engine.destroy()
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK
                                             if id(m) not in ours]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def copy_weights(src_module, dst_module) -> None:
    """Copy parameters one at a time. Under ZeRO-3 both models are sharded alike (same shapes, same
    ranks), so each rank copies its own shard: no parameter is ever gathered whole."""
    dst = dict(dst_module.named_parameters())
    for name, p in src_module.named_parameters():
        q = dst[name]
        if hasattr(p, "ds_tensor"):
            q.ds_tensor.data.copy_(p.ds_tensor.data)
        else:
            q.data.copy_(p.data)


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full student weights on rank 0 (collective under ZeRO-3: every rank must call it)."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if engine.global_rank == 0 else None


def save_hf_checkpoint(engine, tokenizer, out_dir: Path, is_main: bool,
                       prefix: str = "lm.") -> Path | None:
    """The student in HF format (``from_pretrained`` loads it), written atomically by rank 0. The
    engine wraps the HF model as ``module.lm`` (see ``HiddenStatesLM``); ``prefix`` is stripped from
    the weight names."""
    state = consolidated_state_dict(engine)
    if not is_main:
        return None
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}

    def write(tmp: Path) -> None:
        engine.module.lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(out_dir, write)
