"""Paths and the compose helper the tests share (imported as a module; pytest fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hydra import compose, initialize_config_dir

from tip.config import CONF_DIR as _CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(_CONF_DIR)
DATA_ROOT = Path(os.environ.get("TIP_DATA_ROOT", ROOT.parent / "shared" / "data")).resolve()


def compose_config(*overrides: str):
    """The training config as `python -m tip.train <overrides>` composes it (data_root: the shared data)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"data_root={DATA_ROOT}", *overrides])


def read_metrics(run_dir: Path, kind: str) -> list[dict]:
    """The records of one kind (train, eval, skipped, ...) of a run's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def torchrun(nproc: int, *args: str, timeout: int = 600):
    """``torchrun --nproc_per_node <nproc> <args>`` from the checkout, on a free port: gloo processes
    standing in for GPUs, one thread each, no launcher variables inherited."""
    import socket
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(var, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run([str(bin_dir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
                           str(port), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
