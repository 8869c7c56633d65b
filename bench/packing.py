"""Packed vs padded micro-batches (``train.packing``): one training step on rollouts of long-tailed lengths.

    python bench/packing.py [--repeats 3] [--rollouts 16] [--cap 1024] [extra tip.train overrides ...]

Each repeat runs both arrangements side by side, each in a fresh process: the embedded pair (ZeRO-3, one process),
the same rollouts (the training prompts followed by responses of lognormal lengths, median ~1/8 of the cap, a few
at the cap, as OPD rollouts are: most answers short, a tail of long ones), one warm-up step, then three timed
``opd_step`` calls. It prints the median over repeats of each arrangement's valid tokens per second of step time
(scoring, selection, gradient and optimizer) and of the step's peak resident memory above the memory before the
steps (Linux VmHWM over the four steps, reset through /proc/self/clear_refs, less the resident memory before
them), and the packed/padded ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from child import child_json

ROOT = Path(__file__).resolve().parents[1]


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def one_arrangement(packing: bool, rollouts: int, cap: int, overrides: list[str]) -> dict:
    """In this process: set up, build the long-tailed rollouts, time the steps."""
    import torch
    from hydra import compose, initialize_config_dir

    from tip.config import CONF_DIR
    from tip.distributed import init_distributed
    from tip.engine import release_engines
    from tip.parts import build_parts, rank_prompts
    from tip.rollout import pack
    from tip.step import StepInputs, opd_step

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "logger=none", f"train.prompts_per_step={rollouts}",
                                           "rollout.n=1", f"train.micro_batch_size={rollouts}",
                                           f"train.packing={str(packing).lower()}", *overrides])
    dist = init_distributed()
    run = build_parts(cfg, dist, Path(os.environ.get("TMPDIR", "/tmp")))
    share = rank_prompts(cfg, run.train_examples, run.tokenizer, 0, dist)
    gen = torch.Generator().manual_seed(0)
    vocab = len(run.tokenizer)
    responses = []
    for p in share.prompt_ids:
        length = int(torch.empty(1).log_normal_(0.0, 1.0, generator=gen).item() * cap / 8)
        length = max(4, min(cap - len(p), length))
        responses.append(torch.randint(3, vocab, (length,), generator=gen).tolist())
    batch = pack(share.prompt_ids, responses, list(range(len(responses))), run.tokenizer.pad_token_id)
    valid = int(batch.response_mask.sum())
    times = []
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = status_kb("VmRSS")
    for i in range(4):
        t0 = time.perf_counter()
        opd_step(run.step, run.engine, run.teacher, StepInputs(batch, cfg.keep, torch.Generator().manual_seed(i)), dist)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    peak_kb = status_kb("VmHWM") - before
    release_engines(run.engine, run.teacher)
    lengths = batch.attention_mask.sum(-1)
    return {"tokens_per_s": valid / statistics.median(times), "peak_mb": peak_kb / 1024,
            "valid": valid, "padded": int(batch.attention_mask.numel()), "longest": int(lengths.max()),
            "median_length": float(lengths.float().median())}


def run_child(packing: bool, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(int(packing)), "--rollouts", str(args.rollouts), "--cap",
           str(args.cap), *args.overrides]
    return child_json(cmd, f"the {'packed' if packing else 'padded'} step", cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--cap", type=int, default=1024, help="longest prompt + response, in tokens")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(one_arrangement(bool(args.child), args.rollouts, args.cap, args.overrides)))
        return
    runs = [(run_child(False, args), run_child(True, args)) for _ in range(args.repeats)]
    first = runs[0][0]
    print(f"{args.rollouts} rollouts, longest {first['longest']} tokens, median {first['median_length']:.0f}; "
          f"{first['valid']} response tokens in {first['padded']} padded positions "
          f"(padding and prompts: {first['padded'] / first['valid']:.1f}x the response tokens)")
    for key, unit in (("tokens_per_s", "response tokens / s of step"), ("peak_mb", "peak MB above the start")):
        padded, packed = (statistics.median(r[i][key] for r in runs) for i in (0, 1))
        print(f"{unit:<32} padded {padded:10.1f}   packed {packed:10.1f}   packed/padded {packed / padded:5.2f}x"
              f"   (median of {args.repeats})")


if __name__ == "__main__":
    main()
