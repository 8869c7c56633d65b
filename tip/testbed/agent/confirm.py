"""The pre-registered confirmation of Table 7's lead (issue 39, part 5; docs/running.md, "Table 7:
the confirmation").

    python -m tip.train sweeps=table7_confirmation        # 3 cells x 3 lrs x 4 fresh seeds
    python -m tip.testbed.agent.decision <sweep dir>      # each cell's carry metric
    python -m tip.testbed.agent.confirm <sweep dir>       # the verdicts: <sweep dir>/confirm.md

Each cell's lr is chosen on the dev half of the held-out problems by accuracy and every number is
read on the test half (``tip.sweep_tuning``, split seed 0). The claims and their families are
``CLAIMS``, decided by the report's rule (``tip.sweep_claims.verdict_words``: one-sided tests
paired over the seeds, each family Holm-corrected at 0.05 over the tests for and against).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tip.stats import difference
from tip.sweep_cells import find_cells
from tip.sweep_claims import Reading, verdict_words
from tip.sweep_tuning import half_of, tune

BENCHMARK = "embedded_agent"
SPLIT_SEED = 0
CLAIMS = [  # (name, statement, metric, A, B, primary)
    ("T1", "q3@0.2 above all-token, accuracy", "accuracy", "q3@0.2", "all@1", True),
    ("T2", "q3@0.2 above random@0.2, accuracy", "accuracy", "q3@0.2", "random@0.2", True),
    ("T3", "q3@0.2 above all-token, carry decision", "decision", "q3@0.2", "all@1", False),
    ("T4", "q3@0.2 above random@0.2, carry decision", "decision", "q3@0.2", "random@0.2", False),
]


def decision_by_seed(cells, rule: str, keep: float, lr: float) -> dict[int, float]:
    """Per seed: the mean log P(<tool_call>) over the test half's carry problems, at ``lr``."""
    out = {}
    for c in cells:
        path = c.path / "decision.json"
        if (c.rule, c.keep, c.lr) == (rule, keep, lr) and path.is_file():
            scores = json.loads(path.read_text())
            test = [v for k, v in scores.items() if half_of(k, SPLIT_SEED) == "test"]
            out[c.seed] = statistics.fmean(test)
    return out


def confirm(sweep_dir: Path) -> str:
    cells = find_cells(sweep_dir)
    tuning = tune(cells, BENCHMARK, SPLIT_SEED)
    if tuning is None:
        raise SystemExit(f"{sweep_dir}: no lr grid with per-problem scores; run "
                         "sweeps=table7_confirmation")
    by_label = {f"{t.rule}@{t.keep:g}": t for t in tuning.cells}
    values = {}
    for label, t in by_label.items():
        values[(label, "accuracy")] = t.test_by_seed(t.chosen_lr)
        values[(label, "decision")] = decision_by_seed(cells, t.rule, t.keep, t.chosen_lr)
    readings, rows = [], []
    for name, text, metric, a, b, primary in CLAIMS:
        va, vb = values.get((a, metric), {}), values.get((b, metric), {})
        diff = difference(va, vb) if len(set(va) & set(vb)) >= 2 else None
        readings.append(Reading("greater", diff, primary=primary))
        rows.append((name, text, "primary" if primary else "secondary", diff))
    words = verdict_words(readings)
    lines = [f"# Table 7: the confirmation ({sweep_dir.name})", "",
             f"Each cell at its own lr, chosen by accuracy on the dev half of {BENCHMARK}'s "
             f"problems (split seed {SPLIT_SEED}); every number on the test half, paired over the "
             "seeds. Accuracy in points; the carry decision in nats (log P(<tool_call>) on the "
             "test half's carry problems).", "",
             "| cell | lr | accuracy (test half) | carry decision |", "|---|---|---|---|"]
    for label, t in by_label.items():
        acc, dec = values[(label, "accuracy")], values[(label, "decision")]
        lr = "—" if t.chosen_lr is None else f"{t.chosen_lr:g}"
        lines.append(f"| {label} | {lr} | "
                     + (f"{100 * statistics.fmean(acc.values()):.1f}" if acc else "—") + " | "
                     + (f"{statistics.fmean(dec.values()):.3f}" if dec else "—") + " |")
    lines += ["", "| claim | family | d | SE | verdict |", "|---|---|---|---|---|"]
    for (name, text, family, diff), word in zip(rows, words):
        scale = 100 if "accuracy" in text else 1
        d = "—" if diff is None else f"{scale * diff.d:+.3f}"
        se = "—" if diff is None else f"{scale * diff.se:.3f}"
        lines.append(f"| {name} {text} | {family} | {d} | {se} | {word} |")
    text = "\n".join(lines) + "\n"
    (sweep_dir / "confirm.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    print(confirm(ap.parse_args(argv).sweep_dir), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
