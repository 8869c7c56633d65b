"""Every cell at its own learning rate: a sweep run over an lr grid (``train.lr=a,b,c`` beside the
sweep file) has each cell's lr chosen on a dev half of a benchmark's problems and its accuracy
reported on the other, test half, so that the winner's curse does not favour the noisiest cell.

Why (docs/sweeps.md, "Learning rates"): under the kept-token mean a rule keeping rho of the tokens
gives each kept token about 1/rho the step it gets in all-token OPD at the same lr, so one shared lr
favours small rho. The report prints both comparisons on the test half: every cell at the shared lr
(all-token's dev-best lr unless ``--shared-lr`` names one) and every cell at its own dev-best lr.

The halves: a problem is dev or test by a hash of (``split_seed``, its id), the same for every
cell; a cell's score on a half is the mean of its problems' scores (eval.json's
``after_problems``). The lr is chosen by the mean dev accuracy over the cell's seeds (ties: the
smaller lr)."""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass, field

from tip.sweep_cells import Cell, cell_label, rule_rank

LR_KEY = "train.lr"
"""The override an lr grid sweeps; a cell's variant without it names the cell across the grid."""
HALVES = ("dev", "test")


def half_of(problem_id: str, split_seed: int) -> str:
    """'dev' or 'test': the problem's half, by a hash of the split seed and its id."""
    digest = hashlib.sha256(f"{split_seed}:{problem_id}".encode()).digest()
    return HALVES[digest[0] % 2]


def half_accuracy(cell: Cell, benchmark: str, half: str, split_seed: int) -> float | None:
    """The cell's mean score over the problems of ``half`` (None without per-problem scores)."""
    scores = [v for k, v in cell.problems.get(benchmark, {}).items()
              if half_of(k, split_seed) == half]
    return statistics.fmean(scores) if scores else None


def dev_best(score_by_lr: dict[float, float]) -> float:
    """The lr with the largest dev score; ties: the smaller lr."""
    best = max(score_by_lr.values())
    return min(lr for lr, score in score_by_lr.items() if score == best)


def base_variant(variant: str) -> str:
    """The cell's variant without its lr: what names it across the grid."""
    return ",".join(o for o in variant.split(",") if o and not o.startswith(f"{LR_KEY}="))


@dataclass
class TunedCell:
    """One (rule, keep, variant) across the lr grid, on one benchmark."""

    rule: str
    keep: float
    variant: str
    # lr -> mean dev accuracy over seeds; lr -> {seed: test accuracy}
    dev: dict[float, float] = field(default_factory=dict)
    test: dict[float, dict[int, float]] = field(default_factory=dict)
    chosen_lr: float | None = None

    @property
    def label(self) -> str:
        return cell_label(self.rule, self.keep) + (f" ({self.variant})" if self.variant else "")

    def test_by_seed(self, lr: float | None) -> dict[int, float]:
        if self.rule == "untrained":  # no step was taken: every lr is the same cell
            lr = next(iter(self.test), None)
        return self.test.get(lr, {})


@dataclass
class Tuning:
    benchmark: str
    split_seed: int
    grid: list[float]
    shared_lr: float
    shared_from: str  # why that lr is the shared one
    cells: list[TunedCell]


def tune(cells: list[Cell], benchmark: str, split_seed: int = 0,
         shared_lr: float | None = None) -> Tuning | None:
    """The tuned comparison on ``benchmark``; None when the sweep has no lr grid (every cell at one
    lr) or no per-problem scores."""
    done = [c for c in cells if c.status == "completed" and c.lr is not None
            and benchmark in c.problems]
    grid = sorted({c.lr for c in done if c.rule != "untrained"})
    if len(grid) < 2:
        return None
    groups: dict[tuple, TunedCell] = {}
    dev_by_lr: dict[tuple, dict[float, list[float]]] = {}
    for c in done:
        key = (c.rule, c.keep, base_variant(c.variant))
        tc = groups.setdefault(key, TunedCell(*key))
        dev = half_accuracy(c, benchmark, "dev", split_seed)
        test = half_accuracy(c, benchmark, "test", split_seed)
        if dev is None or test is None:
            continue
        seed = c.seed if c.seed is not None else 0
        dev_by_lr.setdefault(key, {}).setdefault(c.lr, []).append(dev)
        tc.test.setdefault(c.lr, {})[seed] = test
    for key, tc in groups.items():
        tc.dev = {lr: statistics.fmean(v) for lr, v in sorted(dev_by_lr.get(key, {}).items())}
        if tc.dev and tc.rule != "untrained":
            tc.chosen_lr = dev_best(tc.dev)
    all_token = groups.get(("all", 1.0, ""))
    if shared_lr is not None:
        shared_from = "named by --shared-lr"
    elif all_token is not None and all_token.chosen_lr is not None:
        shared_lr, shared_from = all_token.chosen_lr, "all-token's own dev-best lr"
    else:
        shared_lr, shared_from = statistics.median_low(grid), "the grid's median (no all@1 cell)"
    ordered = sorted(groups.values(), key=lambda t: (t.variant, rule_rank(t.rule), t.rule,
                                                     -t.keep))
    return Tuning(benchmark, split_seed, grid, shared_lr, shared_from, ordered)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pct(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return "—" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def tuned_rows(tuning: Tuning, at: str) -> list[dict]:
    """Rows in the shape ``tip.sweep_claims`` reads, on the test half: every cell at the shared lr
    (``at='shared'``) or at its own dev-best lr (``'own'``)."""
    rows = []
    for tc in tuning.cells:
        by_seed = tc.test_by_seed(tuning.shared_lr if at == "shared" else tc.chosen_lr)
        metric = f"{tuning.benchmark}/accuracy"
        mean, std = _mean_std(list(by_seed.values()))
        rows.append({"rule": tc.rule, "keep": tc.keep, "variant": tc.variant,
                     "seeds": len(by_seed), metric: mean, f"{metric}_std": std,
                     f"{metric}_by_seed": by_seed, "q3/of_kept": math.nan})
    return rows


def tuning_markdown(tuning: Tuning) -> str:
    grid = ", ".join(f"{lr:g}" for lr in tuning.grid)
    lines = ["", "## Every cell at its own learning rate", "",
             f"lr grid: {grid}. Each cell's lr is chosen by its mean accuracy over seeds on the "
             f"dev half of {tuning.benchmark}'s problems and reported on the test half (halves by "
             f"a hash of the problem id, split seed {tuning.split_seed}; the same halves for every "
             f"cell). The shared lr is {tuning.shared_lr:g} ({tuning.shared_from}). Test-half "
             "accuracy, mean ± std over seeds, in %; own − shared: the difference of the means. "
             "One shared lr favours small keep fractions (docs/sweeps.md, \"Learning rates\").", "",
             "| cell | dev accuracy per lr | own lr | test at own lr | test at shared lr | "
             "own − shared |", "|---|---|---|---|---|---|"]
    for tc in tuning.cells:
        dev = ", ".join(f"{lr:g}: {100 * v:.1f}" for lr, v in tc.dev.items())
        own = list(tc.test_by_seed(tc.chosen_lr).values())
        shared = list(tc.test_by_seed(tuning.shared_lr).values())
        gap = (statistics.fmean(own) - statistics.fmean(shared)) if own and shared else math.nan
        lr = "—" if tc.chosen_lr is None else f"{tc.chosen_lr:g}"
        lines.append(f"| {tc.label} | {dev} | {lr} | {_pct(own)} | {_pct(shared)} | "
                     + ("—" if math.isnan(gap) else f"{100 * gap:+.1f}") + " |")
    return "\n".join(lines) + "\n"
