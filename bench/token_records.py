"""What token records cost: ``python bench/token_records.py [--repeats 3]``.

1. The smoke run (experiment=smoke, 8 steps) with ``train.token_log_every=1`` against 0, side by side: the
   median step time of each (steps 2-8; step 1 warms up), and the writing alone (``token_log_s``) as a share of
   the recorded step. The issue's target: writing < 5% of a step.
2. The file format: one step's records repeated to 200,000 rows with their numbers drawn afresh (repeated rows
   would flatter any compressor), written as Parquet (zstd, what tip writes) and as gzip-compressed JSONL: bytes
   per record, write and read time (medians).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOKE = ["experiment=smoke", "logger=none", "train.steps=8", "train.eval_before=false", "train.save_final=false",
         "eval.benchmarks.embedded.source.size=4"]


def smoke_steps(token_log_every: int, tmp: Path) -> tuple[list[dict], Path]:
    run = tmp / f"run_{token_log_every}_{time.monotonic_ns()}"
    subprocess.run([sys.executable, "-m", "tip.train", *SMOKE, f"train.token_log_every={token_log_every}",
                    f"hydra.run.dir={run}"], check=True, capture_output=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train" and r["step"] > 1], run


def overhead(repeats: int, tmp: Path) -> Path:
    """Prints the step times; returns a recorded run's directory."""
    step_s = {0: [], 1: []}
    write_share = []
    for _ in range(repeats):
        for every in (0, 1):
            rows, run = smoke_steps(every, tmp)
            step_s[every].append(statistics.median(r["step_s"] for r in rows))
            if every:
                write_share.append(statistics.median(r["token_log_s"] / r["step_s"] for r in rows))
                recorded = run
    off, on = statistics.median(step_s[0]), statistics.median(step_s[1])
    print(f"smoke run, median of {repeats} runs side by side (median step of steps 2-8 each):")
    print(f"  step without records {off * 1e3:.0f} ms, with records {on * 1e3:.0f} ms: {on / off:.2f}x")
    print(f"  writing the records alone: {100 * statistics.median(write_share):.1f}% of a recorded step")
    return recorded


def formats(run_dir: Path, repeats: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tip.token_records import read_token_records

    cols, _ = read_token_records(run_dir, 2)
    n = len(cols["h"])
    reps = 200_000 // n + 1
    big = {k: (v * reps)[:200_000] for k, v in cols.items()}
    # Repeated rows would flatter any compressor: the numbers get fresh values of the same kind (a few thousand
    # rollouts of 8-64 tokens, signals spread over decades as real ones are).
    rng = np.random.default_rng(0)
    big["rollout"] = (np.arange(200_000) // 40).tolist()
    big["position"] = (np.arange(200_000) % 40).tolist()
    for name in ("h", "h_hat", "d_hat", "score", "student_top_p", "teacher_top_p"):
        big[name] = rng.random(200_000).astype(np.float32).tolist()
    for name in ("delta", "delta_fwd"):
        big[name] = (10 ** rng.uniform(-6, 1, 200_000)).astype(np.float32).tolist()
    big["kept"] = (rng.random(200_000) < 0.3).tolist()
    big["quadrant"] = rng.integers(1, 5, 200_000).tolist()
    rows = [dict(zip(big, values)) for values in zip(*big.values())]
    with tempfile.TemporaryDirectory() as tmp:
        results = {"parquet (zstd)": [], "jsonl.gz": []}
        for _ in range(repeats):
            path = Path(tmp) / "r.parquet"
            t0 = time.perf_counter()
            pq.write_table(pa.table({**big, "prompt_text": pa.array(big["prompt_text"]).dictionary_encode()}), path,
                           compression="zstd")
            t1 = time.perf_counter()
            pq.read_table(path).to_pydict()
            t2 = time.perf_counter()
            results["parquet (zstd)"].append((path.stat().st_size, t1 - t0, t2 - t1))
            path = Path(tmp) / "r.jsonl.gz"
            t0 = time.perf_counter()
            with gzip.open(path, "wt") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            t1 = time.perf_counter()
            with gzip.open(path, "rt") as f:
                [json.loads(line) for line in f]
            t2 = time.perf_counter()
            results["jsonl.gz"].append((path.stat().st_size, t1 - t0, t2 - t1))
    print(f"\n200,000 records (the smoke run's {n} repeated, numbers drawn afresh), median of {repeats}:")
    print(f"  {'format':<16}{'bytes/record':>14}{'write s':>10}{'read s':>10}")
    for name, runs in results.items():
        size, write, read = (statistics.median(x[i] for x in runs) for i in range(3))
        print(f"  {name:<16}{size / 200_000:>14.1f}{write:>10.2f}{read:>10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = overhead(args.repeats, Path(tmp))
        formats(run, args.repeats)


if __name__ == "__main__":
    main()
