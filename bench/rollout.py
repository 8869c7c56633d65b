"""Rollout throughput, HF generate vs vLLM, on the embedded pair and on a real pretrained model.

    python bench/rollout.py [--vllm-python .venv-vllm/bin/python] [--real]

Each backend samples the same prompts at temperature 1.0 (each completion runs to its end or max_new_tokens);
prints generated tokens/s per backend and the ratio vLLM/HF. --real adds Qwen2.5-Coder-0.5B-Instruct
(`python -m tip.pairs fetch qwen2.5-coder-0.5b-instruct` first).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from tip.data import BOXED_INSTRUCTION, load_examples, prompt_token_ids
from tip.models import load_model, load_tokenizer, resolve_model_ref
from tip.rollout import hf_generate, prompt_seeds
from tip.testbed.arith import sample_problems


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
    from tip.vllm_rollout import VllmRollout

    eng = VllmRollout(resolve_model_ref(ref), python=vllm_python, max_model_len=max_model_len)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default=os.environ.get("TIP_VLLM_PYTHON", ".venv-vllm/bin/python"))
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("TIP_DATA_ROOT", "../shared/data")))
    args = ap.parse_args()
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
