"""Sweeps end to end: the paper's sweep files, Hydra multiruns with the basic and the parallel (joblib) launcher,
a failing cell, `python -m tip.report` (table, CSV, PNG, W&B) and resuming a killed run from its checkpoint."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from matplotlib.image import imread

from tip.config import ConfigError, apply_cell, check_config
from tip.report import report
from tip.train import train

from support import CONF_DIR, DATA_ROOT, ROOT, compose_config
from wandb_records import history, records

SWEEPS = sorted(p.stem for p in (Path(CONF_DIR) / "sweeps").glob("*.yaml"))
# A cell in seconds: one step on 4 prompts, 8 held-out problems.
FAST = ["experiment=smoke", "train.steps=1", "eval.benchmarks.embedded.source.size=8", "train.save_final=false",
        f"data_root={DATA_ROOT}"]


def tip_env(home: Path | None = None) -> dict:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TOKENIZERS_PARALLELISM": "false"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "WANDB_API_KEY", "WANDB_MODE"):
        env.pop(var, None)
    if home is not None:  # no ~/.netrc with a W&B key: runs are offline
        home.mkdir(exist_ok=True)
        env["HOME"] = str(home)
    return env


def multirun(*overrides: str, env=None, timeout=900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tip.train", "-m", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env or tip_env(), capture_output=True, text=True, timeout=timeout)


def table_rows(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_file_lists_valid_cells_and_seeds(sweep):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"sweeps={sweep}", f"data_root={DATA_ROOT}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert sweep in cfg.hydra.sweep.dir  # the sweep directory (and W&B group) is named for the experiment
    # seeds 0-2 at least; an lr-grid sweep runs its grid at one seed, then seeds at each cell's lr
    assert len(str(params.seed).split(",")) >= (1 if "train.lr" in params else 3)
    cells = str(params.cell).split(",")
    assert "all@1.0" in cells  # the all-token baseline the report draws as a reference line
    for cell in cells:
        one = compose_config(f"cell={cell}", f"sweeps={sweep}")
        apply_cell(one)
        check_config(one)
        if cell == "untrained":
            assert one.train.steps == 0
            continue
        rule, rest = cell.split("@")
        keep, _, divergence = rest.partition("/")  # rule@keep/divergence: a rule with its source's loss
        assert one.selector.name == rule and one.keep == float(keep)
        assert one.divergence.name == (divergence or "reverse_kl")


def test_the_paper_cells_of_each_table():
    def cells(sweep):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"sweeps={sweep}"], return_hydra_config=True)
        return set(str(cfg.hydra.sweeper.params.cell).split(","))

    assert cells("table3_entropy_sampling") >= {"entropy_sample@0.5", "entropy_sample@0.2", "entropy_sample@0.1"}
    assert cells("table4_q3") >= {"q3@0.2", "q3@0.1"}
    assert cells("table5_main") >= {"entropy_sample@0.5", "entropy_sample@0.2", "soft_or@0.5", "soft_or@0.2"}
    assert cells("table6_top_vs_bottom") >= {"soft_or@0.5", "soft_or_bottom@0.5"}
    assert cells("table8_div_vs_q3") >= {"div_topk@0.5", "div_topk@0.1", "q3@0.1"}
    assert cells("quadrant_ablation") >= {"q1@0.2", "q2@0.2", "q3_only@0.2", "q4@0.2", "q3@0.2"}
    assert cells("testbed_reproduction") == {
        "untrained", "all@1.0", "entropy_sample@0.5", "entropy_sample@0.2", "entropy_sample@0.1", "soft_or@0.5",
        "soft_or@0.2", "soft_or_bottom@0.5", "q3@0.2", "q3@0.1", "div_topk@0.1", "random@0.5", "random@0.1",
        "q1@0.2", "q2@0.2", "q3_only@0.2", "q4@0.2"}


PAPER_SWEEPS = ["table3_entropy_sampling", "table4_q3", "table5_main", "table6_top_vs_bottom",
                "table7_agentic", "table8_div_vs_q3", "quadrant_ablation"]


@pytest.mark.parametrize("sweep", PAPER_SWEEPS)
def test_every_paper_sweep_has_random_tokens_at_each_keep_it_uses(sweep):
    """A rule's gain is read beside random@rho at the same keep (issue 39): at keep 0.1 random
    tokens got 82-88% of all-token's gain on testbed v2."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"sweeps={sweep}"], return_hydra_config=True)
    cells = str(cfg.hydra.sweeper.params.cell).split(",")
    keeps = {c.split("@")[1] for c in cells if "@" in c and not c.startswith(("all@", "random@"))}
    assert keeps and keeps <= {c.split("@")[1] for c in cells if c.startswith("random@")}


def test_the_gpu_sweep_composes_states_its_rule_and_plans_its_memory():
    """sweeps=gpu_central_claim (issue 39): an open pair, a per-cell lr grid at one seed, MATH-500 at
    mean@4 and GSM8K, its decision rule in the file; tip.plan accepts its experiment."""
    from tip.plan import estimate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["sweeps=gpu_central_claim", f"data_root={DATA_ROOT}"],
                      return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(str(params.cell).split(",")) == {
        "untrained", "all@1.0", "random@0.1", "entropy_sample@0.1", "q3@0.1", "soft_or@0.5",
        "soft_or_bottom@0.5"}
    assert len(str(params["train.lr"]).split(",")) == 4 and str(params.seed) == "0"
    assert list(cfg.eval.benchmarks) == ["math500", "gsm8k"] and cfg.eval.samples == 4
    assert cfg.pair.student == "Qwen/Qwen3-0.6B" and cfg.pair.teacher == "Qwen/Qwen3-1.7B"
    text = (Path(CONF_DIR) / "sweeps" / "gpu_central_claim.yaml").read_text()
    assert "Decision rule, fixed here before any run" in text and "P2 q3@0.1 above random@0.1" in text
    plan, _ = estimate(["experiment=gpu_central_claim", f"data_root={DATA_ROOT}"], gpus=8)
    assert 20e9 < plan.peak < 0.9 * 80e9  # vLLM's share, the step and the runtime fit an 80 GB GPU


@pytest.mark.slow
def test_an_lr_grid_is_one_override_and_the_report_tunes_each_cell(tmp_path):
    """A tiny lr-grid sweep on the embedded pair: every cell runs at every lr, and the report prints
    each cell at the shared lr and at its own lr, chosen on the dev half of the problems."""
    from tip.sweep_cells import find_cells
    from tip.sweep_tuning import half_accuracy

    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "tip.train", "sweeps=table4_q3", "cell=all@1.0,q3@0.2",
                           "seed=0", "train.lr=1e-5,3e-4", "logger=none", *FAST,
                           "eval.benchmarks.embedded.source.size=32", "eval.limit=32",
                           f"hydra.sweep.dir={sweep}"],
                          cwd=ROOT, env=tip_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = find_cells(sweep)
    assert sorted((c.rule, c.lr) for c in cells) == [("all", 1e-5), ("all", 3e-4), ("q3", 1e-5),
                                                     ("q3", 3e-4)]
    assert all(len(c.problems["embedded"]) == 32 for c in cells)
    text = (report(sweep, "off") / "table.md").read_text()
    assert "## Every cell at its own learning rate" in text and "The shared lr is" in text
    for rule in ("all", "q3"):
        mine = [c for c in cells if c.rule == rule]
        dev = {c.lr: half_accuracy(c, "embedded", "dev", 0) for c in mine}
        best = min(lr for lr, v in dev.items() if v == max(dev.values()))
        test = next(half_accuracy(c, "embedded", "test", 0) for c in mine if c.lr == best)
        row = next(line for line in text.splitlines() if line.startswith(f"| {rule}@"))
        assert f"| {best:g} | {100 * test:.1f} ± 0.0 |" in row


@pytest.mark.parametrize("cell, message", [
    ("q3", "expected '<selector>@<keep>'"),
    ("nope@0.1", "cell selector='nope' is not allowed: expected one of"),
    ("q3@lots", "'lots' is not a number"),
])
def test_a_bad_cell_names_itself(cell, message):
    cfg = compose_config(f"cell={cell}")
    with pytest.raises(ConfigError, match=message):
        apply_cell(cfg)


def test_untrained_cell_is_the_student_without_steps():
    cfg = compose_config("cell=untrained")
    apply_cell(cfg)
    assert cfg.train.steps == 0 and cfg.selector.name == "all"


@pytest.mark.slow
def test_a_sweep_file_is_a_multirun_without_m_from_any_working_directory(tmp_path):
    """Sweep files declare hydra.mode=MULTIRUN; conf/ and sweeps/ are found from the checkout, not the cwd."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "tip.train", "sweeps=table4_q3", "cell=all@1.0,q3@0.2", "seed=0",
                           "logger=none", *FAST, f"hydra.sweep.dir={sweep}"],
                          cwd=elsewhere, env=tip_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert all(json.loads((sweep / n / "status.json").read_text())["status"] == "completed" for n in "01")


# slow (48 s): test-fast keeps under 5 minutes; a multirun and its report also run in the slow lr-grid test
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "parallel"])
def test_a_2x2_multirun_and_its_report(launcher, tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun(*FAST, "logger=none", "cell=all@1.0,q3@0.2", "seed=0,1", f"hydra/launcher={launcher}",
                    f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in range(4):
        assert json.loads((sweep / str(n) / "status.json").read_text())["status"] == "completed"
    out = report(sweep, "off")
    rows = table_rows(out / "table.csv")
    assert [(r["rule"], float(r["keep"]), int(r["seeds"])) for r in rows] == [("all", 1.0, 2), ("q3", 0.2, 2)]
    assert float(rows[0]["kept_frac"]) == 1.0 and 0.1 < float(rows[1]["kept_frac"]) <= 0.2
    for r in rows:  # mean and std over the two seeds, from the cells' own eval.json
        accs = [json.loads((sweep / str(n) / "eval.json").read_text())["after"]["embedded/accuracy"]
                for n in range(4) if (n < 2) == (r["rule"] == "all")]
        assert float(r["embedded/accuracy"]) == pytest.approx(sum(accs) / 2)
        assert float(r["embedded/accuracy_std"]) == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    md = (out / "table.md").read_text()
    assert "| rule | keep | tokens kept | effective | kept Q1/Q2/Q3/Q4 | embedded (%) |" in md
    assert md.count("| completed |") == 4
    image = imread(out / "accuracy_vs_tokens.png")
    assert (out / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.05  # something was drawn
    assert len(table_rows(out / "cells.csv")) == 4


@pytest.mark.slow
def test_a_failing_cell_does_not_stop_the_sweep_and_the_report_reaches_wandb(tmp_path):
    sweep = tmp_path / "sweep"
    # keep=1.5 fails its config check; it runs first, and the cell after it still runs.
    proc = multirun(*FAST, "logger=wandb", "cell=q3@1.5,q3@0.2", f"hydra.sweep.dir={sweep}",
                    env=tip_env(tmp_path / "home"))
    assert proc.returncode != 0  # Hydra reports the failed cell at the end of the sweep
    assert "keep=1.5 is not allowed" in proc.stderr
    assert json.loads((sweep / "1" / "status.json").read_text())["status"] == "completed"
    failed = json.loads((sweep / "0" / "status.json").read_text())
    assert failed["status"] == "failed"
    assert "keep=1.5 is not allowed: expected a number in (0.0, 1.0]" in failed["error"]

    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path / "home")
    try:
        out = report(sweep)  # auto: the cells logged to W&B, so the report does too
    finally:
        os.environ["HOME"] = old_home
    md = (out / "table.md").read_text()
    assert "| q3 | 0.2 |" in md and "(+1 failed)" in md
    assert "| 0 | " in md and "| failed |" in md and "keep=1.5 is not allowed" in md

    cell_run, = (sweep / "1").glob("wandb/offline-run-*/run-*.wandb")
    report_run, = out.glob("wandb/offline-run-*/run-*.wandb")
    group = {p: next(r.run.run_group for r in records(p) if r.WhichOneof("record_type") == "run")
             for p in (cell_run, report_run)}
    assert group[cell_run] == group[report_run] == "sweep"  # the report sits in the sweep's group
    logged = {k: v for row in history(report_run) for k, v in row.items()}  # nested keys joined with "/"
    assert logged["results/_type"] == "table-file" and logged["accuracy_vs_tokens/_type"] == "image-file"
    table = json.loads((report_run.parent / "files" / logged["results/path"]).read_text())
    by_keep = {row[table["columns"].index("keep")]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert by_keep[0.2]["rule"] == "q3" and by_keep[0.2]["seeds"] == 1
    assert by_keep[1.5]["failed"] == 1 and by_keep[1.5]["seeds"] == 0
    assert (report_run.parent / "files" / logged["accuracy_vs_tokens/path"]).read_bytes()[:4] == b"\x89PNG"


RESUMABLE = ["experiment=smoke", "selector=entropy_sample", "keep=0.5", "train.steps=6", "train.checkpoint_every=2",
             "train.max_checkpoints=2", "logger=none", "train.save_final=false"]


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint_and_matches_an_uninterrupted_one(tmp_path):
    whole = train(compose_config(*RESUMABLE), tmp_path / "whole")

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tip.train", *RESUMABLE, f"data_root={DATA_ROOT}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=tip_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: as a node failure would leave it
    proc.wait()
    killed_at = max(json.loads(line).get("step", 0) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert 2 <= killed_at < 6, killed_at

    resumed = train(compose_config(*RESUMABLE), run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resume, = [r for r in rows if r["kind"] == "resume"]
    assert resume["step"] in (2, 4)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # each step once
    assert [r["when"] for r in rows if r["kind"] == "eval"] == ["before", "after"]
    assert (run_dir / "metrics.attempt-1.jsonl").is_file()  # the killed attempt's log is kept aside
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000004", "step_000006"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"

    # Same rollouts, same selection draws, same optimizer state: the resumed run is the uninterrupted one.
    expect = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    for got, want in zip([r for r in rows if r["kind"] == "train"], [r for r in expect if r["kind"] == "train"]):
        assert got["kept_tokens"] == want["kept_tokens"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7)
    assert resumed == whole


def test_a_run_directory_with_another_config_is_refused(tmp_path):
    cfg = compose_config("experiment=smoke", "train.steps=1", "logger=none", "train.save_final=false")
    train(cfg, tmp_path / "run")
    (tmp_path / "run" / "status.json").unlink()  # as if it had died before finishing
    other = compose_config("experiment=smoke", "train.steps=1", "logger=none", "train.save_final=false", "seed=1")
    refusal = (r"holds an unfinished run with another config \(data.source.seed: 0 there, 1 now; seed: 0 there, 1 "
               r"now\)\. To resume it, rerun with its values")
    with pytest.raises(FileExistsError, match=refusal):
        train(other, tmp_path / "run")
