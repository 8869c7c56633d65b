"""Collectives of the training step, checked for the run's device.

NCCL takes CUDA tensors only, and gloo takes CPU tensors too: a collective handed a CPU tensor works in every
CPU run and crashes the first step on GPUs. Every collective here therefore refuses a tensor that is not on the
run's device, in one process as well as in many, so CPU tests see what NCCL would refuse.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def check_device(x: torch.Tensor, dist: DistInfo, what: str) -> None:
    if x.device != dist.device:
        raise RuntimeError(f"{what} got a tensor on {x.device}, but the run's device is {dist.device}: "
                           "collectives (NCCL) take tensors on the run's device only")


def all_reduce_sum(x: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Sum ``x`` over ranks in place (and return it)."""
    check_device(x, dist, "all_reduce_sum")
    if dist.world_size > 1:
        tdist.all_reduce(x)
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
