"""`python tests/hpz_memory.py <out.json> <overrides>` under torchrun (gloo): builds a run's parts as
tip.train does and writes what DeepSpeed allocated on each rank beside tip.plan's terms: the hpZ
secondary partitions of the student and the teacher, and ZeRO-3's reduce bucket."""

import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from tip.config import CONF_DIR, apply_cell, check_config
from tip.distributed import init_distributed
from tip.parts import build_parts


def secondary_bytes(module) -> int:
    return sum(p.ds_secondary_tensor.numel() * p.ds_secondary_tensor.element_size()
               for p in module.parameters() if getattr(p, "ds_secondary_tensor", None) is not None)


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    apply_cell(cfg)
    check_config(cfg)
    dist = init_distributed()
    parts = build_parts(cfg, dist, out.parent / "run")
    optimizer = parts.engine.optimizer
    buckets = sum(b.buffer.numel() * b.buffer.element_size()
                  for b in getattr(optimizer, "ipg_buckets", {}).values() if b.buffer is not None)
    record = {"rank": dist.rank, "student_secondary": secondary_bytes(parts.engine.module),
              "teacher_secondary": secondary_bytes(parts.teacher),
              "reduce_bucket": buckets,
              "student_params": sum(getattr(p, "ds_numel", p.numel())
                                    for p in parts.engine.module.parameters()),
              "teacher_params": sum(getattr(p, "ds_numel", p.numel())
                                    for p in parts.teacher.parameters())}
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, record)
    if dist.rank == 0:
        out.write_text(json.dumps(gathered))


if __name__ == "__main__":
    main()
