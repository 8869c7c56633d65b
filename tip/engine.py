"""DeepSpeed set-up: process environment, the engine config, engines for student and teacher, HF checkpoints.

Training always goes through DeepSpeed (ZeRO-3 by default). On CPU the gloo backend is used and math is fp32
(these CPUs have no bf16 units: bf16 ran 17-27x slower); on GPU bf16 is the default.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

from tip.distributed import DistInfo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_hostnames(node_list: str) -> list[str]:
    """Expand SLURM's compressed node list: ``gpu[07-08,10],login1`` -> gpu07, gpu08, gpu10, login1."""
    hosts, i = [], 0
    while i < len(node_list):
        j = i
        while j < len(node_list) and node_list[j] not in ",[":
            j += 1
        prefix = node_list[i:j]
        if j < len(node_list) and node_list[j] == "[":
            end = node_list.index("]", j)
            for part in node_list[j + 1:end].split(","):
                lo, _, hi = part.partition("-")
                hosts += [f"{prefix}{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1)]
            j = end + 1
        elif prefix:
            hosts.append(prefix)
        i = j + 1
    return hosts


def slurm_master_port(job_id: str) -> int:
    """A port that every task of a SLURM job derives alike from the job id, in 20000-59999."""
    return 20000 + int(job_id) % 40000


def prepare_process_env() -> None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT: for one process (so
    DeepSpeed needs no launcher; without them it goes looking for MPI), and from SLURM when it started us,
    through submitit (hydra/launcher=slurm) or a plain ``srun``. A launcher's own values (torchrun, deepspeed)
    are kept."""
    env = os.environ
    if "RANK" not in env and "SUBMITIT_EXECUTOR" in env:  # a job of hydra/launcher=slurm: one task per GPU
        from submitit.helpers import TorchDistributedEnvironment

        # Rank, world size, local rank, the first node as master and a port derived from the job id. The job's
        # values win over MASTER_* or LOCAL_WORLD_SIZE inherited from the submitting shell (which submitit
        # refuses without overwrite). Devices stay visible: the local rank picks its GPU.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, without submitit
        tasks = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(tasks), LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
                   LOCAL_WORLD_SIZE=str(tasks // nodes))
        node_list = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" not in env and node_list:
            env["MASTER_ADDR"] = slurm_hostnames(node_list)[0]
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            env["MASTER_PORT"] = str(slurm_master_port(env["SLURM_JOB_ID"]))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    world = int(env["WORLD_SIZE"])
    if "MASTER_ADDR" not in env:
        if world > int(env.get("LOCAL_WORLD_SIZE", world)):
            raise RuntimeError(f"MASTER_ADDR is not set for a run over several nodes ({world} processes, "
                               f"{env['LOCAL_WORLD_SIZE']} per node): each node would rendezvous with itself. Launch "
                               "with srun, torchrun --rdzv-endpoint or deepspeed --hostfile, or export MASTER_ADDR")
        env["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in env:
        if world != 1:
            raise RuntimeError("MASTER_PORT must be set for multi-process runs (a launcher sets it)")
        env["MASTER_PORT"] = str(_free_port())
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """The process group (NCCL on GPUs, gloo on CPU). ``timeout_s`` bounds how long a collective waits for a
    rank that never joins (None: DeepSpeed's default, 30 minutes); the first call in a process sets it."""
    prepare_process_env()
    import deepspeed

    cuda = torch.cuda.is_available()
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    if os.environ["WORLD_SIZE"] == "1" and not torch.distributed.is_initialized():
        # One process meets only itself: a file store, so no TCP port is taken (a free port picked earlier can
        # be taken by another process before the store binds it).
        store = tempfile.NamedTemporaryFile(prefix="tip-process-group-", delete=False)
        store.close()
        os.unlink(store.name)
        kwargs.update(init_method=f"file://{store.name}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False, **kwargs)
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"unknown precision {precision!r}; known: auto, {', '.join(table)}")
    return table[precision]


def deepspeed_config(engine_cfg: dict[str, Any], micro_batch: int, grad_accum: int, grad_clip: float,
                     dtype: torch.dtype, train: bool = True, on_gpu: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for one engine from ``conf/engine/*.yaml`` (its ``deepspeed`` block is that JSON; the
    batch sizes, clipping and precision are filled here so they cannot disagree with the recipe)."""
    cfg = {k: v for k, v in dict(engine_cfg["deepspeed"]).items()}
    zero = dict(cfg.get("zero_optimization", {}))
    if not train:  # a frozen teacher has no optimizer state to offload
        zero.pop("offload_optimizer", None)
    if zero.get("stage3_param_persistence_threshold") == "auto":
        on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
        zero["stage3_param_persistence_threshold"] = 100_000 if on_gpu else 0
    cfg["zero_optimization"] = zero
    cfg.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=grad_accum,
        gradient_clipping=grad_clip,
        bf16={"enabled": dtype == torch.bfloat16},
        fp16={"enabled": dtype == torch.float16},
    )
    if dtype != torch.float32 and zero.get("stage", 0) >= 1:
        # Half-precision weights, but gradients are reduce-scattered and summed over micro-batches in fp32 (by
        # default DeepSpeed does both in the weights' dtype, rounding every partial sum to bf16's 8 bits).
        cfg.update(communication_data_type="fp32", data_types={"grad_accum_dtype": "fp32"})
    return cfg


def build_student_engine(model, ds_config: dict, optimizer, scheduler):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def build_teacher_engine(model, ds_config: dict):
    """A frozen teacher under the same ZeRO stage (so a 70B teacher is sharded too), without optimizer."""
    import deepspeed

    model.requires_grad_(False)
    if ds_config["zero_optimization"].get("stage", 0) != 3:
        return model  # stages 0-2 shard only optimizer state and gradients: a frozen model just sits on the device
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.module.eval()
    return engine.module


def release_engines(*engines) -> None:
    """Free what a run's engines hold, so a sweep's next cell in the same process starts with the memory of the
    first. DeepSpeed's ZeRO-3 keeps every root module on a global forward-module stack that nothing clears, and
    its hooks and optimizer keep references to the engine: after a cell, both models would stay alive."""
    from deepspeed.runtime.zero import parameter_offload

    ours: set[int] = set()
    for engine in engines:
        if engine is None:
            continue
        module = getattr(engine, "module", engine)
        ours.update(id(m) for m in module.modules())
        if hasattr(engine, "destroy"):
            engine.destroy()
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in ours]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def copy_weights(src_module, dst_module) -> None:
    """Copy parameters one at a time. Under ZeRO-3 both models are sharded alike (same shapes, same ranks), so each
    rank copies its own shard: no parameter is ever gathered whole."""
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


def atomic_dir(final: Path, write) -> Path:
    """Write a directory under a temporary name beside ``final``, then rename it into place. Never replaces an
    existing directory: finished work is not overwritten."""
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"refusing to overwrite {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        write(tmp)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_hf_checkpoint(engine, tokenizer, out_dir: Path, is_main: bool, prefix: str = "lm.") -> Path | None:
    """The student in HF format (``from_pretrained`` loads it), written atomically by rank 0. The engine wraps
    the HF model as ``module.lm`` (see ``HiddenStatesLM``); ``prefix`` is stripped from the weight names."""
    state = consolidated_state_dict(engine)
    if not is_main:
        return None
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}

    def write(tmp: Path) -> None:
        engine.module.lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(out_dir, write)
