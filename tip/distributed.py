"""Processes and collectives: the process environment (single process, torchrun, srun, submitit),
the process group, and the training step's collectives, checked for the run's device.

NCCL takes CUDA tensors only, and gloo takes CPU tensors too: a collective handed a CPU tensor works
in every CPU run and crashes the first step on GPUs. Every collective here therefore refuses a
tensor that is not on the run's device, in one process as well as in many, so CPU tests see what
NCCL would refuse.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpus_per_node() -> int:
    """Processes on this node (LOCAL_WORLD_SIZE, which ``prepare_process_env`` fills)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def slurm_hostnames(node_list: str) -> list[str]:
    """Expand SLURM's compressed node list: ``gpu[07-08,10],login1`` -> gpu07, gpu08, gpu10,
    login1."""
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
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT: for one
    process (so DeepSpeed needs no launcher; without them it goes looking for MPI), and from SLURM
    when it started us, through submitit (hydra/launcher=slurm) or a plain ``srun``. A launcher's
    own values (torchrun, deepspeed) are kept."""
    env = os.environ
    # a job of hydra/launcher=slurm: one task per GPU
    if "RANK" not in env and "SUBMITIT_EXECUTOR" in env:
        from submitit.helpers import TorchDistributedEnvironment

        # Rank, world size, local rank, the first node as master and a port derived from the job id.
        # The job's values win over MASTER_* or LOCAL_WORLD_SIZE inherited from the submitting shell
        # (which submitit refuses without overwrite). Devices stay visible: the local rank
        # picks its GPU.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    # srun, without submitit
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        tasks = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(tasks),
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"), LOCAL_WORLD_SIZE=str(tasks // nodes))
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
            raise RuntimeError(f"MASTER_ADDR is not set for a run over several nodes ({world} "
                               f"processes, {env['LOCAL_WORLD_SIZE']} per node): each node would "
                               "rendezvous with itself. Launch with srun, torchrun "
                               "--rdzv-endpoint or deepspeed --hostfile, or export MASTER_ADDR")
        env["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in env:
        if world != 1:
            raise RuntimeError("MASTER_PORT must be set for multi-process runs (a launcher "
                               "sets it)")
        env["MASTER_PORT"] = str(_free_port())
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")


OP_LOCK_TIMEOUT_S = float(os.environ.get("TIP_OP_LOCK_TIMEOUT_S", 900))
"""How long a process waits for another one that is building DeepSpeed's ops."""


def extensions_root() -> Path:
    """Where torch's cpp_extension (and so DeepSpeed's JIT ops) builds: TORCH_EXTENSIONS_DIR, else
    the user's cache."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


@contextlib.contextmanager
def op_build_lock(timeout_s: float = OP_LOCK_TIMEOUT_S):
    """Hold an OS lock (flock) while DeepSpeed may JIT-build or load its ops. torch guards a build
    folder with a plain ``lock`` file (its FileBaton): a process killed mid-build (a cancelled or
    preempted job, the OOM killer, Ctrl-C) leaves it behind, and every later build waits on it
    forever, silently (pytorch issue #189245). The kernel releases a flock when its holder dies, so
    while holding it any ``lock`` file is a leftover and is removed; the wait is bounded."""
    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(root / "tip-op-build.flock", "w") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"waited {timeout_s:.0f} s for another process building DeepSpeed's ops in "
                        f"{root} (TIP_OP_LOCK_TIMEOUT_S sets the wait); if none is running, remove "
                        f"{root / 'tip-op-build.flock'}") from None
                time.sleep(0.5)
        # <root>/<op>/lock under TORCH_EXTENSIONS_DIR, else <root>/<python and device tag>/<op>/lock
        for leftover in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
            leftover.unlink(missing_ok=True)
            print(f"removed a leftover build lock of a killed process: {leftover}", flush=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def key_extensions_cache(env=os.environ) -> None:
    """Give this environment's DeepSpeed and torch their own folder of JIT ops, under torch's
    default root (unless TORCH_EXTENSIONS_DIR is set). torch rebuilds an op whenever the sources'
    paths or flags differ from the last build in its folder, so two checkouts (two virtual
    environments) sharing one folder evicted each other's build at every switch (60-160 s each);
    keyed by the DeepSpeed install, each reuses its own good build."""
    if env.get("TORCH_EXTENSIONS_DIR"):
        return
    import hashlib
    import importlib.util
    import sys

    from torch.utils.cpp_extension import get_default_build_root

    spec = importlib.util.find_spec("deepspeed")
    where = os.path.realpath(spec.origin) if spec and spec.origin else "none"
    accelerator = f"cu{torch.version.cuda}" if torch.cuda.is_available() else "cpu"
    key = hashlib.sha1(f"{where}|{torch.__version__}|{sys.version}|{accelerator}".encode())
    env["TORCH_EXTENSIONS_DIR"] = str(Path(get_default_build_root())
                                      / f"tip-{accelerator}-{key.hexdigest()[:12]}")


SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU collectives, the op its process group loads first


def preload_deepspeed_ops() -> None:
    """Build or load the op DeepSpeed's process group loads first (on CPU its shared-memory
    collectives, ``deepspeed.comm.torch.build_shm_op``; none on CUDA), so that the build happens
    under ``op_build_lock`` and ``deepspeed.init_distributed`` later only loads it. A first build
    is announced: the run is otherwise silent for a minute or more."""
    from deepspeed.comm.torch import build_shm_op

    built = list(extensions_root().glob(f"**/{SHM_OP}/*.so"))
    if not torch.cuda.is_available() and not built and os.environ.get("RANK", "0") == "0":
        print("building DeepSpeed's CPU op once for this environment (about 1-3 minutes on 2 "
              f"cores; cached in {extensions_root()})", flush=True)
    build_shm_op()


def local_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device a rank uses among those it sees. Most launchers show every GPU of the node
    and the local rank picks one; sites that bind one GPU per task (``--gpus-per-task=1``,
    ``--gpu-bind``) show each task only its own, which is then device 0."""
    if device_count == 1:
        return 0
    if 0 <= local_rank < device_count:
        return local_rank
    raise RuntimeError(f"local rank {local_rank} sees {device_count} CUDA devices and none is its "
                       "own: run one process per GPU, each seeing every GPU of its node or only "
                       "its own")


ALLOCATOR_SETTINGS = "expandable_segments:True"
"""The trainer's CUDA caching allocator (``PYTORCH_CUDA_ALLOC_CONF``, unless the user set one):
segments grow and shrink in place, so the memory a step frees is not stranded in blocks of the
wrong size when vLLM wakes beside it (as the paper's release runs it). Never handed to the vLLM
worker, whose sleep-mode pool manages its own memory."""
ALLOCATOR_MARK = "TIP_SET_ALLOC_CONF"  # set when tip, not the user, chose the allocator settings


def use_trainer_allocator(env=os.environ) -> None:
    """Set ``ALLOCATOR_SETTINGS`` before CUDA starts, unless the user chose settings."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in env and "PYTORCH_ALLOC_CONF" not in env:
        env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTINGS
        env[ALLOCATOR_MARK] = "1"


def worker_allocator_env(env: dict) -> dict:
    """A child process's environment without the allocator settings tip chose for the trainer."""
    if env.get(ALLOCATOR_MARK):
        env = {k: v for k, v in env.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_MARK)}
    return env


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """The process group (NCCL on GPUs, gloo on CPU). ``timeout_s`` bounds how long a collective
    waits for a rank that never joins (None: DeepSpeed's default, 30 minutes); the first call in a
    process sets it."""
    prepare_process_env()
    use_trainer_allocator()  # before anything starts CUDA
    key_extensions_cache()
    import deepspeed

    cuda = torch.cuda.is_available()
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    if os.environ["WORLD_SIZE"] == "1" and not torch.distributed.is_initialized():
        # One process meets only itself: a file store, so no TCP port is taken (a free port picked
        # earlier can be taken by another process before the store binds it).
        store = tempfile.NamedTemporaryFile(prefix="tip-process-group-", delete=False)
        store.close()
        os.unlink(store.name)
        kwargs.update(init_method=f"file://{store.name}", rank=0, world_size=1)
    with op_build_lock():  # one process at a time builds the ops (never around a collective)
        preload_deepspeed_ops()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False, **kwargs)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", local_device_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


def check_device(x: torch.Tensor, dist: DistInfo, what: str) -> None:
    if x.device != dist.device:
        raise RuntimeError(f"{what} got a tensor on {x.device}, but the run's device is "
                           f"{dist.device}: collectives (NCCL) take tensors on the run's device "
                           "only")


def all_reduce_sum(x: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Sum ``x`` over ranks in place (and return it)."""
    check_device(x, dist, "all_reduce_sum")
    if dist.world_size > 1:
        tdist.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """The largest ``x`` over ranks, in place (and returned)."""
    check_device(x, dist, "all_reduce_max")
    if dist.world_size > 1:
        tdist.all_reduce(x, op=tdist.ReduceOp.MAX)
    return x


def all_gather_rows(x: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Concatenate every rank's 1-D ``x`` (lengths may differ) in rank order."""
    check_device(x, dist, "all_gather_rows")
    if dist.world_size == 1:
        return x
    size = torch.tensor([x.numel()], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(dist.world_size)]
    tdist.all_gather(sizes, size)
    lengths = [int(s) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)]
    tdist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, lengths)])
