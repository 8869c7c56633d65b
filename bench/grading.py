"""Grading throughput: 500 MATH-500 style completions graded with math-verify in parallel worker processes.

    python bench/grading.py [--workers 2] [--items 500]

Prints items/s for 1 worker and for --workers, and the ratio. Completions are the MATH-500 reference solutions
with a perturbed final answer on every other item, so both verdicts and the symbolic path are exercised.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from tip.grading import grade_many


def completions(data_root: Path, items: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (data_root / "math500.jsonl").read_text().splitlines()]
    out = []
    for i in range(items):
        row = rows[i % len(rows)]
        text = row["solution"]
        if i % 2:  # a wrong final answer: the grader has to go past the string match
            text = re.sub(r"\\boxed\{", r"\\boxed{2\\cdot ", text)
        out.append((text, row["answer"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("TIP_DATA_ROOT", "../shared/data")))
    args = ap.parse_args()
    items = completions(args.data_root, args.items)
    rates = {}
    for workers in sorted({1, args.workers}):
        t0 = time.perf_counter()
        grades = grade_many(items, workers=workers)
        dt = time.perf_counter() - t0
        rates[workers] = len(items) / dt
        print(f"workers={workers}: {len(items)} items in {dt:.2f} s = {rates[workers]:.1f} items/s "
              f"({sum(g.correct for g in grades)} correct)")
    if len(rates) > 1:
        print(f"speed-up with {args.workers} workers: {rates[args.workers] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
