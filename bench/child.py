"""What the benchmarks share: run one measurement in a fresh process and read the JSON line it prints last."""

from __future__ import annotations

import json
import os
import subprocess


def child_json(cmd: list[str], what: str, cwd=None, env: dict | None = None) -> dict:
    """Run ``cmd`` (DeepSpeed on the CPU unless DS_ACCELERATOR says otherwise) and return the JSON object of its last
    stdout line; on failure stop with ``what`` and the end of its stderr (library warnings left out)."""
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), **(env or {})}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if out.returncode:
        lines = [ln for ln in out.stderr.splitlines() if "Warning" not in ln and "return func" not in ln]
        raise SystemExit(f"{what} failed (exit {out.returncode}):\n" + "\n".join(lines[-25:]))
    return json.loads(out.stdout.strip().splitlines()[-1])
