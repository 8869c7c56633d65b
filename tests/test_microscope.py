"""python -m tip.microscope: the token microscope page, checked as a file and in a real headless browser."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from browser import chromium, rendered_body, screenshot
from tip.microscope import compare_rules
from tip.sweep_cells import find_cells
from tip.sweep_plots import kept_share_series, plot_kept_shares
from tip.token_records import read_token_records
from tip.train import train

from support import ROOT, compose_config


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A smoke run (token records at both steps), then the page of its last step through the command line."""
    run_dir = tmp_path_factory.mktemp("inspect") / "run"
    train(compose_config("experiment=smoke", "logger=none", "train.save_final=false", "train.eval_before=false",
                         "eval.benchmarks.embedded.source.size=4"), run_dir)
    out = subprocess.run([sys.executable, "-m", "tip.microscope", str(run_dir)], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    path = run_dir / "microscope" / "step_000002.html"
    assert out.stdout.strip() == str(path)
    return run_dir, path


def _data(path):
    text = path.read_text()
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1))


def test_the_page_is_self_contained_and_holds_every_record(page):
    run_dir, path = page
    text = path.read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)  # nothing fetched: no network needed
    assert set(re.findall(r"https?://[^\s\"']+", text)) <= {"http://www.w3.org/2000/svg"}
    cols, meta = read_token_records(run_dir, 2)
    data = _data(path)
    assert data["tokens"]["token"] == cols["token"] and data["tokens"]["kept"] == [int(k) for k in cols["kept"]]
    assert data["logged_steps"] == [1, 2] and [s["step"] for s in data["steps"]] == [1, 2]
    expected = compare_rules(cols, meta, [0.1, 0.2, 0.5])
    for rule, by_keep in expected.items():
        for keep, flags in by_keep.items():
            assert data["comparison"][rule][keep] == "".join("1" if f else "0" for f in flags)


def test_bad_arguments_are_refused_by_name(page):
    run_dir, _ = page
    for args, message in ((["step=7"], "step=7 has no token records in .*; recorded steps: 1, 2"),
                          (["stp=2"], "'stp=2' is not allowed"), (["keeps=0,0.2"], "keeps='0,0.2' is not allowed")):
        out = subprocess.run([sys.executable, "-m", "tip.microscope", str(run_dir), *args], capture_output=True,
                             text=True, cwd=ROOT)
        assert out.returncode != 0 and re.search(message, out.stderr), out.stderr


@pytest.mark.slow
def test_the_page_renders_in_a_real_browser(page, tmp_path):
    browser, why = chromium()
    if browser is None:
        pytest.skip(why)
    _, path = page
    data = _data(path)
    n, kept = len(data["tokens"]["token"]), sum(data["tokens"]["kept"])
    body = rendered_body(browser, path)
    assert body.get("status") == "ready", body  # no script error (it would set status=error and the message)
    assert int(body["tokens"]) == n and int(body["selected"]) == kept
    # The comparison table's last column ("agrees") is not hidden under the Signals panel beside it.
    assert body["overlaps"] == "0", body
    # A link that picks another rule outlines that rule's tokens.
    q3 = data["comparison"]["q3"]["0.2"].count("1")
    body = rendered_body(browser, path, "#rule=q3&keep=0.2")
    assert body.get("status") == "ready" and int(body["selected"]) == q3 != kept
    import matplotlib.image

    pixels = matplotlib.image.imread(screenshot(browser, path, tmp_path / "page.png"))[..., :3]
    assert pixels.std() > 0.05 and (pixels.mean(-1) < 0.9).mean() > 0.05  # not blank: text, colours, plots


def test_the_report_plots_each_quadrants_kept_share_per_rule(page, tmp_path):
    """A sweep of two cells (written as tip.train writes them) gives one line per rule per quadrant."""
    import shutil

    run_dir, _ = page
    sweep = tmp_path / "sweep"
    for i, cell in enumerate(("soft_or@0.5", "q3@0.2")):
        d = sweep / str(i)
        shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("tokens", "microscope", "checkpoints"))
        (d / ".hydra").mkdir(exist_ok=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- cell={cell}\n")
        config = yaml.safe_load((d / "config.yaml").read_text())  # the report reads what the cell ran
        config["selector"]["name"], config["keep"] = cell.split("@")[0], float(cell.split("@")[1])
        (d / "config.yaml").write_text(yaml.safe_dump(config))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    series = kept_share_series(find_cells(sweep))
    assert sorted(series) == ["q3@0.2", "soft_or@0.5"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [(r["step"], r["q3/of_kept"]) for r in rows if r["kind"] == "train"]
    assert [s for s, _ in series["q3@0.2"]["q3"]] == [s for s, _ in want]
    assert [v for _, v in series["q3@0.2"]["q3"]] == pytest.approx([v for _, v in want])
    plot_kept_shares(find_cells(sweep), "sweep", tmp_path / "shares.png")
    assert (tmp_path / "shares.png").stat().st_size > 10_000
