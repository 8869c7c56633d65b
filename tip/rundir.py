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
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as tdist
import yaml
from omegaconf import DictConfig, OmegaConf

from tip.checkpoint import latest_checkpoint, write_atomic
from tip.config import apply_cell, check_config, check_overrides, check_runnable
from tip.distributed import DistInfo, prepare_process_env
from tip.errors import UserError
from tip.parts import RunSizes
from tip.runlog import RunLogger, console_log
from tip.runstatus import (
    failure_status,
    first_rank_failure,
    read_status,
    record_rank_failure,
    set_aside_failures,
    watch_peer_failures,
    write_status,
    write_status_record,
)
from tip.wandb_logging import start_run


class RunDirError(UserError, FileExistsError):
    """A run directory that this attempt may not use (finished, another config, in use)."""


@dataclass(frozen=True)
class ResumeDecision:
    """What a run directory asks of a new attempt: ``checkpoint`` to resume from (None: start from
    step 0)."""
    checkpoint: Path | None
    step: int
    prior_attempt: bool  # metrics of an unfinished attempt are there (kept aside, never deleted)


def refuse_finished(run_dir: Path) -> None:
    """A finished run is never touched again: refused before anything is written there."""
    status = read_status(run_dir)
    if status and status.get("status") == "completed":
        raise RunDirError(f"{run_dir} already holds a finished run (status.json); start a new "
                          f"run beside it, e.g. hydra.run.dir={fresh_dir_beside(run_dir)}")


def fresh_dir_beside(run_dir: Path) -> Path:
    """``<run>-2`` (or the first free ``<run>-<n>``): where a new run goes without touching the
    old one."""
    n = 2
    while (candidate := run_dir.with_name(f"{run_dir.name}-{n}")).exists():
        n += 1
    return candidate


RUN_INDEPENDENT = ("data_root", "logger", "dist_timeout_s", "probe", "train.checkpoint_every",
                   "train.max_checkpoints", "rollout.vllm_python")
"""Keys that do not change what a run computes (where files are read from, where metrics go, how
often to checkpoint, the vLLM interpreter), so a resume may differ in them. ``data_root`` itself is
not compared: the data paths it resolves to are."""


_ABSENT = object()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(old_text: str, new_text: str) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key that changes the run."""
    old, new = _flat(yaml.safe_load(old_text) or {}), _flat(yaml.safe_load(new_text) or {})
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)
            and not any(k == i or k.startswith(i + ".") for i in RUN_INDEPENDENT)]


def decide_resume(run_dir: Path, config_text: str) -> ResumeDecision:
    """Read-only: every rank calls it before rank 0 changes anything. Refuses a finished run and a
    directory that holds a run with another config (naming the keys that differ); otherwise
    resumes from the last checkpoint, or restarts an unfinished attempt that left none."""
    run_dir = Path(run_dir)
    refuse_finished(run_dir)
    has_metrics = (run_dir / "metrics.jsonl").exists()
    if not has_metrics:
        return ResumeDecision(None, 0, False)
    saved = run_dir / "config.yaml"
    differences = config_differences(saved.read_text(), config_text) if saved.is_file() else None
    if differences is None or differences:
        if differences is None:
            what = "no config.yaml"
        else:
            what = "; ".join(f"{k}: {_shown(a)} there, {_shown(b)} now" for k, a, b in differences)
        resume = " ".join(f"{k}={_shown(a)}" for k, a, _ in differences or [])
        raise RunDirError(f"{run_dir} holds an unfinished run with another config ({what}). "
                          + (f"To resume it, rerun with its values ({resume}); " if resume else "")
                          + "to start afresh without touching it, "
                            f"hydra.run.dir={fresh_dir_beside(run_dir)}")
    found = latest_checkpoint(run_dir)
    return ResumeDecision(found[0], found[1], True) if found else ResumeDecision(None, 0, True)


def _shown(value: Any) -> str:
    """A value as an override writes it."""
    if value is _ABSENT:
        return "(absent)"
    return json.dumps(value) if isinstance(value, (list, dict, bool, type(None))) else str(value)


def set_aside_metrics(run_dir: Path, keep_through_step: int | None) -> int:
    """Move an unfinished attempt's metrics.jsonl to metrics.attempt-<n>.jsonl; when resuming, start
    the new metrics.jsonl with the records up to the checkpoint's step (the evaluation before
    training included). Returns n, the attempts set aside so far."""
    path = Path(run_dir) / "metrics.jsonl"
    n = 1
    while (aside := path.with_name(f"metrics.attempt-{n}.jsonl")).exists():
        n += 1
    os.rename(path, aside)
    if keep_through_step is None:
        return n
    kept = []
    for line in aside.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if record.get("step", 0) <= keep_through_step and record.get("when") != "after":
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))
    return n


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
        # what Hydra made there before training started (the folder; .hydra and a log when its
        # own writing is on); a folder holding anything else is left as it is
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        for log in run_dir.glob("*.log"):
            log.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()
    return Path(chosen[0])


def barrier_of(dist: DistInfo):
    return tdist.barrier if dist.world_size > 1 else (lambda: None)


def checked_config(cfg: DictConfig, run_dir: Path, overrides=()) -> None:
    """The config's checks (``tip.config``), before the process group, DeepSpeed's op build and
    any model: the overrides, the values, the world size, what this machine must have. A refused
    config marks a new run directory failed with the message, so a sweep's report shows the cell
    and why; an existing run's files are never touched."""
    prepare_process_env()  # RANK and WORLD_SIZE, from the launcher or for one process
    try:
        check_overrides(cfg, overrides)
        apply_cell(cfg)
        check_config(cfg)
        # refuses a world size the step's prompts do not divide over
        RunSizes.of(cfg, int(os.environ["WORLD_SIZE"]))
        check_runnable(cfg)
    except UserError as exc:
        fresh = not run_dir.exists() or not any(run_dir.iterdir())
        if os.environ["RANK"] == "0" and fresh:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_hydra_record(run_dir)  # a sweep's report names the refused cell
            failure_status(run_dir, exc)
        raise


def start_attempt(cfg: DictConfig, run_dir: Path, dist: DistInfo) -> ResumeDecision:
    """Decide (every rank reads before rank 0 changes anything), then set the directory up for this
    attempt: earlier attempts' logs set aside, the config, Hydra's record, ``status.json``."""
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    resume = decide_resume(run_dir, config_text)
    barrier_of(dist)()
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        attempt = 1
        if resume.prior_attempt:
            attempt = set_aside_metrics(run_dir, resume.step if resume.checkpoint else None) + 1
        set_aside_failures(run_dir)  # an earlier attempt's rank failures are not this attempt's
        (run_dir / "config.yaml").write_text(config_text)
        write_hydra_record(run_dir)
        # a new attempt's own keys, not the last attempt's
        write_status_record(run_dir, {"status": "running", "attempt": attempt,
                                       **({"resumed_from_step": resume.step}
                                          if resume.checkpoint else {})})
    barrier_of(dist)()
    return resume


def write_hydra_record(run_dir: Path) -> None:
    """``.hydra/overrides.yaml`` and ``.hydra/hydra.yaml``, as Hydra would write them, but only
    once the attempt is accepted (``hydra.output_subdir`` is null: Hydra itself would rewrite them
    before any check, even in a finished run's directory)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = Path(run_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))
    write_atomic(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))


LOCK_FILE = ".tip-run.lock"


def lock_run_dir(run_dir: Path):
    """Hold an advisory lock on the run directory for the process's life (rank 0): a second launch
    into a live run is refused at once, naming the holder. The kernel drops a flock when its holder
    dies, so a killed run never leaves a lock that blocks its resume. Returns the open lock file
    (closing it releases the lock). Where the file system has no flock, the run goes on unlocked,
    with a warning."""
    import errno
    import fcntl
    import socket

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handle = open(Path(run_dir) / LOCK_FILE, "a+")  # never truncated before the lock is ours
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirError(f"{run_dir} is in use by a run that is still going ({holder}): one run "
                          "per directory; wait for it, stop it, or start a new run elsewhere "
                          f"(hydra.run.dir={fresh_dir_beside(Path(run_dir))})") from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"warning: {run_dir}'s file system has no file locks ({err.strerror}): nothing "
              "stops a second run from starting in this directory", file=sys.stderr, flush=True)
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()} pid {os.getpid()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def take_run_dir(cfg: DictConfig, run_dir: Path, dist: DistInfo):
    """Refuse a finished run or one of another config before anything is written there (not even
    a lock file), then take the directory's lock on rank 0; every rank learns rank 0's outcome.
    Returns the lock (None on other ranks). ``start_attempt`` decides again under the lock."""
    decide_resume(run_dir, OmegaConf.to_yaml(cfg, resolve=True))
    lock, refusal = None, [""]
    if dist.is_main:
        try:
            lock = lock_run_dir(run_dir)
        except RunDirError as err:
            refusal = [str(err)]
    if dist.world_size > 1:
        tdist.broadcast_object_list(refusal, src=0, device=dist.device)
    if refusal[0]:
        raise RunDirError(refusal[0])
    return lock


@contextlib.contextmanager
def run_directory(cfg: DictConfig, run_dir: Path, dist: DistInfo):
    """The run directory of one attempt, from its lock to ``status.json``'s last word: completed,
    interrupted (SIGTERM, Ctrl-C) or failed (every rank records its own failure). The config was
    checked before (``checked_config``)."""
    run_dir = agreed_run_dir(Path(run_dir), dist)
    handle_sigterm = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL \
        and threading.current_thread() is threading.main_thread()
    if handle_sigterm:
        # A launcher stops the ranks with SIGTERM (scancel, a failed rank, a time limit): end
        # through the except clause below (or, while blocked in a collective, through rank 0's
        # watch thread) instead of dying unrecorded. submitit installs its own handler.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    lock = wandb_run = logger = None
    stop_watch = lambda: None  # noqa: E731
    try:
        lock = take_run_dir(cfg, run_dir, dist)
        resume = start_attempt(cfg, run_dir, dist)
        with console_log(run_dir, dist.is_main) as log:
            try:
                wandb_run = start_run(cfg, run_dir) if dist.is_main else None
                logger = RunLogger(run_dir, dist.is_main, cfg.logger.print_quadrants, wandb_run)
                if dist.is_main and dist.world_size > 1:
                    stop_watch = watch_peer_failures(run_dir, dist.rank,
                                                     lambda record: end_after_peer_failure(
                        record, wandb_run, logger))
                yield OpenRun(run_dir, logger, resume, wandb_run)
                if wandb_run is not None and cfg.train.token_log_every:
                    from tip.microscope import log_to_wandb  # (its plots need matplotlib)

                    log_to_wandb(wandb_run, run_dir)
                if dist.is_main:
                    write_status(run_dir, "completed")
            except BaseException as exc:
                stop_watch()
                if log is not None:  # the whole trace, where the console gets one line
                    traceback.print_exception(type(exc), exc, exc.__traceback__, file=log)
                if isinstance(exc, (SystemExit, KeyboardInterrupt)):  # preempted or stopped
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
        if lock is not None:
            lock.close()
        if handle_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
