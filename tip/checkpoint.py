"""Run directories that survive preemption: a status file, atomic DeepSpeed training checkpoints, and the decision
to resume, restart or refuse when a run directory already holds something.

A checkpoint is written under a temporary name by every rank (DeepSpeed's collective save), then renamed into
place by rank 0, and only then is ``checkpoints/latest`` pointed at it and older ones pruned: at every moment the
directory holds at least one complete checkpoint. A requeued SLURM job (same directory, same config) resumes from
it; a finished run is never touched again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

STATUS_FILE = "status.json"
CKPT_DIR = "checkpoints"
DS_TAG = "state"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) under a temporary name beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_dir(final: Path, write, replace: bool = False) -> Path:
    """Write a directory under a temporary name beside ``final``, then rename it into place: a crash never leaves
    a half-written one. An existing ``final`` is refused (finished work is not overwritten), unless ``replace``
    (a rebuild of something derived, like the embedded pair)."""
    final = Path(final)
    if final.exists() and not replace:
        raise FileExistsError(f"refusing to overwrite {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_status(run_dir: Path, status: str, **extra) -> None:
    """``running`` | ``completed`` | ``failed`` (with the error), read by ``tip.report``."""
    write_atomic(Path(run_dir) / STATUS_FILE, json.dumps({"status": status, **extra}, indent=1) + "\n")


FAILURES_DIR = "failures"


def _failure_record(exc: BaseException, rank: int | None) -> dict:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"rank": rank, "error": f"{type(exc).__name__}: {exc}", "traceback": "".join(lines[-20:])}


def failure_status(run_dir: Path, exc: BaseException, rank: int | None = None) -> None:
    """Mark the run failed with ``exc`` (raised on ``rank``). Another rank's failure recorded earlier stays the
    stated cause: a rank blocked in a collective by it fails only as a consequence."""
    record = _failure_record(exc, rank)
    first = first_rank_failure(run_dir)
    if first is not None and first.get("rank") != rank:
        write_status(run_dir, "failed", **first, also=record["error"])
    else:
        write_status(run_dir, "failed", **record)


def record_rank_failure(run_dir: Path, rank: int, exc: BaseException) -> None:
    """Any rank: ``failures/rank<r>.json`` with the error, and the run's status marked failed at once (rank 0
    may be stuck in a collective waiting for this rank, and never get to write it)."""
    folder = Path(run_dir) / FAILURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"rank{rank}.json", json.dumps(_failure_record(exc, rank), indent=1) + "\n")
    failure_status(run_dir, exc, rank)


def set_aside_failures(run_dir: Path) -> None:
    """Move an earlier attempt's ``failures/`` to ``failures.attempt-<n>/`` (kept, never deleted)."""
    folder = Path(run_dir) / FAILURES_DIR
    if not folder.is_dir():
        return
    n = 1
    while (aside := folder.with_name(f"{FAILURES_DIR}.attempt-{n}")).exists():
        n += 1
    os.rename(folder, aside)


def watch_peer_failures(run_dir: Path, own_rank: int, on_failure, poll_s: float = 1.0):
    """A daemon thread that waits for another rank's failure record and then calls ``on_failure(record)``.
    Rank 0 runs it: when another rank fails, rank 0 is usually blocked inside a collective that will only return
    at the process-group timeout (or never, if the launcher kills it first), so the thread finishes the run's
    bookkeeping (W&B run) and ends the process. Returns a function that stops the watch."""
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
    return sorted((Path(run_dir) / FAILURES_DIR).glob("rank*.json"), key=lambda f: f.stat().st_mtime)


def first_rank_failure(run_dir: Path) -> dict | None:
    """The earliest recorded failure of any rank, or None."""
    files = _failure_files(run_dir)
    return json.loads(files[0].read_text()) if files else None


def read_status(run_dir: Path) -> dict | None:
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    pointer = Path(run_dir) / CKPT_DIR / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return (path, int(path.name.split("_")[1])) if path.is_dir() else None


@dataclass(frozen=True)
class Resume:
    """What a run directory asks of a new attempt: ``checkpoint`` to resume from (None: start from step 0)."""
    checkpoint: Path | None
    step: int
    prior_attempt: bool  # metrics of an unfinished attempt are there (kept aside, never deleted)


def plan_attempt(run_dir: Path, config_text: str) -> Resume:
    """Read-only: every rank calls it before rank 0 changes anything. Refuses a finished run and a directory that
    holds a run with another config; otherwise resumes from the last checkpoint, or restarts an unfinished attempt
    that left none."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status and status.get("status") == "completed":
        raise FileExistsError(f"{run_dir} already holds a finished run (status.json); choose another hydra.run.dir")
    has_metrics = (run_dir / "metrics.jsonl").exists()
    if not has_metrics:
        return Resume(None, 0, False)
    saved = run_dir / "config.yaml"
    if not saved.is_file() or saved.read_text() != config_text:
        raise FileExistsError(f"{run_dir} already holds a run with another config (config.yaml); choose another "
                              "hydra.run.dir")
    found = latest_checkpoint(run_dir)
    return Resume(found[0], found[1], True) if found else Resume(None, 0, True)


def set_aside_metrics(run_dir: Path, keep_through_step: int | None) -> None:
    """Move an unfinished attempt's metrics.jsonl to metrics.attempt-<n>.jsonl; when resuming, start the new
    metrics.jsonl with the records up to the checkpoint's step (the evaluation before training included)."""
    path = Path(run_dir) / "metrics.jsonl"
    n = 1
    while (aside := path.with_name(f"metrics.attempt-{n}.jsonl")).exists():
        n += 1
    os.rename(path, aside)
    if keep_through_step is None:
        return
    records = [(line, json.loads(line)) for line in aside.read_text().splitlines() if line.strip()]
    kept = [line for line, r in records if r.get("step", 0) <= keep_through_step and r.get("when") != "after"]
    write_atomic(path, "".join(line + "\n" for line in kept))


def save_training_checkpoint(engine, run_dir: Path, step: int, client_state: dict, is_main: bool, retain: int,
                             barrier) -> Path:
    """Every rank calls this (DeepSpeed's save is collective). The optimizer, scheduler and ZeRO partitions go
    into ``checkpoints/step_<n>``; ``latest`` moves only once that directory is complete."""
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale)
    barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state=client_state)
    barrier()
    if is_main:
        if final.exists():  # the same step saved by an attempt that died before moving "latest"
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_atomic(root / "latest", final.name)
        for old in sorted(root.glob("step_*"))[:-retain]:
            shutil.rmtree(old)
    barrier()
    return final


def load_training_checkpoint(engine, path: Path) -> dict:
    """Restore weights, optimizer and scheduler in place; returns the client state saved with them."""
    loaded, client_state = engine.load_checkpoint(str(path), tag=DS_TAG)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    return client_state or {}
