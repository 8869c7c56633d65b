"""Run logging: metrics.jsonl (always), a printed step line and quadrant table, optional W&B, and
rank 0's console kept in ``<run>/train.log``."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tip.taxonomy import QUADRANT_NAMES, QUADRANTS


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on GPU, peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


STEP_PHASES = ("rollout_s", "scoring_s", "selection_s", "gradient_s", "optimizer_s",
               "weight_sync_s")


def throughput_line(record: dict[str, Any]) -> str:
    """Where a step's time went, and how fast tokens were generated and trained (rank 0's clock)."""
    phases = "  ".join(f"{p[:-2]} {record[p]:.2f}s" for p in STEP_PHASES
                       if record.get(p) is not None)
    return (f"      time: {phases}  |  rollout {record.get('rollout_tokens_per_s', 0):.0f} tok/s, "
            f"trained {record.get('trained_tokens_per_s', 0):.0f} kept tok/s")


def episode_line(record: dict[str, Any]) -> str:
    """What the step's episodes did (means per episode over every rank's)."""
    return (f"      episodes: score {record['episode/score']:.3f}  turns "
            f"{record['episode/turns']:.2f}  tool calls {record['episode/tool_calls']:.2f} "
            f"(malformed {record['episode/malformed_calls']:.2f})  at turn limit "
            f"{record['episode/hit_turn_limit']:.3f}  environment tokens "
            f"{record['episode/env_token_frac']:.3f}")


def quadrant_table(stats: dict[str, float]) -> str:
    """Printable per-quadrant table: token share, mean h, mean delta, fraction kept, share of the
    kept."""
    lines = ["      frac     mean_h  mean_delta   kept  of_kept"]
    for q in QUADRANTS:
        lines.append(f"  {q.upper()}  {stats[f'{q}/frac']:5.3f}  {stats[f'{q}/mean_h']:9.3g}  "
                     f"{stats[f'{q}/mean_delta']:10.3g}  {stats[f'{q}/kept']:5.3f}  "
                     f"{stats[f'{q}/of_kept']:7.3f}   {q.upper()} {QUADRANT_NAMES[q]}")
    return "\n".join(lines)


class RunLogger:
    """Writes one JSON object per line to ``metrics.jsonl``; only the main rank writes or prints."""

    def __init__(self, run_dir: Path, enabled: bool, print_quadrants: bool = True, wandb_run=None):
        self.enabled = enabled
        self.print_quadrants = print_quadrants
        self.wandb_run = wandb_run
        self.path = Path(run_dir) / "metrics.jsonl"
        self._fh = self.path.open("a", encoding="utf-8") if enabled else None
        self.t0 = time.time()

    def log(self, record: dict[str, Any], quiet: bool = False) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in record.items()}
        record.setdefault("time_s", round(time.time() - self.t0, 3))
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.wandb_run is not None:
            step = record.get("step")
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                               step=step)
        if not quiet and record.get("kind") == "train":
            print(f"step {record['step']:4d}  loss {record['loss']:.4f}  kept "
                  f"{record['kept_frac']:.3f}  h {record['mean_h']:.3g}  delta "
                  f"{record['mean_delta']:.3g}  {record['tokens_per_s']:.0f} tok/s  peak "
                  f"{record['peak_mem_mb']:.0f} MB",
                  flush=True)
            print(throughput_line(record), flush=True)
            if "episode/turns" in record:  # multi-turn rollouts (tip.env)
                print(episode_line(record), flush=True)
            if self.print_quadrants:
                print(quadrant_table(record), flush=True)

    def close(self) -> None:
        if self._fh:
            self._fh.close()


class _Tee:
    """A text stream that writes to the console and to the run's log."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        with contextlib.suppress(ValueError):  # the log closed at the run's end
            self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        with contextlib.suppress(ValueError):
            self.log.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ... of the console
        return getattr(self.stream, name)


@contextlib.contextmanager
def console_log(run_dir: Path, is_main: bool):
    """Rank 0's console (stdout, stderr, the logging module's console handlers) also goes to
    ``<run>/train.log``, appended attempt after attempt; yields the log file (None on other
    ranks), where a failure's full traceback is written while the console gets one line."""
    if not is_main:
        yield None
        return
    import logging

    log = open(Path(run_dir) / "train.log", "a", encoding="utf-8", buffering=1)
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} attempt of "
              f"{' '.join(sys.argv[1:]) or 'the default'}\n")
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(saved[0], log), _Tee(saved[1], log)
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and h.stream in saved]
    for h in handlers:
        h.setStream(sys.stdout if h.stream is saved[0] else sys.stderr)
    try:
        yield log
    finally:
        for h in handlers:
            h.setStream(saved[0] if h.stream is sys.stdout else saved[1])
        sys.stdout, sys.stderr = saved
        log.close()
