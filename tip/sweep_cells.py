"""A sweep's cells as they ran (each cell's own resolved config, status, metrics and evaluations),
grouped into the paper-style table rows (``aggregate``) and written as Markdown and CSV. Read by
``python -m tip.report``."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tip.benchmarks import EPISODE_METRICS
from tip.config import parse_cell
from tip.taxonomy import QUADRANTS

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
    lr: float | None = None  # train.lr as the cell ran
    # benchmark -> problem id -> score after training (eval.json's after_problems)
    problems: dict[str, dict[str, float]] = field(default_factory=dict)

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


def _lr_of(cfg: dict) -> float | None:
    try:
        return float((cfg.get("train") or {})["lr"])
    except (KeyError, TypeError, ValueError):
        return None


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
                logger=cfg.get("logger") or {}, lr=_lr_of(cfg))
    if cell.status == "running":
        cell.status = "unfinished"  # killed, preempted without requeue, or still running
    evals = path / "eval.json"
    if cell.status == "completed" and evals.is_file():
        results = json.loads(evals.read_text())
        after = results["after"]
        cell.problems = results.get("after_problems", {})
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
    return own_lr_is_no_variant(cells)


def own_lr_is_no_variant(cells: list[Cell]) -> list[Cell]:
    """A cell run at one lr of its own (e.g. each at its lr chosen on a grid) is that cell, not a
    variant: ``train.lr=...`` leaves its variant unless the sweep ran the cell at several lrs (a
    grid, which ``tip.sweep_tuning`` reads)."""
    def base(c: Cell) -> tuple:
        return c.rule, c.keep, ",".join(o for o in c.variant.split(",")
                                        if o and not o.startswith("train.lr="))
    lrs: dict[tuple, set] = {}
    for c in cells:
        lrs.setdefault(base(c), set()).add(c.lr)
    for c in cells:
        if len(lrs[base(c)]) == 1:
            c.variant = base(c)[2]
    return cells


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rule_rank(rule: str) -> int:
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
        return variant, rule_rank(rule), rule, -keep if not math.isnan(keep) else 0

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


def table_columns(rows: list[dict]) -> list[str]:
    """The rows' columns with one value per cell (not the per-seed values the verdicts read)."""
    return [k for k in rows[0] if not k.endswith("_by_seed")] if rows else []


def csv_text(rows: list[dict]) -> str:
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


