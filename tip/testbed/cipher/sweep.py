"""Testbed v2's sweep: every build's criteria, every cell, then the pre-registered decisions.

    python -m tip.testbed.cipher.sweep                       # sweeps/testbed_v2/grid.yaml
    python -m tip.testbed.cipher.sweep --out DIR --builds 0 --seeds 0 --cells all@1.0,q3@0.1

Writes ``<out>/cells.jsonl`` (one line per finished cell, appended as it finishes: a killed sweep
resumes where it stopped), ``<out>/builds.json`` (each build's signal criteria and label
precision/recall) and ``<out>/decisions.md`` (``tip.testbed.cipher.decide``). Default out:
``outputs/testbed_v2/<date_time>`` (never an existing directory's results).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch
import yaml

from tip.config import REPO_ROOT
from tip.config import parse_cell as parse_run_cell
from tip.engine import OPTIMIZERS
from tip.keep import validate_keep
from tip.selection import get_rule, select
from tip.signals import signals_from_logits
from tip.taxonomy import quadrant_labels, quantile
from tip.testbed.cipher.build import ERROR_KINDS, built
from tip.testbed.cipher.opd import BUDGET, Budget, Pair, heldout, sample_batch, train_cell

GRID = REPO_ROOT / "sweeps" / "testbed_v2" / "grid.yaml"
# The absolute quadrant thresholds (docs/testbed_v2.md): disagreeing where delta exceeds this many
# nats or the two models' most likely tokens differ; confident where h is below this percentile of
# the batch's.
ABSOLUTE_DELTA_NATS = 1.0
ABSOLUTE_ENTROPY_PERCENTILE = 1 / 3


def absolute_labels(signals, argmax_differs: torch.Tensor) -> torch.Tensor:
    """Quadrant labels (1..4, 0 invalid) by the absolute thresholds above."""
    mask = signals.mask
    h_cut = quantile(signals.entropy[mask].float(), ABSOLUTE_ENTROPY_PERCENTILE)
    confident = signals.entropy <= h_cut
    disagree = (signals.reverse_kl > ABSOLUTE_DELTA_NATS) | argmax_differs
    labels = torch.where(confident, torch.where(disagree, 3, 4), torch.where(disagree, 1, 2))
    return torch.where(mask, labels, 0)


def precision_recall(labelled: torch.Tensor, planted: torch.Tensor) -> dict[str, float]:
    hits = float((labelled & planted).sum())
    return {"precision": hits / max(1.0, float(labelled.sum())),
            "recall": hits / max(1.0, float(planted.sum()))}


@torch.no_grad()
def measure_build(pair: Pair, batches: int = 8, seed: int = 0, budget: Budget = BUDGET) -> dict:
    """On the untrained student's rollouts (a cell's batches): each kind's mean h and deltas against
    the entropy thirds, planted positions per rollout, the quadrant labels' precision and recall
    against the planted positions (median and absolute thresholds), and how much div_topk@0.1 and
    q3@0.1 keep in common."""
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    student = pair.fresh_student()
    prompts = pair.cipher.prompts(batches * budget.prompts, 1000 + seed, "train")
    h_all, at = [], {k: {"h": [], "rkl": [], "fkl": []} for k in ERROR_KINDS}
    labels_of = {"median": [], "absolute": []}
    planted_of = {k: [] for k in ERROR_KINDS}
    rollouts, jaccard = 0, []
    for b in range(batches):
        part = prompts[b * budget.prompts:(b + 1) * budget.prompts]
        batch, t_logits, planted = sample_batch(pair, student, part, budget)
        mask = batch.target_mask
        s_logits = student(input_ids=batch.input_ids,
                           attention_mask=batch.attention_mask).logits[:, :-1]
        sig = signals_from_logits(s_logits, t_logits, mask)
        labels_of["median"].append(quadrant_labels(sig.entropy, sig.reverse_kl, mask)[mask])
        differs = s_logits.argmax(-1) != t_logits.argmax(-1)
        labels_of["absolute"].append(absolute_labels(sig, differs)[mask])
        h_all.append(sig.entropy[mask])
        for kind, where in planted.items():
            planted_of[kind].append(where[mask])
            at[kind]["h"].append(sig.entropy[where])
            at[kind]["rkl"].append(sig.reverse_kl[where])
            at[kind]["fkl"].append(sig.forward_kl[where])
        kept = {r: select(r, sig, 0.1, generator=gen).kept for r in ("div_topk", "q3")}
        jaccard.append(float((kept["div_topk"] & kept["q3"]).sum()
                             / (kept["div_topk"] | kept["q3"]).sum()))
        rollouts += mask.shape[0]
    h = torch.cat(h_all)
    out: dict = {"tokens": int(h.numel()), "rollouts": rollouts,
                 "entropy_thirds": [float(quantile(h, 1 / 3)), float(quantile(h, 2 / 3))],
                 "jaccard_div_topk_q3_at_0.1": sum(jaccard) / len(jaccard), "kinds": {},
                 "labels": {}}
    for kind in ERROR_KINDS:
        values = {k: torch.cat(v) for k, v in at[kind].items()}
        out["kinds"][kind] = {"per_rollout": values["h"].numel() / rollouts,
                              **{f"mean_{k}": float(v.mean()) for k, v in values.items()}}
    quadrant_of = {"confident": 3, "inconsistent": 1}  # the quadrant each kind is built to be in
    for scheme, parts in labels_of.items():
        labels = torch.cat(parts)
        out["labels"][scheme] = {
            f"q{q}_vs_{kind}": precision_recall(labels == q, torch.cat(planted_of[kind]))
            for kind, q in quadrant_of.items()}
        out["labels"][scheme]["shares"] = [float((labels == q).float().mean())
                                           for q in (1, 2, 3, 4)]
    return out


def build_criteria(m: dict, calibration: dict | None) -> list[dict]:
    """The build criteria (docs/testbed_v2.md) from ``measure_build`` and, when given, the
    all-token cell's and the untrained student's greedy accuracies (AdamW) on this build."""
    low, high = m["entropy_thirds"]
    conf, inc = m["kinds"]["confident"], m["kinds"]["inconsistent"]
    rows = [
        ("confident mean h <= the lowest third's bound", conf["mean_h"], f"<= {low:.3g}",
         conf["mean_h"] <= low),
        ("inconsistent mean h >= the highest third's bound", inc["mean_h"], f">= {high:.3g}",
         inc["mean_h"] >= high),
        ("confident positions per rollout > keep 0.2's k (2)", conf["per_rollout"], "> 2",
         conf["per_rollout"] > 2),
        ("inconsistent positions per rollout > keep 0.2's k (2)", inc["per_rollout"], "> 2",
         inc["per_rollout"] > 2),
    ]
    if calibration is not None:
        for kind in ERROR_KINDS:
            lift = calibration["all"][f"greedy@{kind}"] - calibration["untrained"][f"greedy@{kind}"]
            rows.append((f"all-token OPD (AdamW) lifts greedy@{kind} by >= 20 points",
                         100 * lift, ">= 20", lift >= 0.2))
    return [{"name": n, "value": v, "bound": b, "ok": bool(ok)} for n, v, b, ok in rows]


def parse_cell(cell: str) -> tuple[str, float]:
    """``rule@keep`` or ``untrained``, read by the library's cell parser (``tip.config``; the
    testbed trains reverse KL only, so a cell names no divergence)."""
    if cell == "untrained":
        return "untrained", 0.0
    rule, keep = parse_run_cell(cell)
    if "/" in rule or keep != keep:
        raise ValueError(f"cell {cell!r}: expected rule@keep (e.g. q3@0.1) or untrained")
    return rule, keep


def check_grid(cells: list[str], optimizers: list[str]) -> None:
    """A bad cell or optimizer, named with what is allowed, before any model loads."""
    for cell in cells:
        rule, keep = parse_cell(cell)
        if rule != "untrained":
            get_rule(rule)
            validate_keep(keep)
    for optimizer in optimizers:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")


def run(out: Path, builds: list[int], seeds: list[int], optimizers: list[str], cells: list[str],
        eval_prompts: int, budget: Budget = BUDGET) -> Path:
    check_grid(cells, optimizers)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "cells.jsonl"
    done = set()
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["build"], r["cell"], r["optimizer"], r["seed"]))
    builds_path = out / "builds.json"
    build_info = json.loads(builds_path.read_text()) if builds_path.is_file() else {}
    (out / "budget.json").write_text(json.dumps(asdict(budget), indent=2) + "\n")
    t0 = time.time()
    for build in builds:
        pair = Pair.load(built(build))
        evals = pair.cipher.prompts(eval_prompts, 5, "test")
        if str(build) not in build_info:
            build_info[str(build)] = {"signals": measure_build(pair, budget=budget)}
        for cell in cells:
            rule, keep = parse_cell(cell)
            for optimizer in optimizers:
                for seed in seeds:
                    if (build, cell, optimizer, seed) in done:
                        continue
                    if rule == "untrained":
                        metrics = heldout(pair, pair.fresh_student(), evals)
                    else:
                        metrics = train_cell(pair, rule, keep, optimizer, seed, evals, budget)
                    row = {"build": build, "cell": cell, "optimizer": optimizer, "seed": seed,
                           **metrics}
                    with results_path.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    done.add((build, cell, optimizer, seed))
            print(f"build {build} {cell:22s} done  {time.time() - t0:7.1f}s", flush=True)
        rows = [json.loads(x) for x in results_path.read_text().splitlines()]
        calibration = {c: next((r for r in rows if r["build"] == build and r["cell"] == cell
                                and r["optimizer"] == "adamw"), None)
                       for c, cell in (("all", "all@1.0"), ("untrained", "untrained"))}
        ready = calibration if all(calibration.values()) else None
        build_info[str(build)]["criteria"] = build_criteria(build_info[str(build)]["signals"],
                                                            ready)
        builds_path.write_text(json.dumps(build_info, indent=2) + "\n")
    from tip.testbed.cipher.decide import decide_file

    decide_file(out)
    print(f"sweep: {time.time() - t0:.0f}s; {out}/decisions.md", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=Path, default=GRID)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--builds", default=None,
                    help="comma-separated build seeds (default: the grid's)")
    ap.add_argument("--seeds", default=None)
    ap.add_argument("--cells", default=None)
    ap.add_argument("--optimizers", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    grid = yaml.safe_load(args.grid.read_text())
    pick = lambda given, key, cast: [cast(x) for x in given.split(",")] if given else grid[key]
    out = args.out or REPO_ROOT / "outputs" / "testbed_v2" / datetime.now().strftime(
        "%Y-%m-%d_%H-%M-%S")
    run(out, pick(args.builds, "builds", int), pick(args.seeds, "seeds", int),
        pick(args.optimizers, "optimizers", str), pick(args.cells, "cells", str),
        grid["eval_prompts"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
