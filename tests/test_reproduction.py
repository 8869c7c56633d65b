"""A reduced run of the testbed reproduction (docs/testbed.md, "Results on the embedded testbed"): one seed,
fewer steps and cells, the same sweep file and report."""

import csv

import pytest

from test_sweeps import multirun
from tip.report import report


@pytest.mark.slow
def test_reduced_reproduction_sweep_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun("sweeps=testbed_reproduction", "seed=0", "train.steps=8",
                    "cell=untrained,all@1.0,soft_or@0.5,soft_or_bottom@0.5,q3@0.1", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = report(sweep, "off")
    with (out / "table.csv").open() as fh:
        rows = {(r["rule"], float(r["keep"])): r for r in csv.DictReader(fh)}
    assert set(rows) == {("untrained", 0.0), ("all", 1.0), ("soft_or", 0.5), ("soft_or_bottom", 0.5), ("q3", 0.1)}
    assert all(int(r["seeds"]) == 1 for r in rows.values())
    # All-token OPD improves the student over the untrained baseline on the 512 held-out problems, by fixing the
    # inconsistent error (borrow); the confident one (carry) stays (docs/testbed.md, "The embedded testbed").
    untrained, all_tokens = (rows[k] for k in (("untrained", 0.0), ("all", 1.0)))
    assert float(all_tokens["embedded/accuracy"]) > float(untrained["embedded/accuracy"])
    assert float(all_tokens["embedded@borrow/accuracy"]) > float(untrained["embedded@borrow/accuracy"]) + 0.05
    assert float(all_tokens["embedded@carry/accuracy"]) < 0.05
    # Token fractions follow keep; each quadrant holds a share of the tokens.
    assert float(rows[("all", 1.0)]["kept_frac"]) == 1.0
    assert 0.4 < float(rows[("soft_or", 0.5)]["kept_frac"]) <= 0.5
    for q in ("q1", "q2", "q3", "q4"):
        assert float(rows[("all", 1.0)][f"{q}/frac"]) > 0.01
    md = (out / "table.md").read_text()
    assert "## The paper's claims" in md and "Soft-OR top-50% well above bottom-50%" in md
    assert "Q3 at 10% close to all-token" in md and "| embedded@borrow |" in md
    assert "entropy sampling at 10%" not in md  # its cells are not in this reduced sweep
    assert (out / "accuracy_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
