"""Rollout throughput: HF generate vs vLLM, and HF generate under ZeRO-3, on the embedded pair and a real model.

    python bench/rollout.py [--vllm-python .venv-vllm/bin/python] [--real]
    python bench/rollout.py --zero3 [--real] [--repeats 3]

Each backend samples the same prompts at temperature 1.0 (each completion runs to its end or max_new_tokens);
prints generated tokens/s per backend and the ratio vLLM/HF. --real adds Qwen2.5-Coder-0.5B-Instruct
(`python -m tip.pairs fetch qwen2.5-coder-0.5b-instruct` first).

--zero3 measures tip's own rollout (tip.parts.build_parts, HFRollout) under engine=zero0, engine=zero3 with per-module
gathers (engine.gather_for_generate=never) and engine=zero3 gathered once per call (auto, the default): tokens/s
before training and after 2 training steps (each variant in a fresh process, the student its own live teacher so
that only one model loads), the median over --repeats runs side by side, and the ratio to zero0.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from child import child_json
from tip.data import BOXED_INSTRUCTION, load_examples, prompt_token_ids
from tip.models import load_model, load_tokenizer, resolve_model_ref
from tip.rollout import hf_generate, prompt_seeds
from tip.tasks import sample_problems


def tokens(batch) -> int:
    return int(batch.response_mask.sum())


def run(name, ref, prompts_text, n, max_new, vllm_python, max_model_len):
    tok = load_tokenizer(ref)
    model = load_model(ref, torch.float32, name)
    ids = prompt_token_ids(tok, prompts_text, "{problem}")
    hf_generate(model, tok, ids[:1], n=1, max_new_tokens=4)  # warm-up
    t0 = time.perf_counter()
    hf = hf_generate(model, tok, ids, n=n, temperature=1.0, max_new_tokens=max_new)
    hf_rate = tokens(hf) / (time.perf_counter() - t0)
    print(f"{name}: HF generate  {tokens(hf):6d} tokens  {hf_rate:8.1f} tok/s", flush=True)
    if not vllm_python or not Path(vllm_python).exists():
        print(f"{name}: vLLM skipped (no interpreter with vllm; `make vllm-env`)")
        return
    from tip.vllm_worker import VllmWorker

    eng = VllmWorker(resolve_model_ref(ref), python=vllm_python, max_model_len=max_model_len)
    try:
        eng.generate(tok, ids[:1], n=1, max_new_tokens=4, model=model)  # warm-up
        t0 = time.perf_counter()
        vl = eng.generate(tok, ids, n=n, temperature=1.0, max_new_tokens=max_new,
                          seeds=prompt_seeds(0, 0, list(range(len(ids)))), model=model)
        vl_rate = tokens(vl) / (time.perf_counter() - t0)
    finally:
        eng.close()
    print(f"{name}: vLLM         {tokens(vl):6d} tokens  {vl_rate:8.1f} tok/s   vLLM/HF = {vl_rate / hf_rate:.2f}x",
          flush=True)


ZERO3_VARIANTS = {"zero0": ("engine=zero0",), "zero3, per-module gathers": ("engine=zero3",
                  "engine.gather_for_generate=never"), "zero3, gathered once": ("engine=zero3",)}


def zero3_variant(student: str, overrides: list[str]) -> None:
    """One variant in this process: rollout tokens/s before and after two training steps (printed as JSON)."""
    import json
    import tempfile

    from hydra import compose, initialize_config_dir

    from tip.config import CONF_DIR
    from tip.distributed import init_distributed
    from tip.parts import build_parts, rank_prompts
    from tip.step import opd_step

    base = ["logger=none", "teacher=self_privileged", "teacher.weights=live", f"pair.student={student}",
            "pair.teacher=${pair.student}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=base + overrides)
    dist = init_distributed()
    run = build_parts(cfg, dist, Path(tempfile.mkdtemp(prefix="tip-bench-")))
    rates = {}
    for when in ("before", "after"):
        if when == "after":
            for step in range(2):
                opd_step(run.step, run.engine, run.teacher, run.step_inputs(cfg, step, dist)[0], dist)
        share = rank_prompts(cfg, run.train_examples, run.tokenizer, 5, dist)
        prompt_ids = share.prompt_ids
        run.rollout.generate(prompt_ids[:1], 0, [0])  # warm-up
        t0 = time.perf_counter()
        batch = run.rollout.generate(prompt_ids, 7, share.seeds(cfg.seed, 7))
        rates[when] = tokens(batch) / (time.perf_counter() - t0)
    print(json.dumps(rates))


def zero3_bench(models: dict[str, tuple[str, list[str]]], repeats: int) -> None:
    import statistics
    import sys

    for name, (student, extra) in models.items():
        runs: dict[str, list[dict]] = {v: [] for v in ZERO3_VARIANTS}
        for _ in range(repeats):  # side by side: each repeat runs every variant once
            for variant, overrides in ZERO3_VARIANTS.items():
                runs[variant].append(child_json([sys.executable, __file__, "--zero3-variant", student, *overrides,
                                                 *extra], f"{name} {variant}", env={"DS_ACCELERATOR": "cpu"}))
        med = {v: {w: statistics.median(r[w] for r in rs) for w in ("before", "after")} for v, rs in runs.items()}
        base = med["zero0"]
        print(f"\n{name}: HF generate tokens/s, median of {repeats} (ratio to zero0)")
        for variant, m in med.items():
            print(f"  {variant:<26} before {m['before']:9.1f} ({m['before'] / base['before']:.2f}x)   "
                  f"after 2 steps {m['after']:9.1f} ({m['after'] / base['after']:.2f}x)", flush=True)


def main() -> None:
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "--zero3-variant":
        zero3_variant(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default=os.environ.get("TIP_VLLM_PYTHON", ".venv-vllm/bin/python"))
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--zero3", action="store_true", help="HF generate under ZeRO-3 vs zero0 (tip.train's rollout)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("TIP_DATA_ROOT", "../shared/data")))
    args = ap.parse_args()
    if args.zero3:
        models = {"embedded student": ("embedded://student", [
            "experiment=smoke", "train.prompts_per_step=8", "teacher.context_template='{solution};{problem}'"])}
        if args.real:
            models["Qwen2.5-Coder-0.5B-Instruct"] = ("pypi-gguf://qwen2.5-coder-0.5b-instruct", [
                "experiment=real_cpu", "rollout.max_new_tokens=32", "teacher.context_template='{solution} {problem}'"])
        zero3_bench(models, args.repeats)
        return
    torch.manual_seed(0)
    run("embedded", "embedded://student", [p.problem for p in sample_problems(32, seed=9)], 4, 40,
        args.vllm_python, 128)
    if args.real:
        problems = [e.problem + " " + BOXED_INSTRUCTION for e in
                    load_examples({"kind": "jsonl", "path": str(args.data_root / "gsm8k_test.jsonl")})[:8]]
        run("qwen2.5-coder-0.5b", "pypi-gguf://qwen2.5-coder-0.5b-instruct", problems, 2, 64, args.vllm_python,
            1024)


if __name__ == "__main__":
    main()
