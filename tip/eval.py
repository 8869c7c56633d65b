"""The evaluation command line (its library is tip/benchmarks.py):

    python -m tip.eval model=<dir | hub id | embedded://student> eval=math500``.

Several benchmarks at once: ``eval=[math500,aime24,aime25]`` (or ``eval=math``); the sampling
protocol is a preset: ``protocol=paper`` (n=16, T=1.0, top-p 1.0; default), ``protocol=opsd`` (n=16,
T=0.7, top-p 0.8, top-k 20) or ``protocol=greedy``. Writes ``metrics.json`` and one
``<benchmark>.jsonl`` of per-problem records (completions, extracted answers, verdicts, reasons)
into the run directory, and prints a table. ``backend=vllm`` generates with a vLLM engine (each
problem's samples from its own seed) instead of transformers' generate.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tip.benchmarks import evaluate, load_benchmarks, longest_request, sampling_of
from tip.checkpoint import atomic_dir
from tip.config import (
    CONF_DIR,
    ConfigError,
    check_eval,
    check_model,
    check_output_dirs,
    require_conf_dir,
)
from tip.engine import resolve_precision
from tip.errors import one_line_errors
from tip.models import (
    check_model_ref,
    load_model,
    load_tokenizer,
    refuse_beyond_context,
    resolve_attention,
    resolve_model_ref,
)
from tip.rollout import ROLLOUT_BACKENDS


def run_eval(cfg: DictConfig, run_dir: Path) -> dict:
    check_eval(cfg.eval)
    check_model(cfg.attn_implementation, "attn_implementation")
    if cfg.limit is not None and (not isinstance(cfg.limit, int) or cfg.limit < 1):
        raise ConfigError(f"limit={cfg.limit!r} is not allowed: expected null or an integer >= 1")
    for name in ("metrics.json", *(f"{b}.jsonl" for b in cfg.eval.benchmarks)):
        if (run_dir / name).exists():
            raise ConfigError(f"{run_dir / name} exists: a finished evaluation is never "
                              "overwritten; choose another hydra.run.dir")
    if cfg.backend not in ROLLOUT_BACKENDS:
        raise ConfigError(f"backend={cfg.backend!r} is not allowed: expected one of "
                          f"{', '.join(ROLLOUT_BACKENDS)}")
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_model_ref("model", str(cfg.model))
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model,
                               "tokenizer" if cfg.tokenizer else "model")
    benchmarks = load_benchmarks(cfg.eval, cfg.limit)
    # the longest request of each benchmark, refused before generating when beyond the model's
    # positions (past them a model runs on for minutes); the vLLM engine's context holds them
    requests = [(f"the longest {b.name} prompt",
                 *longest_request(b, tokenizer, cfg.eval.max_new_tokens, cfg.chat_template,
                                  cfg.chat_template_kwargs), "eval.max_new_tokens")
                for b in benchmarks]
    refuse_beyond_context("model", str(cfg.model), requests)
    dtype = resolve_precision(cfg.precision, device)
    records: dict[str, list[dict]] = {}
    kwargs = dict(chat_template=cfg.chat_template, workers=cfg.grading.workers,
                  timeout_s=cfg.grading.timeout_s, progress=True, records=records,
                  chat_template_kwargs=cfg.chat_template_kwargs)
    if cfg.backend == "vllm":
        context = max(prompt + room for _, prompt, room, _ in requests)
        with vllm_sampler(cfg, tokenizer, context, dtype, run_dir) as sampler:
            metrics = evaluate(None, tokenizer, benchmarks, sampling_of(cfg.eval, cfg.seed),
                               sampler=sampler, **kwargs)
    else:
        model = load_model(cfg.model, dtype, "model",
                           resolve_attention(cfg.attn_implementation, device.type)).to(device)
        metrics = evaluate(model, tokenizer, benchmarks, sampling_of(cfg.eval, cfg.seed),
                           **kwargs)
    result = {"model": cfg.model, "protocol": OmegaConf.to_container(cfg.eval, resolve=True),
              "metrics": metrics}

    # Records and metrics land together or not at all: written under a temporary name, then
    # moved into place.
    def write(tmp: Path) -> None:
        for name, rows in records.items():
            with (tmp / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")

    staged = atomic_dir(run_dir / ".results", write)
    for f in staged.iterdir():
        f.rename(run_dir / f.name)
    staged.rmdir()
    print(format_table(metrics), flush=True)
    print(f"results: {run_dir}", flush=True)
    return metrics


@contextmanager
def vllm_sampler(cfg, tokenizer, context: int, dtype, run_dir: Path):
    """backend=vllm: the model in a vLLM worker (``tip.vllm_worker``) whose context (``context``
    positions) holds the longest prompt and its answer; end-of-sequence ids from the model's
    generation config."""
    from transformers import GenerationConfig

    from tip.vllm_rollout import EngineSampler
    from tip.vllm_worker import VllmWorker

    path = resolve_model_ref(cfg.model)
    try:
        generation = GenerationConfig.from_pretrained(path)
    except OSError:  # a model without generation_config.json: the tokenizer's EOS alone
        generation = None
    gpu = torch.cuda.is_available()
    worker = VllmWorker(path, python=cfg.vllm.python,
                        dtype="float32" if dtype == torch.float32 else "bfloat16",
                        max_model_len=context, seed=cfg.seed, enforce_eager=not gpu,
                        gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
                        log_path=run_dir / "vllm_worker.log")
    try:
        yield EngineSampler(worker, tokenizer, SimpleNamespace(generation_config=generation))
    finally:
        worker.close()


def format_table(metrics: dict) -> str:
    names = sorted({k.split("/")[0] for k in metrics})
    cols = ["accuracy", "accuracy_std", "pass@1", "maj@1", "n", "samples"]
    extra = sorted({k.split("/")[1] for k in metrics if k.split("/")[1] not in cols})
    head = ["benchmark", *cols, *extra]
    rows = [head] + [[n, *(_fmt(metrics.get(f"{n}/{c}")) for c in cols + extra)] for n in names]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    with one_line_errors(hc.mode == RunMode.MULTIRUN):
        run_eval(cfg, Path(hc.runtime.output_dir))


def main() -> None:
    """``python -m tip.eval``: checked for its configs at run time (importing tip.eval never
    exits)."""
    require_conf_dir()
    with one_line_errors(multirun=False):
        check_output_dirs(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
