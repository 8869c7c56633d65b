"""Evaluation through the rollout engine vs HF generate under ZeRO-3, at the paper protocol's shape.

    python bench/eval_engine.py [--repeats 3] [--problems 256] [--cap 200] [--vllm-python .venv-vllm/bin/python]

What ``tip.train`` does for each evaluation (``RunParts.evaluate``): the embedded task's first ``--problems`` held-out
problems, 16 samples each at temperature 1 (protocol=paper), up to ``--cap`` new tokens (the embedded pair's context
is 256), generated and graded. ``rollout=hf`` generates with the ZeRO-3 student (gathered whole once per call, HF
``generate`` in batches of ``eval.max_seqs_per_generate`` sequences); ``rollout=vllm`` with vLLM's CPU build in its
worker process. Each arrangement runs in a fresh process (set-up and the engine's start are not timed); the repeats
alternate the two; prints the median seconds of one evaluation, its generated tokens per second, the accuracy (the
two should agree within sampling noise) and the ratio HF / vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from child import child_json

ROOT = Path(__file__).resolve().parents[1]


def one_evaluation(backend: str, problems: int, cap: int, vllm_python: str) -> dict:
    from hydra import compose, initialize_config_dir

    from tip.config import CONF_DIR
    from tip.distributed import init_distributed
    from tip.engine import release_engines
    from tip.parts import build_parts

    overrides = ["experiment=smoke", "logger=none", "engine=zero3", "protocol=paper", f"eval.max_new_tokens={cap}",
                 f"eval.limit={problems}", f"eval.benchmarks.embedded.source.size={problems}",
                 "teacher=self_privileged", "teacher.weights=live",
                 f"rollout={backend}", *([f"rollout.vllm_python={vllm_python}"] if backend == "vllm" else [])]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run = build_parts(cfg, init_distributed(), Path(tempfile.mkdtemp(prefix="bench-eval-")))
    try:
        t0 = time.perf_counter()
        records: dict = {}
        run.eval_kwargs["records"] = records
        metrics = run.evaluate()
        seconds = time.perf_counter() - t0
    finally:
        run.rollout.close()
        release_engines(run.engine)
    texts = [c for rows in records.values() for r in rows for c in r["completions"]]
    tokens = sum(len(run.tokenizer(t)["input_ids"]) for t in texts)
    return {"seconds": seconds, "tokens": tokens, "accuracy": metrics["embedded/accuracy"],
            "n": metrics["embedded/n"], "samples": metrics["embedded/samples"]}


def run_child(backend: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, "--problems", str(args.problems), "--cap", str(args.cap),
           "--vllm-python", args.vllm_python]
    return child_json(cmd, f"the {backend} evaluation", cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--cap", type=int, default=200)
    ap.add_argument("--vllm-python", default=os.environ.get("TIP_VLLM_PYTHON", str(ROOT / ".venv-vllm/bin/python")))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_evaluation(args.child, args.problems, args.cap, args.vllm_python)))
        return
    runs = [(run_child("hf", args), run_child("vllm", args)) for _ in range(args.repeats)]
    first = runs[0][0]
    print(f"embedded task: {first['n']} problems x {first['samples']} samples, T=1, up to {args.cap} new tokens "
          f"(median of {args.repeats}, side by side)")
    seconds = []
    for i, name in enumerate(("HF generate, ZeRO-3 (rollout=hf)", "vLLM CPU build (rollout=vllm)")):
        s = statistics.median(r[i]["seconds"] for r in runs)
        tps = statistics.median(r[i]["tokens"] / r[i]["seconds"] for r in runs)
        acc = statistics.median(r[i]["accuracy"] for r in runs)
        seconds.append(s)
        print(f"{name:<36} {s:8.1f} s   {tps:8.0f} generated tokens/s   mean@16 {acc:.3f}")
    print(f"vLLM speed-up (HF seconds / vLLM seconds): {seconds[0] / seconds[1]:.2f}x")


if __name__ == "__main__":
    main()
