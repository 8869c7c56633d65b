"""`tip.report` on cells written as `tip.train` writes them: accuracy per error type and the claims read on it."""

import json

import yaml

from tip.sweep_cells import aggregate, find_cells
from tip.sweep_claims import claims_markdown


def _cell(root, name, cell, seed, after):
    (root / "multirun.yaml").write_text("hydra: {}\n")  # what Hydra's sweeper writes into a sweep directory
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"cell={cell}", f"seed={seed}"]))
    (d / "config.yaml").write_text(yaml.safe_dump({"cell": cell, "seed": seed, "train": {"steps": 12}}))
    (d / "status.json").write_text(json.dumps({"status": "completed"}))
    (d / "eval.json").write_text(json.dumps({"before": {}, "after": after}))


def test_accuracy_per_error_type_reaches_the_table_and_the_claims_on_the_confident_error(tmp_path):
    runs = {  # cell -> (overall, @carry, @borrow) per seed
        "untrained": [(0.30, 0.0, 0.25)] * 4,
        "entropy_sample@0.1": [(0.50, 0.0, 0.80), (0.52, 0.0, 0.84), (0.51, 0.0, 0.82), (0.53, 0.0, 0.86)],
        "q3@0.1": [(0.600, 0.30, 0.70), (0.605, 0.34, 0.72), (0.610, 0.32, 0.71), (0.615, 0.33, 0.73)],
        "all@1.0": [(0.605, 0.31, 0.90), (0.600, 0.33, 0.94), (0.612, 0.30, 0.92), (0.612, 0.35, 0.95)],
    }
    for i, (cell, seeds) in enumerate(runs.items()):
        for seed, (acc, carry, borrow) in enumerate(seeds):
            _cell(tmp_path, f"{i}{seed}", cell, seed,
                  {"embedded/accuracy": acc, "embedded/accuracy@carry": carry, "embedded/accuracy@borrow": borrow,
                   "embedded/n@carry": 10, "embedded/accuracy_std": 0.4})
    rows, benchmarks = aggregate(find_cells(tmp_path))
    assert benchmarks == ["embedded", "embedded@borrow", "embedded@carry"]
    q3 = next(r for r in rows if r["rule"] == "q3")
    assert abs(q3["embedded@carry/accuracy"] - 0.3225) < 1e-9 and abs(q3["embedded@borrow/accuracy"] - 0.715) < 1e-9
    md = claims_markdown(rows, benchmarks)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    # Both cells at 0% on the confident error: nothing can be read (this was "reproduced" when "close" was
    # |d| <= 2 SE, which two cells at 0% with SE 0 passed).
    unfixed = lines["entropy sampling at 10% leaves the confident error unfixed"]
    assert "embedded@carry" in unfixed and "entropy_sample@0.1 − untrained" in unfixed and unfixed.endswith(
        "| untestable (both at the floor) |")
    more = lines["Q3 at 10% fixes the confident error more than entropy sampling at 10%"]
    assert "+32.2" in more and "(paired)" in more and more.endswith("| reproduced |")
    # A claim on all problems is read on the overall accuracy and on the inconsistent error's problems.
    close = [line for line in md.splitlines() if line.startswith("| Q3 at 10% close to all-token")]
    assert len(close) == 2
    assert "| embedded |" in close[0] and close[0].endswith("| reproduced |")  # within 2 points, by TOST
    assert "| embedded@borrow |" in close[1] and "| -21.3 |" in close[1] and close[1].endswith("| not reproduced |")
    assert not any(line.startswith("| Soft-OR") for line in md.splitlines())  # its cells are absent


def test_close_is_an_equivalence_test_so_noise_no_longer_passes_it():
    """'close' was |d| <= 2 SE: a noisier cell passed more easily. Now the difference's interval must lie within
    the stated 2-point margin (TOST): equal means with a wide spread are inconclusive, a tight spread reproduces."""
    from tip.stats import difference
    from tip.sweep_claims import verdict_words

    same = {0: 0.6, 1: 0.6, 2: 0.6, 3: 0.6}
    noisy = {0: 0.40, 1: 0.80, 2: 0.45, 3: 0.75}  # mean 0.6, spread of 20 points
    tight = {0: 0.601, 1: 0.598, 2: 0.603, 3: 0.599}
    assert verdict_words([("close", difference(noisy, same), 0.02)]) == ["inconclusive"]
    assert verdict_words([("close", difference(tight, same), 0.02)]) == ["reproduced"]
    assert verdict_words([("close", None)]) == ["untestable"]


def test_shared_seeds_are_paired_and_many_claims_are_corrected_for():
    """Seed-to-seed noise both cells share cancels in paired differences; Holm's correction makes a claim that is
    significant alone inconclusive among many weaker ones."""
    from tip.stats import difference
    from tip.sweep_claims import verdict_words

    base = {s: 0.5 + 0.1 * (s % 3) for s in range(6)}  # large shared noise across seeds
    better = {s: v + 0.01 + 0.002 * (s % 2) for s, v in base.items()}
    paired = difference(better, base)
    assert paired.paired and paired.se < 0.002
    unpaired = difference(better, {s + 100: v for s, v in base.items()})  # no shared seeds: Welch
    assert not unpaired.paired and unpaired.se > 0.03
    assert verdict_words([("greater", paired)]) == ["reproduced"]
    assert verdict_words([("greater", unpaired)]) == ["inconclusive"]
    # one reading is a family of two tests (for and against it): p 0.008 alone is 0.016 after Holm
    borderline = difference({0: 0.53, 1: 0.55, 2: 0.52, 3: 0.56}, {0: 0.50, 1: 0.50, 2: 0.50, 3: 0.51})
    assert verdict_words([("greater", borderline)]) == ["reproduced"]
    weak = difference({0: 0.5, 1: 0.6, 2: 0.4, 3: 0.5}, {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5})
    assert verdict_words([("greater", borderline)] + [("greater", weak)] * 5)[0] == "inconclusive"


def test_tool_use_after_training_reaches_its_own_table(tmp_path):
    from tip.sweep_cells import markdown

    for i, (cell, share, malformed) in enumerate((("all@1.0", 0.0, 1.0), ("q3@0.2", 1.0, 0.0))):
        for seed in (0, 1):
            _cell(tmp_path, f"{i}{seed}", cell, seed,
                  {"embedded_agent/accuracy": 0.2, "embedded_agent/accuracy_std": 0.4,
                   "embedded_agent/with_tool_call": share, "embedded_agent/tool_calls": share + seed,
                   "embedded_agent/malformed_calls": malformed, "embedded_agent/turns": 2.0})
    cells = find_cells(tmp_path)
    rows, benchmarks = aggregate(cells)
    assert benchmarks == ["embedded_agent"]
    q3 = next(r for r in rows if r["rule"] == "q3")
    assert q3["embedded_agent/with_tool_call"] == 1.0 and q3["embedded_agent/tool_calls"] == 1.5
    md = markdown(tmp_path, rows, benchmarks, cells)
    assert "Tool use after training" in md
    assert "| q3 | 0.2 | 1.000 | 1.500 | 0.000 | 2.000 |" in md and "| all | 1 | 0.000 | 0.500 | 1.000 | 2.000 |" in md


def test_a_cell_is_read_from_what_it_ran_and_a_folder_of_unrelated_runs_is_refused(tmp_path):
    """The rule, keep and seed come from the run's own resolved config.yaml: a record in .hydra/overrides.yaml
    that says otherwise (as a refused rerun once rewrote it) does not relabel the cell."""
    import pytest

    _cell(tmp_path, "0", "all@1.0", 0, {"embedded/accuracy": 0.5})
    (tmp_path / "0" / "config.yaml").write_text(yaml.safe_dump(
        {"cell": "all@1.0", "seed": 0, "keep": 1.0, "selector": {"name": "all"}, "train": {"steps": 12}}))
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["cell=q3@0.1", "seed=3"]))
    cell, = find_cells(tmp_path)
    assert (cell.rule, cell.keep, cell.seed) == ("all", 1.0, 0)
    (tmp_path / "multirun.yaml").unlink()  # e.g. outputs/<date>: single runs side by side, not a sweep
    with pytest.raises(SystemExit, match="is not a sweep directory"):
        find_cells(tmp_path)


def test_the_statistics_edge_cases():
    """Issue 39: a constant paired difference is decided by its sign and size (it was dropped as
    untestable); one seed each is untestable; 'differ' needs its minimum effect; secondary readings
    do not dilute the primary family; 'close' scales with all-token's gain."""
    from tip.claims import by_exact
    from tip.stats import difference
    from tip.sweep_claims import Reading, untestable, verdict_words

    up = difference({0: 0.6, 1: 0.7, 2: 0.5}, {0: 0.5, 1: 0.6, 2: 0.4})  # +0.1 on every seed
    assert up.paired and up.se == 0
    assert untestable({0: 0.6, 1: 0.7, 2: 0.5}, {0: 0.5, 1: 0.6, 2: 0.4}) == ""
    assert verdict_words([("greater", up)]) == ["reproduced"]
    down = difference({0: 0.4, 1: 0.5}, {0: 0.5, 1: 0.6})
    assert verdict_words([("greater", down)]) == ["not reproduced"]
    assert verdict_words([("close", up, 0.2), ("close", up, 0.05)]) == ["reproduced", "not reproduced"]
    assert by_exact("differ", 0.01, margin=0.02, min_effect=0.05) == "not reproduced"
    assert untestable({0: 0.6}, {1: 0.4}) == "one seed, no spread"
    # differ: significant, but below the minimum effect, is not a difference
    small = difference({s: 0.501 + 0.0001 * s for s in range(8)}, {s: 0.5 for s in range(8)})
    assert verdict_words([Reading("differ", small, margin=0.01, min_effect=0.05)]) == ["not reproduced"]
    big = difference({s: 0.6 + 0.001 * (s % 2) for s in range(8)}, {s: 0.5 for s in range(8)})
    assert verdict_words([Reading("differ", big, margin=0.01, min_effect=0.05)]) == ["reproduced"]
    # a primary reading keeps its verdict however many secondary readings sit beside it
    strong = difference({0: 0.53, 1: 0.55, 2: 0.52, 3: 0.56}, {0: 0.50, 1: 0.50, 2: 0.50, 3: 0.51})
    weak = difference({0: 0.5, 1: 0.6, 2: 0.4, 3: 0.5}, {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5})
    beside = [Reading("greater", weak, primary=False)] * 6
    assert verdict_words([Reading("greater", strong)] + beside)[0] == "reproduced"
    assert verdict_words([Reading("greater", strong, primary=False)] + beside)[0] == "inconclusive"


def test_close_scales_with_all_tokens_gain(tmp_path):
    """'close' is within 20% of all-token's gain over the untrained student: the same 3-point gap is
    close where all-token gains 40 points and not where it gains 5; without an untrained cell it
    cannot be read."""
    def sweep(root, all_acc):
        runs = {"untrained": [0.30] * 4, "all@1.0": [all_acc + 0.002 * s for s in range(4)],
                "q3@0.1": [all_acc - 0.03 + 0.001 * (s % 2) for s in range(4)]}
        for i, (cell, seeds) in enumerate(runs.items()):
            for seed, acc in enumerate(seeds):
                _cell(root, f"{i}{seed}", cell, seed, {"embedded/accuracy": acc})
        md = claims_markdown(*aggregate(find_cells(root)))
        return next(line for line in md.splitlines() if line.startswith("| Q3 at 10% close"))

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    wide = sweep(tmp_path / "a", 0.70)   # gain 40 points: margin 8
    narrow = sweep(tmp_path / "b", 0.35)  # gain 5 points: margin 1
    assert "| 8.1 |" in wide and wide.endswith("| reproduced |")
    assert "| 1.1 |" in narrow and narrow.endswith("| not reproduced |")
    rows, benchmarks = aggregate(find_cells(tmp_path / "a"))
    md = claims_markdown([r for r in rows if r["rule"] != "untrained"], benchmarks)
    assert "untestable (no all-token and untrained cells to scale the margin)" in md
