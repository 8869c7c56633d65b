"""Atomic writes and DeepSpeed training checkpoints that survive preemption. (The run directory's
status, failure records and the decision to resume live in ``tip.rundir``.)

A checkpoint is written under a temporary name by every rank (DeepSpeed's collective save), then
renamed into place by rank 0, and only then is ``checkpoints/latest`` pointed at it and older ones
pruned: at every moment the directory holds at least one complete checkpoint. A requeued SLURM job
(same directory, same config) resumes from it; a finished run is never touched again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CKPT_DIR = "checkpoints"
DS_TAG = "state"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) under a temporary name beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_dir(final: Path, write, replace: bool = False) -> Path:
    """Write a directory under a temporary name beside ``final``, then rename it into place: a crash
    never leaves a half-written one. An existing ``final`` is refused (finished work is not
    overwritten), unless ``replace`` (a rebuild of something derived, like the embedded pair)."""
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


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    pointer = Path(run_dir) / CKPT_DIR / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return (path, int(path.name.split("_")[1])) if path.is_dir() else None


def save_training_checkpoint(engine, run_dir: Path, step: int, client_state: dict, is_main: bool,
                             retain: int, barrier) -> Path:
    """Every rank calls this (DeepSpeed's save is collective). The optimizer, scheduler and ZeRO
    partitions go into ``checkpoints/step_<n>``; ``latest`` moves only once that directory is
    complete."""
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
    """Restore weights, optimizer and scheduler in place; returns the client state saved with
    them."""
    loaded, client_state = engine.load_checkpoint(str(path), tag=DS_TAG)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    return client_state or {}
