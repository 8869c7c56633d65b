"""The GPU path, checked on the machine at hand: ``make gpu-check`` (or ``python -m
tip.gpu_check``).

Runs short real jobs on the embedded pair, each in its own process, and prints PASS / FAIL / SKIP
per part: bf16 training steps of several rules on one GPU, the same over NCCL on two GPUs, vLLM
rollouts on one and two GPUs, a two-cell sweep in one process (the second cell must not start with
the first one's memory), and one ``tip.eval``. Parts that need CUDA, two GPUs or vLLM are skipped
with the reason where those are missing, so on a CPU-only machine every part is skipped.
``--on-cpu`` runs the parts that can run without CUDA on this CPU (fp32, gloo) instead, to check the
harness itself. Exit status 1 if any part failed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RULES = ("entropy_sample", "q3", "soft_or", "all")
SMOKE = ["experiment=smoke", "logger=none", "train.save_final=false",
         "eval.benchmarks.embedded.source.size=8"]


@dataclass(frozen=True)
class Part:
    name: str
    gpus: int  # GPUs it needs (0: none)
    vllm: bool  # needs vLLM

    def command(self, out: Path, precision: str) -> list[str]:
        py, port = sys.executable, str(_free_port())
        torchrun = [py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    port]
        train = ["-m", "tip.train", *SMOKE, f"precision={precision}"]
        multirun = ["-m", "tip.train", "-m", *SMOKE, f"precision={precision}"]
        if self.name == "bf16 steps, 1 GPU, rollout=hf":
            return [py, *multirun, f"selector={','.join(RULES)}", f"hydra.sweep.dir={out}"]
        if self.name == "bf16 steps, 2 GPUs over NCCL, rollout=hf":
            return [*torchrun, *train, "selector=q3", "keep=0.2", f"hydra.run.dir={out}"]
        if self.name == "rollout=vllm, 1 GPU":
            return [py, *train, "rollout=vllm", "selector=soft_or", f"hydra.run.dir={out}"]
        if self.name == "rollout=vllm, 2 GPUs":
            return [*torchrun, *train, "rollout=vllm", "selector=entropy_sample",
                    f"hydra.run.dir={out}"]
        if self.name == "sweep of 2 cells in one process":
            return [py, *multirun, "cell=all@1.0,q3@0.2", f"hydra.sweep.dir={out}"]
        if self.name == "tip.eval":
            return [py, "-m", "tip.eval", "model=embedded://teacher", "eval=embedded", "limit=16",
                    "protocol=paper", f"precision={precision}", f"hydra.run.dir={out}"]
        raise ValueError(self.name)


PARTS = (
    Part("bf16 steps, 1 GPU, rollout=hf", 1, False),
    Part("bf16 steps, 2 GPUs over NCCL, rollout=hf", 2, False),
    Part("rollout=vllm, 1 GPU", 1, True),
    Part("rollout=vllm, 2 GPUs", 2, True),
    Part("sweep of 2 cells in one process", 1, False),
    Part("tip.eval", 1, False),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_available() -> bool:
    if os.environ.get("TIP_VLLM_PYTHON"):
        return Path(os.environ["TIP_VLLM_PYTHON"]).exists()
    return subprocess.run([sys.executable, "-c", "import vllm"],
                          capture_output=True).returncode == 0


def deepspeed_accelerator(env: dict[str, str]) -> str:
    """The accelerator DeepSpeed picks in a part's process (``DS_ACCELERATOR``, else detection)."""
    code = ("from deepspeed.accelerator import get_accelerator; "
            "print(get_accelerator().device_name())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() \
        else f"unknown ({out.stderr.strip()[-200:]})"


def skip_reason(part: Part, on_cpu: bool, accelerator: str = "cuda",
                gpus: int | None = None) -> str | None:
    """Why ``part`` cannot run here (None: it can). ``gpus``: CUDA devices visible (default: torch's
    count); ``accelerator``: DeepSpeed's (``deepspeed_accelerator``)."""
    if on_cpu:
        return "needs vLLM (not run with --on-cpu)" if part.vllm else None
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if gpus == 0:
        return "no CUDA device (torch.cuda.is_available() is False)"
    if accelerator != "cuda":
        return (f"DeepSpeed's accelerator is {accelerator!r}, not cuda (DS_ACCELERATOR="
                f"{os.environ.get('DS_ACCELERATOR')!r}): its ZeRO partitions would stay on the CPU "
                "while tip computes on CUDA; unset DS_ACCELERATOR and let DeepSpeed detect the GPU")
    if gpus < part.gpus:
        return f"needs {part.gpus} GPUs, {gpus} visible"
    if part.vllm and not vllm_available():
        return ("vLLM is not installed for this interpreter (pip install -e .[gpu], or set "
                "TIP_VLLM_PYTHON)")
    return None


def verify(part: Part, out: Path) -> str | None:
    """What a finished part must have left behind; a message if it did not."""
    if part.name.startswith("sweep"):
        peaks = []
        for cell in ("0", "1"):
            status = json.loads((out / cell / "status.json").read_text())["status"]
            if status != "completed":
                return f"cell {cell} ended {status}"
            rows = [json.loads(line)
                    for line in (out / cell / "metrics.jsonl").read_text().splitlines()]
            peaks.append(max(r.get("peak_mem_mb", 0) for r in rows))
        if peaks[1] > 1.25 * peaks[0] + 64:
            return (f"the second cell peaked at {peaks[1]:.0f} MB against the first's "
                    f"{peaks[0]:.0f} MB")
        return None
    if part.name == "tip.eval":
        return None if (out / "metrics.json").is_file() else "no metrics.json"
    runs = [out] if (out / "status.json").exists() else \
        sorted(p for p in out.iterdir() if p.is_dir())
    for run in runs:
        if not (run / "status.json").exists():
            continue
        status = json.loads((run / "status.json").read_text())["status"]
        if status != "completed":
            return f"{run.name} ended {status}"
    return None


def part_env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def run_part(part: Part, on_cpu: bool, timeout_s: int, accelerator: str) -> tuple[str, str]:
    reason = skip_reason(part, on_cpu, accelerator)
    if reason:
        return "SKIP", reason
    out = Path(tempfile.mkdtemp(prefix="tip-gpu-check-")) / "out"
    start = time.time()
    env = part_env()
    try:
        proc = subprocess.run(part.command(out, "fp32" if on_cpu else "bf16"), capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return "FAIL", f"no result in {timeout_s} s"
    took = f"{time.time() - start:.0f} s"
    if proc.returncode != 0:
        return ("FAIL",
                f"exit {proc.returncode} after {took}:\n" + (proc.stdout + proc.stderr)[-2000:])
    problem = verify(part, out)
    return ("FAIL", problem) if problem else ("PASS", took)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--on-cpu", action="store_true",
                    help="run the parts that need no CUDA on this CPU (fp32)")
    ap.add_argument("--only", action="append",
                    help="run only the parts whose name contains this (repeatable)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per part")
    args = ap.parse_args(argv)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    accelerator = deepspeed_accelerator(part_env())
    print(f"tip gpu-check: torch {torch.__version__}, {device}, {torch.cuda.device_count()} "
          f"GPU(s), DeepSpeed's accelerator {accelerator}", flush=True)
    failed = False
    for part in PARTS:
        if args.only and not any(s in part.name for s in args.only):
            continue
        verdict, detail = run_part(part, args.on_cpu, args.timeout, accelerator)
        failed |= verdict == "FAIL"
        print(f"{verdict}  {part.name}: {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
