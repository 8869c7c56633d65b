"""A run directory's life: the decision to resume, restart or refuse; ``status.json``; each rank's
failure record and rank 0's watch on them; SIGTERM; the logger and the W&B run, finished however the
run ends.

``run_directory`` is the one context manager that holds it all; ``tip.train`` runs its loop inside
it. A requeued SLURM job (same directory, same config) resumes from the last checkpoint
(``tip.checkpoint``); a finished run is never touched again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as tdist
from omegaconf import DictConfig, OmegaConf

from tip.checkpoint import latest_checkpoint, write_atomic
from tip.config import ConfigError, apply_cell, check_config
from tip.distributed import DistInfo
from tip.parts import RunSizes
from tip.runlog import RunLogger
from tip.wandb_logging import start_run

STATUS_FILE = "status.json"


def write_status(run_dir: Path, status: str, **extra) -> None:
    """``running`` | ``completed`` | ``failed`` (with the error), read by ``tip.report``."""
    write_atomic(Path(run_dir) / STATUS_FILE,
                 json.dumps({"status": status, **extra}, indent=1) + "\n")


FAILURES_DIR = "failures"


def _failure_record(exc: BaseException, rank: int | None) -> dict:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"rank": rank, "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(lines[-20:])}


def failure_status(run_dir: Path, exc: BaseException, rank: int | None = None) -> None:
    """Mark the run failed with ``exc`` (raised on ``rank``). Another rank's failure recorded
    earlier stays the
    stated cause: a rank blocked in a collective by it fails only as a consequence."""
    record = _failure_record(exc, rank)
    first = first_rank_failure(run_dir)
    if first is not None and first.get("rank") != rank:
        write_status(run_dir, "failed", **first, also=record["error"])
    else:
        write_status(run_dir, "failed", **record)


def record_rank_failure(run_dir: Path, rank: int, exc: BaseException) -> None:
    """Any rank: ``failures/rank<r>.json`` with the error, and the run's status marked failed at
    once (rank 0 may be stuck in a collective waiting for this rank, and never get to write it)."""
    folder = Path(run_dir) / FAILURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"rank{rank}.json",
                 json.dumps(_failure_record(exc, rank), indent=1) + "\n")
    failure_status(run_dir, exc, rank)


def set_aside_failures(run_dir: Path) -> None:
    """Move an earlier attempt's ``failures/`` to ``failures.attempt-<n>/`` (kept, never
    deleted)."""
    folder = Path(run_dir) / FAILURES_DIR
    if not folder.is_dir():
        return
    n = 1
    while (aside := folder.with_name(f"{FAILURES_DIR}.attempt-{n}")).exists():
        n += 1
    os.rename(folder, aside)


def watch_peer_failures(run_dir: Path, own_rank: int, on_failure, poll_s: float = 1.0):
    """A daemon thread that waits for another rank's failure record and then calls
    ``on_failure(record)``. Rank 0 runs it: when another rank fails, rank 0 is usually blocked
    inside a collective that will only return at the process-group timeout (or never, if the
    launcher kills it first), so the thread finishes the run's bookkeeping (W&B run) and ends the
    process. Returns a function that stops the watch."""
    import threading

    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll_s):
            others = [f for f in _failure_files(run_dir) if f.name != f"rank{own_rank}.json"]
            if others:
                on_failure(json.loads(others[0].read_text()))
                return

    threading.Thread(target=watch, name="tip-peer-failure-watch", daemon=True).start()
    return stop.set


def _failure_files(run_dir: Path) -> list[Path]:
    """This attempt's rank failure records, earliest first."""
    return sorted((Path(run_dir) / FAILURES_DIR).glob("rank*.json"),
                  key=lambda f: f.stat().st_mtime)


def first_rank_failure(run_dir: Path) -> dict | None:
    """The earliest recorded failure of any rank, or None."""
    files = _failure_files(run_dir)
    return json.loads(files[0].read_text()) if files else None


def read_status(run_dir: Path) -> dict | None:
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class ResumeDecision:
    """What a run directory asks of a new attempt: ``checkpoint`` to resume from (None: start from
    step 0)."""
    checkpoint: Path | None
    step: int
    prior_attempt: bool  # metrics of an unfinished attempt are there (kept aside, never deleted)


def decide_resume(run_dir: Path, config_text: str) -> ResumeDecision:
    """Read-only: every rank calls it before rank 0 changes anything. Refuses a finished run and a
    directory that holds a run with another config; otherwise resumes from the last checkpoint, or
    restarts an unfinished attempt that left none."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status and status.get("status") == "completed":
        raise FileExistsError(f"{run_dir} already holds a finished run (status.json); choose "
                              "another hydra.run.dir")
    has_metrics = (run_dir / "metrics.jsonl").exists()
    if not has_metrics:
        return ResumeDecision(None, 0, False)
    saved = run_dir / "config.yaml"
    if not saved.is_file() or saved.read_text() != config_text:
        raise FileExistsError(f"{run_dir} already holds a run with another config (config.yaml); "
                              "choose another "
                              "hydra.run.dir")
    found = latest_checkpoint(run_dir)
    return ResumeDecision(found[0], found[1], True) if found else ResumeDecision(None, 0, True)


def set_aside_metrics(run_dir: Path, keep_through_step: int | None) -> None:
    """Move an unfinished attempt's metrics.jsonl to metrics.attempt-<n>.jsonl; when resuming, start
    the new metrics.jsonl with the records up to the checkpoint's step (the evaluation before
    training included)."""
    path = Path(run_dir) / "metrics.jsonl"
    n = 1
    while (aside := path.with_name(f"metrics.attempt-{n}.jsonl")).exists():
        n += 1
    os.rename(path, aside)
    if keep_through_step is None:
        return
    records = [(line, json.loads(line)) for line in aside.read_text().splitlines() if line.strip()]
    kept = [line for line, r in records if r.get("step", 0) <= keep_through_step
            and r.get("when") != "after"]
    write_atomic(path, "".join(line + "\n" for line in kept))


@dataclass
class OpenRun:
    """What the loop gets from ``run_directory``."""

    dir: Path
    logger: RunLogger
    resume: ResumeDecision
    wandb_run: Any = None


def agreed_run_dir(run_dir: Path, dist: DistInfo) -> Path:
    """Rank 0's run directory, for every rank. Each process resolves ``hydra.run.dir`` itself, and
    the default holds the time to the microsecond: under torchrun or srun (without submitit) the
    ranks would otherwise write checkpoints into different folders and, on a restart, some would
    resume while others start over."""
    if dist.world_size == 1:
        return run_dir
    chosen = [str(run_dir)]
    tdist.broadcast_object_list(chosen, src=0, device=dist.device)
    if chosen[0] != str(run_dir):
        print(f"rank {dist.rank}: the run directory is rank 0's, {chosen[0]} (this process "
              f"resolved hydra.run.dir to {run_dir})", flush=True)
        with contextlib.suppress(OSError):  # what Hydra wrote there before training started
            shutil.rmtree(run_dir / ".hydra")
            for log in run_dir.glob("*.log"):
                log.unlink()
            run_dir.rmdir()
    return Path(chosen[0])


def barrier_of(dist: DistInfo):
    return tdist.barrier if dist.world_size > 1 else (lambda: None)


def checked_config(cfg: DictConfig, run_dir: Path, dist: DistInfo) -> None:
    """The config's checks (``tip.config``); a refused config marks a new run directory failed with
    the message, so a sweep's report shows the cell and why."""
    try:
        apply_cell(cfg)
        check_config(cfg)
        # refuses a world size the step's prompts do not divide over
        RunSizes.of(cfg, dist.world_size)
    except ConfigError as exc:
        fresh = not (run_dir / "metrics.jsonl").exists() and read_status(run_dir) is None
        if dist.is_main and fresh:
            run_dir.mkdir(parents=True, exist_ok=True)
            failure_status(run_dir, exc)
        raise


def start_attempt(cfg: DictConfig, run_dir: Path, dist: DistInfo) -> ResumeDecision:
    """Decide (every rank reads before rank 0 changes anything), then set the directory up for this
    attempt."""
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    resume = decide_resume(run_dir, config_text)
    barrier_of(dist)()
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume.prior_attempt:
            set_aside_metrics(run_dir, resume.step if resume.checkpoint else None)
        set_aside_failures(run_dir)  # an earlier attempt's rank failures are not this attempt's
        (run_dir / "config.yaml").write_text(config_text)
        write_status(run_dir, "running")
    barrier_of(dist)()
    return resume


@contextlib.contextmanager
def run_directory(cfg: DictConfig, run_dir: Path, dist: DistInfo):
    """The run directory of one attempt, from the config's checks to ``status.json``'s last word:
    completed, interrupted (SIGTERM, Ctrl-C) or failed (every rank records its own failure)."""
    run_dir = agreed_run_dir(Path(run_dir), dist)
    if dist.world_size > 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # A launcher stops the other ranks with SIGTERM when one fails: end through the except
        # clause below (or, while blocked in a collective, through rank 0's watch thread)
        # instead of dying unrecorded.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    checked_config(cfg, run_dir, dist)
    resume = start_attempt(cfg, run_dir, dist)
    wandb_run = logger = None
    stop_watch = lambda: None  # noqa: E731
    try:
        wandb_run = start_run(cfg, run_dir) if dist.is_main else None
        logger = RunLogger(run_dir, dist.is_main, cfg.logger.print_quadrants, wandb_run)
        if dist.is_main and dist.world_size > 1:
            stop_watch = watch_peer_failures(run_dir, dist.rank,
                                             lambda record: end_after_peer_failure(
                record, wandb_run, logger))
        yield OpenRun(run_dir, logger, resume, wandb_run)
        if wandb_run is not None and cfg.train.token_log_every:
            from tip.microscope import log_to_wandb  # (the page's plots need matplotlib, an extra)

            log_to_wandb(wandb_run, run_dir)
        if dist.is_main:
            write_status(run_dir, "completed")
    except BaseException as exc:
        stop_watch()
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):  # preempted (SLURM) or stopped
            if dist.is_main and first_rank_failure(run_dir) is None:
                write_status(run_dir, "interrupted")
        else:  # every rank records its own failure, tagged with its rank
            record_rank_failure(run_dir, dist.rank, exc)
        if wandb_run is not None:  # a failed cell still ends its W&B run, marked failed
            wandb_run.finish(exit_code=1)
            wandb_run = None
        raise
    finally:
        stop_watch()
        if logger is not None:
            logger.close()
        if wandb_run is not None:
            wandb_run.finish()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def end_after_peer_failure(record: dict, wandb_run, logger) -> None:
    """Rank 0, from the watch thread, once another rank has failed (its record already marks the run
    failed): finish the W&B run as failed and end the process, instead of waiting in a collective
    for the process-group timeout."""
    print(f"rank {record.get('rank')} failed: {record.get('error')}; ending rank 0",
          file=sys.stderr, flush=True)
    try:
        logger.close()
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
    finally:
        os._exit(1)
