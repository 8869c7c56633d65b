"""The training step's own time at two checkouts of tip, per selector and divergence:
``python bench/step_ab.py <old checkout> <new checkout> [repeats]`` (e.g. ``git worktree add ../old <commit>``).

Each case runs the default training (embedded pair, 5 steps, no evaluation before, 8 held-out problems after) in
a fresh process at each checkout, one after the other, ``repeats`` times (default 3), and takes the median over
steps 2-5 of scoring + selection + gradient + optimizer seconds (metrics.jsonl), then the median over repeats;
rollouts and evaluation are left out.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PY = sys.executable
CASES = [(s, "reverse_kl") for s in ("all", "random", "entropy_sample", "entropy_topk", "div_topk", "q3", "soft_or",
                                     "soft_or_bottom", "q1", "q2", "q4")] + [("soft_or", "forward_kl"),
                                                                           ("soft_or", "jsd")]
PHASES = ("scoring_s", "selection_s", "gradient_s", "optimizer_s")


def step_time(repo, selector, divergence):
    out = Path(tempfile.mkdtemp(prefix="ab-"))
    cmd = [PY, "-m", "tip.train", f"selector={selector}", f"divergence={divergence}", "train.steps=5",
           "train.eval_before=false", "train.save_final=false", "eval.benchmarks.embedded.source.size=8",
           f"hydra.run.dir={out}"]
    subprocess.run(cmd, cwd=repo, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": repo, "DS_ACCELERATOR": "cpu"})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "train"][1:]
    return statistics.median(sum(r.get(p, 0.0) for p in PHASES) for r in rows)


if __name__ == "__main__":
    old_repo, new_repo = sys.argv[1], sys.argv[2]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    print(f"{'selector':<16}{'divergence':<12}{'old s':>8}{'new s':>8}{'new/old':>9}   (median of {repeats})",
          flush=True)
    for selector, divergence in CASES:
        runs = [(step_time(old_repo, selector, divergence), step_time(new_repo, selector, divergence))
                for _ in range(repeats)]
        old, new = (statistics.median(r[i] for r in runs) for i in (0, 1))
        print(f"{selector:<16}{divergence:<12}{old:8.3f}{new:8.3f}{new / old:8.2f}x", flush=True)
