"""The paper-style table and plot of a sweep: ``python -m tip.report <multirun dir>``.

Reads every cell directory of a Hydra multirun (finished, failed or never finished), groups cells
that differ only in their seed, and writes into ``<multirun dir>/report/``:

- ``table.md`` / ``table.csv``: rule x keep ratio x benchmark, held-out accuracy mean ± std over
  seeds, with the kept-token fraction, peak memory and step time; then every cell with its status
  (and error if it failed);
- ``cells.csv``: one row per cell;
- ``accuracy_vs_tokens.png``: accuracy against kept-token fraction per rule, the all-token baseline
  (and the untrained student, when the sweep has it) as reference lines;
- ``quadrant_kept_shares.png``: each quadrant's share of the kept tokens over training steps, one
  line per rule.

When the cells logged to W&B (``logger=wandb``), the table and the plots are also logged to the
sweep's W&B group. The report is derived data: running it again (e.g. after more cells finish)
rewrites it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tip.benchmarks import EPISODE_METRICS
from tip.checkpoint import write_atomic
from tip.claims import UNTESTABLE, Claim, by_tests
from tip.config import parse_cell
from tip.stats import (
    Difference,
    difference,
    holm,
    p_beyond,
    p_equivalent,
    p_greater,
    p_less,
)
from tip.tasks import CONFIDENT_ERROR, INCONSISTENT_ERROR
from tip.taxonomy import QUADRANT_NAMES, QUADRANTS

# Overrides that name a cell's place in the paper's grid; any other override (e.g. divergence=jsd)
# tells apart otherwise identical rules.
GRID_KEYS = ("cell", "selector", "keep", "seed")
RULE_ORDER = ("untrained", "all", "entropy_sample", "entropy_topk", "soft_or", "soft_or_bottom",
              "q3", "div_topk", "random", "q1", "q2", "q4")


@dataclass
class Cell:
    path: Path
    overrides: list[str]
    # completed | failed | interrupted | unfinished (killed, or still running) | not started
    status: str
    rule: str
    keep: float
    seed: int | None
    variant: str                     # the non-grid overrides, e.g. "divergence=jsd"
    error: str = ""
    # benchmark -> held-out accuracy after training
    accuracy: dict[str, float] = field(default_factory=dict)
    # "<benchmark>/<EPISODE_METRICS>" after training
    episodes: dict[str, float] = field(default_factory=dict)
    kept_frac: float | None = None   # mean over training steps
    # mean over steps of the effective token count (sum w)^2/sum w^2 / valid
    effective_frac: float | None = None
    peak_mem_mb: float | None = None
    step_s: float | None = None
    # mean over steps of q*/frac and q*/of_kept
    quadrants: dict[str, float] = field(default_factory=dict)
    # step -> q* -> share of the kept tokens
    kept_shares: dict[int, dict[str, float]] = field(default_factory=dict)
    logger: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return cell_label(self.rule, self.keep)


def cell_label(rule: str, keep: float) -> str:
    """``q3@0.1``, or ``untrained``: a cell as its ``cell=`` value names it."""
    return rule if rule == "untrained" else f"{rule}@{keep:g}"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (a line cut short by a kill is skipped); none when the file is
    missing."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            pass
    return out


def _cell_config(path: Path) -> dict:
    """The cell's config: tip.train's resolved copy when it got that far, else what Hydra
    composed."""
    for candidate in (path / "config.yaml", path / ".hydra" / "config.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}


def _rule_and_keep(cfg: dict, overrides: dict[str, str]) -> tuple[str, float]:
    """What the cell ran: the selector and keep of its resolved config.yaml (``cell=`` already
    applied there); the ``cell=`` override only for a cell refused before it wrote one."""
    cell = cfg.get("cell", overrides.get("cell"))
    steps = (cfg.get("train") or {}).get("steps")
    if cell == "untrained" or steps == 0:
        return "untrained", 0.0
    if (cfg.get("selector") or {}).get("name"):
        rule, keep = cfg["selector"]["name"], cfg.get("keep", float("nan"))
    elif cell and "@" in str(cell):
        rule, keep = parse_cell(str(cell))
    else:
        rule, keep = "?", float("nan")
    try:
        keep = float(keep)
    except (TypeError, ValueError):
        keep = float("nan")
    return rule, 1.0 if rule == "all" else keep


def read_cell(path: Path) -> Cell:
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(overrides_file.read_text())
                 or []) if overrides_file.is_file() else []
    pairs = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    cfg = _cell_config(path)
    rule, keep = _rule_and_keep(cfg, pairs)
    seed = cfg.get("seed", pairs.get("seed"))
    variant = ",".join(o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in GRID_KEYS
                       and not o.startswith("hydra."))
    status_file = path / "status.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    cell = Cell(path, overrides, status.get("status", "not started"), rule, keep,
                int(seed) if seed is not None else None, variant, error=status.get("error", ""),
                logger=cfg.get("logger") or {})
    if cell.status == "running":
        cell.status = "unfinished"  # killed, preempted without requeue, or still running
    evals = path / "eval.json"
    if cell.status == "completed" and evals.is_file():
        after = json.loads(evals.read_text())["after"]
        # "embedded/accuracy" -> "embedded"; "embedded/accuracy@carry" (problems tagged
        # carry) -> "embedded@carry"
        cell.accuracy = {k.split("/")[0] + k.split("/accuracy", 1)[1]: v for k, v in after.items()
                         if k.split("/")[-1].split("@")[0] == "accuracy"}
        cell.episodes = {k: v for k, v in after.items() if k.split("/")[-1] in EPISODE_METRICS}
    steps = [r for r in read_jsonl(path / "metrics.jsonl") if r.get("kind") == "train"]
    if steps:
        cell.kept_frac = statistics.fmean(r["kept_frac"] for r in steps)
        effective = [r["effective_tokens"] / max(r["valid_tokens"], 1) for r in steps
                     if "effective_tokens" in r]
        cell.effective_frac = statistics.fmean(effective) if effective else None
        cell.peak_mem_mb = max(r["peak_mem_mb"] for r in steps)
        cell.step_s = statistics.fmean(r["step_s"] for r in steps)
        cell.kept_shares = {r["step"]: {q: r[f"{q}/of_kept"] for q in QUADRANTS
                                        if r.get(f"{q}/of_kept") is not None}
                            for r in steps}
        for key in steps[0]:
            if key.split("/")[0] in QUADRANTS and key.endswith(("/frac", "/of_kept")):
                values = [r[key] for r in steps if r.get(key) is not None]
                if values:
                    cell.quadrants[key] = statistics.fmean(values)
    elif rule == "untrained":
        cell.kept_frac = 0.0
    return cell


def find_cells(sweep_dir: Path) -> list[Cell]:
    """The cells of one sweep (a directory with Hydra's ``multirun.yaml``); a folder of unrelated
    runs (``outputs/<date>``) is refused: their rows would sit in one table as if comparable."""
    if not (Path(sweep_dir) / "multirun.yaml").is_file():
        raise SystemExit(f"{sweep_dir} is not a sweep directory (no multirun.yaml): tip.report "
                         "reads the cells of one sweep, e.g. outputs/sweeps/table5_main_<date>; "
                         "separate runs are not compared")
    dirs = [d for d in Path(sweep_dir).iterdir()
            if d.is_dir() and ((d / ".hydra").is_dir() or (d / "status.json").is_file())]
    if not dirs:
        raise SystemExit(f"{sweep_dir} holds no sweep cells (no <n>/status.json): pass a "
                         "multirun directory, e.g. outputs/sweeps/table5_main_<date>")
    dirs.sort(key=lambda d: (0, int(d.name)) if d.name.isdigit() else (1, d.name))
    cells = [read_cell(d) for d in dirs]
    # Overrides that every cell shares (pair=..., experiment=...) describe the sweep, not a variant.
    shared = set.intersection(*(set(c.variant.split(",")) for c in cells))
    for c in cells:
        c.variant = ",".join(o for o in c.variant.split(",") if o and o not in shared)
    return cells


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _rule_rank(rule: str) -> int:
    return RULE_ORDER.index(rule) if rule in RULE_ORDER else len(RULE_ORDER)


def aggregate(cells: list[Cell]) -> tuple[list[dict], list[str]]:
    """One row per (rule, keep, variant): mean and std over the completed seeds of each benchmark's
    accuracy."""
    benchmarks = sorted({b for c in cells for b in c.accuracy})
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.rule, c.keep, c.variant), []).append(c)
    rows = []
    def order(kv):
        (rule, keep, variant), _ = kv
        return variant, _rule_rank(rule), rule, -keep if not math.isnan(keep) else 0

    for (rule, keep, variant), members in sorted(groups.items(), key=order):
        done = [c for c in members if c.status == "completed"]
        row = {"rule": rule, "keep": keep, "variant": variant, "seeds": len(done),
               "failed": sum(c.status == "failed" for c in members),
               "unfinished": sum(c.status not in ("completed", "failed") for c in members)}
        row["kept_frac"], row["kept_frac_std"] = _mean_std([c.kept_frac for c in done
                                                            if c.kept_frac is not None])
        row["effective_frac"], _ = _mean_std([c.effective_frac for c in done
                                              if c.effective_frac is not None])
        for b in benchmarks:
            row[f"{b}/accuracy"], row[f"{b}/accuracy_std"] = _mean_std([c.accuracy[b] for c in done
                                                                        if b in c.accuracy])
            # seed -> value, for differences paired over the seeds two cells share
            row[f"{b}/accuracy_by_seed"] = {(c.seed if c.seed is not None else i): c.accuracy[b]
                                            for i, c in enumerate(done) if b in c.accuracy}
        for key in sorted({k for c in done for k in c.episodes}):
            row[key], _ = _mean_std([c.episodes[key] for c in done if key in c.episodes])
        row["peak_mem_mb"], _ = _mean_std([c.peak_mem_mb for c in done
                                           if c.peak_mem_mb is not None])
        row["step_s"], _ = _mean_std([c.step_s for c in done if c.step_s is not None])
        for q in QUADRANTS:
            for part in ("frac", "of_kept"):
                row[f"{q}/{part}"], _ = _mean_std([c.quadrants[f"{q}/{part}"] for c in done
                                                   if f"{q}/{part}" in c.quadrants])
        rows.append(row)
    return rows, benchmarks


def kept_composition(row: dict) -> str:
    shares = [row.get(f"{q}/of_kept", math.nan) for q in QUADRANTS]
    return "—" if any(math.isnan(x) for x in shares) else "/".join(f"{x:.2f}" for x in shares)


def _pct(mean: float, std: float) -> str:
    return "—" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _num(x: float, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(sweep_dir: Path, rows: list[dict], benchmarks: list[str], cells: list[Cell]) -> str:
    head = ["rule", "keep", "tokens kept", "effective", "kept Q1/Q2/Q3/Q4"] + \
        [f"{b} (%)" for b in benchmarks] + ["seeds", "peak MB", "step s"]
    lines = [f"# Sweep {Path(sweep_dir).name}", "",
             "Held-out accuracy after training, mean ± std over seeds (sample std; 0 with one "
             "seed). `tokens kept`: mean fraction of valid response tokens in the loss; "
             "`effective`: the same for the effective token count (sum w)^2 / sum w^2 of the kept "
             "tokens' loss weights (= tokens kept for a hard-mask rule, less for a weighting "
             "rule); `kept Q1/Q2/Q3/Q4`: each quadrant's share of the kept tokens (means over "
             "steps), what the cell trained on.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rule = r["rule"] + (f" ({r['variant']})" if r["variant"] else "")
        seeds = str(r["seeds"]) + (f" (+{r['failed']} failed)" if r["failed"] else "") + \
            (f" (+{r['unfinished']} unfinished)" if r["unfinished"] else "")
        keep = "—" if r["rule"] == "untrained" else f"{r['keep']:g}"
        cols = [rule, keep, _num(r["kept_frac"], ".3f"), _num(r["effective_frac"], ".3f"),
                kept_composition(r)]
        cols += [_pct(r[f"{b}/accuracy"], r[f"{b}/accuracy_std"]) for b in benchmarks]
        cols += [seeds, _num(r["peak_mem_mb"], ".0f"), _num(r["step_s"], ".2f")]
        lines.append("| " + " | ".join(cols) + " |")
    episode_keys = sorted({k for r in rows for k in r if k.split("/")[-1] in EPISODE_METRICS},
                          key=lambda k: (k.split("/")[0], EPISODE_METRICS.index(k.split("/")[-1])))
    if episode_keys:
        lines += ["",
                  "Tool use after training (multi-turn benchmarks; means over seeds): the share of "
                  "episodes with a well-formed tool call, then well-formed calls, malformed calls "
                  "and turns per episode:", "",
                  "| rule | keep | " + " | ".join(episode_keys) + " |",
                  "|" + "---|" * (2 + len(episode_keys))]
        for r in rows:
            keep = "—" if r["rule"] == "untrained" else f"{r['keep']:g}"
            lines.append(f"| {r['rule']} | {keep} | "
                         + " | ".join(_num(r.get(k), ".3f") for k in episode_keys) + " |")
    quad_rows = [r for r in rows if not math.isnan(r["q1/frac"])]
    if quad_rows:
        lines += ["",
                  "Token share of each quadrant and each quadrant's share of the kept tokens "
                  "(means over steps). Sanity check, not a finding: with the default median "
                  "thresholds Q1 = Q4 and Q2 = Q3 in share by construction.", "",
                  "| rule | keep | " + " | ".join(f"{q.upper()} share" for q in QUADRANTS) + " | " +
                  " | ".join(f"{q.upper()} of kept" for q in QUADRANTS) + " |", "|" + "---|" * 10]
        for r in quad_rows:
            lines.append(f"| {r['rule']} | {r['keep']:g} | " +
                         " | ".join(_num(r[f'{q}/frac'], '.3f') for q in QUADRANTS) + " | " +
                         " | ".join(_num(r[f'{q}/of_kept'], '.3f') for q in QUADRANTS) + " |")
    lines += ["", "## Cells", "",
              "| dir | overrides | status | " + " | ".join(benchmarks) + " | error |",
              "|" + "---|" * (4 + len(benchmarks))]
    for c in cells:
        accs = [_num(c.accuracy.get(b), ".3f") for b in benchmarks]
        error = c.error.splitlines()[0][:160].replace("|", "\\|") if c.error else ""
        lines.append(f"| {c.path.name} | {' '.join(c.overrides)} | {c.status} | "
                     + " | ".join(accs) +
                     f" | {error} |")
    return "\n".join(lines) + "\n"


# The paper's claims, checked when a sweep has the cells they compare (sweeps=testbed_reproduction
# has all) (``tip.claims.Claim``): "greater" (A above B), "close" (A within MARGIN of B); a cell is
# (rule, keep); the metric names the problems compared: "" all of them, "@<tag>" those tagged so
# (the embedded task's error types). The decision rule (verdict_words) was fixed in the commit
# that added it, before the results it reads were produced (docs/testbed_results.md,
# "Pre-registration").
MARGIN = 0.02
"""'close': equivalent within 2 points of accuracy (stated before the results)."""
CLAIMS = [
    Claim("Soft-OR 50% >= all-token", "greater", "", ("soft_or", 0.5), ("all", 1.0)),
    Claim("Soft-OR top-50% well above bottom-50%", "greater", "", ("soft_or", 0.5),
          ("soft_or_bottom", 0.5)),
    Claim("Q3 at 10% close to all-token", "close", "", ("q3", 0.1), ("all", 1.0), MARGIN),
    Claim("Q3 at 10% above divergence-only at 10%", "greater", "", ("q3", 0.1), ("div_topk", 0.1)),
    Claim("Q4-only helps least (below Q1-only)", "greater", "", ("q1", 0.2), ("q4", 0.2)),
    Claim("Q4-only helps least (below Q2-only)", "greater", "", ("q2", 0.2), ("q4", 0.2)),
    Claim("Q4-only helps least (below Q3-only)", "greater", "", ("q3_only", 0.2), ("q4", 0.2)),
    Claim("entropy sampling at 10% leaves the confident error unfixed", "close",
          f"@{CONFIDENT_ERROR}", ("entropy_sample", 0.1), ("untrained", 0.0), MARGIN),
    Claim("Q3 at 10% fixes the confident error more than entropy sampling at 10%", "greater",
          f"@{CONFIDENT_ERROR}", ("q3", 0.1), ("entropy_sample", 0.1)),
]
ALPHA = 0.05
"""Familywise error over the claims one report reads (Holm)."""


def untestable(a: dict, b: dict) -> str:
    """Why a pair of per-seed value sets cannot tell anything ('' when they can): both at the
    floor, both at the ceiling, or no variance at all."""
    values = list(a.values()) + list(b.values())
    if values and all(v == 0 for v in values):
        return "both at the floor"
    if values and all(v == 1 for v in values):
        return "both at the ceiling"
    if len(set(a.values())) <= 1 and len(set(b.values())) <= 1:
        return "no variance"
    return ""


def verdict_words(readings: list[tuple[str, Difference | None]]) -> list[str]:
    """The decision rule: each reading (kind, the A - B difference, or None when untestable) gets
    'reproduced', 'not reproduced', 'inconclusive' or 'untestable' (``tip.claims``). greater:
    reproduced when 'A > B' is significant, not reproduced when 'A < B' is (one-sided t-tests);
    close: reproduced when TOST shows |d| < MARGIN, not reproduced when |d| > MARGIN is
    significant. Each family of p-values is Holm-corrected at ALPHA over the report's readings."""
    testable = [(i, kind, diff) for i, (kind, diff) in enumerate(readings)
                if diff is not None and diff.se > 0]
    support = holm([p_greater(d) if k == "greater" else p_equivalent(d, MARGIN)
                    for _, k, d in testable])
    against = holm([p_less(d) if k == "greater" else p_beyond(d, MARGIN) for _, k, d in testable])
    words = [UNTESTABLE] * len(readings)
    for (i, _, _), p_for, p_against in zip(testable, support, against):
        words[i] = by_tests(p_for, p_against, ALPHA)
    return words


def _claim_readings(bench: str, benchmarks: list[str]):
    """Each claim on the problems it names; a claim on all problems is also read on those of the
    inconsistent error type where the benchmark tags them (on the embedded testbed the only error a
    dozen steps can fix)."""
    for claim in CLAIMS:
        readings = [claim.metric]
        if not claim.metric and f"{bench}@{INCONSISTENT_ERROR}" in benchmarks:
            readings.append(f"@{INCONSISTENT_ERROR}")
        for p in readings:
            yield claim.statement, claim.comparison, claim.a, claim.b, p, f"{bench}{p}/accuracy"


def claims_markdown(rows: list[dict], benchmarks: list[str]) -> str:
    by_cell = {(r["rule"], r["keep"]): r for r in rows if not r["variant"] and r["seeds"]}
    found = []
    for bench in (b for b in benchmarks if "@" not in b):
        for text, kind, a, b, problems, metric in _claim_readings(bench, benchmarks):
            if a in by_cell and b in by_cell and metric in by_cell[a] and metric in by_cell[b]:
                seeds_a, seeds_b = (by_cell[c][f"{metric}_by_seed"] for c in (a, b))
                why = untestable(seeds_a, seeds_b)
                found.append((text, kind, a, b, f"{bench}{problems}", why,
                              None if why else difference(seeds_a, seeds_b)))
    words = verdict_words([(kind, diff) for _, kind, _, _, _, _, diff in found])
    lines = []
    for (text, _, a, b, where, why, diff), word in zip(found, words):
        d = "—" if diff is None else f"{100 * diff.d:+.1f}"
        se = "—" if diff is None else f"{100 * diff.se:.1f}" + (" (paired)" if diff.paired else "")
        lines.append(f"| {text} | {where} | {cell_label(*a)} − {cell_label(*b)} | {d} | {se} | "
                     f"{word + (f' ({why})' if why else '')} |")
    entropy = [r for r in rows if r["rule"] in ("entropy_sample", "entropy_topk")
               and not math.isnan(r["q3/of_kept"])]
    if not lines and not entropy:
        return ""
    out = ["", "## The paper's claims", "",
           f"d: mean difference A − B in points, paired over the seeds both cells share (else "
           f"Welch's); SE its standard error. \"A above B\": reproduced when a one-sided t-test "
           f"finds A > B, not reproduced when it finds A < B; \"close\": reproduced when two "
           f"one-sided tests put |d| below {100 * MARGIN:g} points, not reproduced when |d| is "
           f"significantly above it; each at a familywise {ALPHA:g} with Holm's correction over "
           f"the {len(lines)} readings below; else inconclusive. Untestable: both cells at the "
           "floor or the ceiling, or without variance.", "",
           "| claim | benchmark | cells | d | SE | verdict |", "|---|---|---|---|---|---|", *lines]
    if entropy:
        out += ["",
                "Sanity check, true by definition (not a finding): entropy-only rules keep "
                "high-entropy tokens, so they under-keep Q3 (Q3's share of all tokens vs of the "
                "kept tokens, means over seeds and steps):", "",
                "| rule | keep | Q3 share of tokens | Q3 share of kept |", "|---|---|---|---|"]
        out += [f"| {r['rule']} | {r['keep']:g} | {r['q3/frac']:.3f} | {r['q3/of_kept']:.3f} |"
                for r in entropy]
    return "\n".join(out) + "\n"


def table_columns(rows: list[dict]) -> list[str]:
    """The rows' columns with one value per cell (not the per-seed values the verdicts read)."""
    return [k for k in rows[0] if not k.endswith("_by_seed")] if rows else []


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=table_columns(rows), lineterminator="\n",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def cell_rows(cells: list[Cell], benchmarks: list[str]) -> list[dict]:
    return [{"dir": c.path.name, "overrides": " ".join(c.overrides), "status": c.status,
             "rule": c.rule, "keep": c.keep, "seed": c.seed, "variant": c.variant,
             "kept_frac": c.kept_frac, "effective_frac": c.effective_frac,
             **{f"{b}/accuracy": c.accuracy.get(b) for b in benchmarks},
             "peak_mem_mb": c.peak_mem_mb, "step_s": c.step_s,
             "error": c.error.splitlines()[0] if c.error else ""} for c in cells]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Write ``fig`` to ``path`` (PNG) under a temporary name, rename it into place, and release
    it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)


def plot(rows: list[dict], benchmarks: list[str], title: str, path: Path) -> None:
    """Accuracy against kept-token fraction, one line per rule; baselines as horizontal lines."""
    plt = pyplot()
    fig, axes = plt.subplots(1, max(1, len(benchmarks)),
                             figsize=(5.5 * max(1, len(benchmarks)), 4.2), squeeze=False)
    for ax, bench in zip(axes[0], benchmarks or ["(no finished cell)"]):
        acc, std = f"{bench}/accuracy", f"{bench}/accuracy_std"
        for r in rows:
            if r["rule"] in ("all", "untrained") and not math.isnan(r.get(acc, math.nan)):
                style = ("--", "tab:gray") if r["rule"] == "all" else (":", "black")
                name = "all tokens (baseline)" if r["rule"] == "all" else "untrained student"
                ax.axhline(100 * r[acc], ls=style[0], color=style[1],
                           label=name + (f" {r['variant']}" if r["variant"]
                                                                                      else ""))
                if r["rule"] == "all" and r[std] > 0:
                    ax.axhspan(100 * (r[acc] - r[std]), 100 * (r[acc] + r[std]), color=style[1],
                               alpha=0.12)
        lines: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["rule"] not in ("all", "untrained") and not math.isnan(r.get(acc, math.nan)):
                lines.setdefault((r["rule"], r["variant"]), []).append(r)
        for (rule, variant), pts in lines.items():
            pts.sort(key=lambda r: r["kept_frac"])
            ax.errorbar([r["kept_frac"] for r in pts], [100 * r[acc] for r in pts],
                        yerr=[100 * r[std] for r in pts], marker="o", capsize=3,
                        label=rule + (f" {variant}" if variant else ""))
        ax.set_xlabel("fraction of response tokens in the loss")
        ax.set_ylabel(f"{bench} accuracy (%)")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def kept_share_series(cells: list[Cell]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{cell label (and variant): {quadrant: [(step, share of the kept tokens, mean over
    seeds)]}}``."""
    grouped: dict[str, list[Cell]] = {}
    for c in cells:
        if c.kept_shares and c.rule != "untrained":
            grouped.setdefault(c.label + (f" {c.variant}" if c.variant else ""), []).append(c)
    series = {}
    for name, group in sorted(grouped.items(), key=lambda kv: (_rule_rank(kv[1][0].rule), kv[0])):
        steps = sorted(set().union(*(c.kept_shares for c in group)))
        series[name] = {q: [(s,
                             statistics.fmean(c.kept_shares[s][q] for c in group
                                              if q in c.kept_shares.get(s, {})))
                            for s in steps if any(q in c.kept_shares.get(s, {}) for c in group)]
                        for q in QUADRANTS}
    return series


def plot_kept_shares(cells: list[Cell], title: str, path: Path) -> None:
    """Each quadrant's share of the kept tokens over training steps, one line per rule (mean over
    seeds)."""
    plt = pyplot()
    series = kept_share_series(cells)
    fig, axes = plt.subplots(1, len(QUADRANTS), figsize=(4.2 * len(QUADRANTS), 3.8), sharey=True,
                             squeeze=False)
    for ax, q in zip(axes[0], QUADRANTS):
        for name, by_q in series.items():
            points = by_q[q]
            ax.plot([s for s, _ in points], [100 * v for _, v in points], marker="o", ms=3,
                    label=name)
        ax.set_title(f"{q.upper()} ({QUADRANT_NAMES[q]})", fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of the kept tokens (%)")
    axes[0][0].set_ylim(0, 100)
    if series:
        axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{title}: where each rule's kept tokens lie, step by step")
    fig.tight_layout()
    save_figure(fig, path)


def log_to_wandb(sweep_dir: Path, out: Path, rows: list[dict], cells: list[Cell], mode: str | None):
    """A "report" run in the sweep's W&B group, holding the table and the plot. Returns the run's
    directory."""
    import wandb

    from tip.wandb_logging import resolve_mode

    lg = next((c.logger for c in cells if c.logger.get("name") == "wandb"), {})
    run = wandb.init(project=lg.get("project", "tip"), entity=lg.get("entity"),
                     group=lg.get("group") or Path(sweep_dir).name, name="report",
                     job_type="report", mode=mode or resolve_mode(lg.get("mode", "auto")),
                     dir=str(out), reinit="finish_previous")
    columns = table_columns(rows)
    run.log({"results": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows]),
             "accuracy_vs_tokens": wandb.Image(str(out / "accuracy_vs_tokens.png")),
             "quadrant_kept_shares": wandb.Image(str(out / "quadrant_kept_shares.png"))})
    run_dir = Path(run.dir).parent
    run.finish()
    return run_dir


def report(sweep_dir: Path, wandb_mode: str = "auto") -> Path:
    """Write the report of ``sweep_dir`` into ``sweep_dir/report``; returns that folder."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SystemExit(f"no such sweep directory: {sweep_dir}")
    cells = find_cells(sweep_dir)
    rows, benchmarks = aggregate(cells)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    text = markdown(sweep_dir, rows, benchmarks, cells)
    claims = claims_markdown(rows, benchmarks)
    if claims:  # before the per-cell list
        head, sep, tail = text.partition("\n## Cells\n")
        text = head + claims + sep + tail
    write_atomic(out / "table.md", text)
    write_atomic(out / "table.csv", _csv(rows))
    write_atomic(out / "cells.csv", _csv(cell_rows(cells, benchmarks)))
    plot(rows, benchmarks, sweep_dir.name, out / "accuracy_vs_tokens.png")
    plot_kept_shares(cells, sweep_dir.name, out / "quadrant_kept_shares.png")
    use_wandb = wandb_mode in ("online", "offline") or (
        wandb_mode == "auto" and any(c.logger.get("name") == "wandb" for c in cells))
    if use_wandb:
        log_to_wandb(sweep_dir, out, rows, cells, None if wandb_mode == "auto" else wandb_mode)
    print(text, end="")
    print(f"report: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tip.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (hydra.sweep.dir)")
    parser.add_argument("--wandb", choices=("auto", "online", "offline", "off"), default="auto",
                        help="auto: log to W&B when the cells did (logger=wandb), in their mode")
    args = parser.parse_args(argv)
    report(args.sweep_dir, args.wandb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
