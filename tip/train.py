"""On-policy distillation with token selection: ``python -m tip.train selector=q3 keep=0.1``.

Each step: rollout (the student samples) -> teacher (scores the same tokens) -> signals (entropy,
divergences) -> select (keep a fraction of tokens) -> loss (divergence over the kept tokens) ->
optimizer step -> log / evaluate / checkpoint. The step lives in ``tip.step``, the run's parts in
``tip.parts``, the run directory's life in ``tip.rundir``; this file is the command line and the
loop.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tip.benchmarks import problem_scores
from tip.checkpoint import load_training_checkpoint, save_training_checkpoint
from tip.config import (
    CONF_DIR,
    check_launcher,
    check_output_dirs,
    check_site_dir,
    require_conf_dir,
)
from tip.distributed import DistInfo, all_reduce_sum, init_distributed
from tip.engine import release_engines, save_hf_checkpoint
from tip.env import episode_metrics
from tip.errors import one_line_errors
from tip.parts import RunParts, build_parts
from tip.rollout import RolloutBatch, check_logp_gap
from tip.rundir import (
    OpenRun,
    barrier_of,
    checked_config,
    decide_resume,
    run_directory,
)
from tip.runlog import peak_memory_mb
from tip.step import StepResult, opd_step
from tip.step_metrics import NonFiniteStep
from tip.token_records import write_token_records


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """One training run in ``run_dir``; a rerun in the same directory resumes an unfinished run of
    the same config (from its last checkpoint, or from the start) and refuses a finished one.
    ``status.json`` says how it ended. The config is checked first, before DeepSpeed builds its op
    and before any model loads."""
    quiet_library_noise()
    checked_config(cfg, Path(run_dir), overrides)
    # read-only: a finished run, or an unfinished one of another config, is refused before the op
    # build too (run_directory decides again, under the directory's lock)
    decide_resume(Path(run_dir), OmegaConf.to_yaml(cfg, resolve=True))
    dist = init_distributed(cfg.dist_timeout_s)
    with run_directory(cfg, Path(run_dir), dist) as run:
        return train_loop(cfg, run, dist)


def train_loop(cfg: DictConfig, run: OpenRun, dist: DistInfo) -> dict:
    """Set up, evaluate, train for cfg.train.steps (from the run's checkpoint if it has one),
    evaluate again, save the student."""
    parts = build_parts(cfg, dist, run.dir)
    try:
        start, results = begin(cfg, parts, run, dist)
        skipped_in_a_row = 0
        for step in range(start, cfg.train.steps):
            t0 = time.time()
            inputs, share = parts.step_inputs(cfg, step, dist)
            t_gen = time.time() - t0
            result = opd_step(parts.step, parts.engine, parts.teacher, inputs, dist)
            rollouts, keep = inputs.rollouts, inputs.keep
            metrics = {**result.metrics, "keep": keep, **episode_log(rollouts, dist)}
            if result.skipped:  # nothing was applied: student, optimizer and schedule as before
                skipped_in_a_row = log_skipped(cfg, parts, run, dist, step, result,
                                               skipped_in_a_row, t0)
                continue
            skipped_in_a_row = 0
            if result.token_table is not None:
                metrics["token_log_s"] = record_tokens(cfg, parts, run, dist, step, result,
                                                       rollouts, share.chosen, share.indices, keep)
            metrics.update(parts.rollout.sync())  # the next rollouts come from the updated student
            log_step(run, parts, dist, step, metrics, t_gen, time.time() - t0)
            check_logp_gap(metrics, cfg.rollout.get("max_logp_gap"), step + 1)
            every = cfg.train.eval_every
            if every and (step + 1) % every == 0 and step + 1 < cfg.train.steps:
                run.logger.log({"kind": "eval", "step": step + 1, "when": "during",
                                **parts.evaluate()})
            if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
                save_training_checkpoint(parts.engine, run.dir, step + 1,
                                         {"step": step + 1, "before": results["before"]},
                                         dist.is_main, cfg.train.max_checkpoints, barrier_of(dist))
        return finish(cfg, parts, run, dist, results)
    finally:
        parts.rollout.close()
        release_engines(parts.engine, None if parts.teacher is parts.student else parts.teacher)


def begin(cfg, parts: RunParts, run: OpenRun, dist: DistInfo) -> tuple[int, dict]:
    """The first step and the results so far: from the run's checkpoint, or after evaluating the
    student."""
    if run.resume.checkpoint is not None:
        client = load_training_checkpoint(parts.engine, run.resume.checkpoint)
        parts.rollout.sync()
        run.logger.log({"kind": "resume", "step": client["step"],
                        "checkpoint": str(run.resume.checkpoint)})
        if dist.is_main:
            print(f"resumed from {run.resume.checkpoint} (step {client['step']} of "
                  f"{cfg.train.steps})",
                  flush=True)
        return client["step"], {"before": client["before"]}
    if not cfg.train.eval_before:
        return 0, {"before": None}
    before = parts.evaluate()
    run.logger.log({"kind": "eval", "step": 0, "when": "before", **before})
    if dist.is_main:
        print("held-out before training: " + format_eval(before), flush=True)
    return 0, {"before": before}


def log_skipped(cfg, parts: RunParts, run: OpenRun, dist: DistInfo, step: int, result: StepResult,
                in_a_row: int, t0: float) -> int:
    """Log a skipped step; stop the run past ``train.max_skipped_steps`` in a row."""
    in_a_row += 1
    run.logger.log({"kind": "skipped", "step": step + 1, "cause": result.skipped,
                    "skipped_in_a_row": in_a_row, "lr": parts.scheduler.get_last_lr()[0],
                    "step_s": round(time.time() - t0, 3)}, quiet=True)
    if dist.is_main:
        print(f"step {step + 1:4d}  SKIPPED ({in_a_row} in a row): non-finite values from "
              f"{result.skipped}", flush=True)
    if in_a_row > cfg.train.max_skipped_steps:
        raise NonFiniteStep(f"{in_a_row} steps in a row were skipped "
                            f"(train.max_skipped_steps={cfg.train.max_skipped_steps}), the last "
                            f"for non-finite values from {result.skipped}; no skipped step was "
                            "applied, and checkpoints saved before them are intact")
    return in_a_row


def record_tokens(cfg, parts: RunParts, run: OpenRun, dist: DistInfo, step: int, result: StepResult,
                  rollouts: RolloutBatch, chosen, indices: list[int], keep: float) -> float:
    """Write the step's token records (``train.token_log_every``); returns the seconds it took."""
    t0 = time.time()
    meta = None
    if dist.is_main:
        meta = {"step": step + 1, "keep": float(keep), **parts.step.selection_meta(),
                "batch_stats": result.batch_stats, "world_size": dist.world_size,
                "pair": cfg.pair.name}
    write_token_records(run.dir, step + 1, dist.rank, result.token_table, parts.tokenizer,
                        [indices[i] for i in rollouts.example_index],
                        [chosen[i].problem for i in rollouts.example_index], meta)
    return round(time.time() - t0, 4)


def log_step(run: OpenRun, parts: RunParts, dist: DistInfo, step: int, metrics: dict, t_gen: float,
             elapsed: float) -> None:
    run.logger.log({"kind": "train", "step": step + 1, **metrics,
                    "lr": parts.scheduler.get_last_lr()[0], "rollout_s": round(t_gen, 3),
                    "step_s": round(elapsed, 3),
                    # every rank's response tokens over this rank's rollout
                    # time (ranks roll out together)
                    "rollout_tokens_per_s": metrics["valid_tokens"] / max(t_gen, 1e-9),
                    "tokens_per_s": metrics["valid_tokens"] / max(elapsed, 1e-9),
                    "peak_mem_mb": peak_memory_mb(dist.device)})


def finish(cfg, parts: RunParts, run: OpenRun, dist: DistInfo, results: dict) -> dict:
    """Evaluate after training, save the student (HF format) and write eval.json (with each
    problem's score, from which tip.report chooses a cell's lr on one half of the problems and
    reports it on the other)."""
    records: dict = {}
    results["after"] = parts.evaluate(records)
    results["after_problems"] = problem_scores(records)
    run.logger.log({"kind": "eval", "step": cfg.train.steps, "when": "after", **results["after"]})
    final_dir = run.dir / "checkpoints" / "final"
    if cfg.train.save_final and final_dir.exists():  # saved by an attempt that died just after
        print(f"keeping the final checkpoint already at {final_dir}", flush=True)
    elif cfg.train.save_final:
        save_hf_checkpoint(parts.engine, parts.tokenizer, final_dir, dist.is_main)
    if dist.is_main:
        print("held-out after training:  " + format_eval(results["after"]), flush=True)
        (run.dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"run directory: {run.dir}", flush=True)
    return results


def episode_log(rollouts: RolloutBatch, dist: DistInfo) -> dict:
    """Multi-turn rollouts: the step's episode statistics over every rank
    (``tip.env.episode_metrics``); nothing for single-turn ones."""
    if rollouts.info is None:
        return {}
    sums = all_reduce_sum(torch.tensor(rollouts.info, dtype=torch.float64, device=dist.device),
                          dist)
    return episode_metrics(sums.tolist())


def format_eval(metrics: dict) -> str:
    """``embedded 0.617 (carry 0.420, borrow 0.700)``: each benchmark's accuracy, then that of its
    tags."""
    parts = []
    for k, v in metrics.items():
        if k.endswith("/accuracy"):
            name = k.split("/")[0]
            tags = [f"{t.split('@', 1)[1]} {x:.3f}" for t, x in metrics.items()
                    if t.startswith(f"{name}/accuracy@")]
            parts.append(f"{name} {v:.3f}" + (f" ({', '.join(tags)})" if tags else ""))
    return "  ".join(parts)


def quiet_library_noise() -> None:
    """DeepSpeed's collectives warn on every call about torch's renamed functions, and its op probes
    log each gcc command at INFO under Hydra's logging: neither says anything about the run."""
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*")
    for name in ("compilers.C.base", "distutils", "setuptools", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    with one_line_errors(hc.mode == RunMode.MULTIRUN):
        check_launcher(hc.runtime.choices.get("hydra/launcher"), torch.cuda.is_available())
        results = train(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
    # The sweep's objective: mean held-out accuracy after training.
    after = [v for k, v in results["after"].items() if k.endswith("/accuracy")]
    return sum(after) / len(after)


def main() -> None:
    """``python -m tip.train``: checked for its configs at run time (importing tip.train never
    exits)."""
    require_conf_dir()
    with one_line_errors(multirun=False):
        check_site_dir()
        check_output_dirs(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
