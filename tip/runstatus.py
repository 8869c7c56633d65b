"""A run's status and failure records: ``status.json`` (what the run is doing, each attempt's
number) and one file per failed rank under ``failures/`` (so the other ranks end at once)."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

from tip.checkpoint import write_atomic

STATUS_FILE = "status.json"


ATTEMPT_KEYS = ("attempt", "resumed_from_step")
"""What ``status.json`` keeps through an attempt: its number, and the step it resumed from."""


def write_status(run_dir: Path, status: str, **extra) -> None:
    """``running`` | ``completed`` | ``interrupted`` | ``failed`` (with the error), read by
    ``tip.report``; the attempt's number and resume step stay (``start_attempt`` sets them)."""
    kept = {k: v for k, v in (read_status(run_dir) or {}).items() if k in ATTEMPT_KEYS}
    write_status_record(run_dir, {"status": status, **kept, **extra})


def write_status_record(run_dir: Path, record: dict) -> None:
    write_atomic(Path(run_dir) / STATUS_FILE, json.dumps(record, indent=1) + "\n")


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
