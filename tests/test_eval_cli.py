"""`python -m tip.eval` end to end on CPU: metrics and per-problem records on disk."""

import json
import os
import shutil
import subprocess
import sys

from tip.models import EMBEDDED_MODELS

from support import DATA_ROOT, ROOT


def run_eval(run_dir, *overrides, check=True):
    cmd = [sys.executable, "-m", "tip.eval", f"hydra.run.dir={run_dir}", f"data_root={DATA_ROOT}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_embedded_task_with_the_papers_protocol(tmp_path):
    proc = run_eval(tmp_path, "model=embedded://teacher", "eval=embedded", "limit=12", "protocol=paper")
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["embedded/n"] == 12 and metrics["embedded/samples"] == 16
    assert metrics["embedded/accuracy"] > 0.7  # the teacher solves the task
    for key in ("accuracy_std", "pass@1", "pass@16", "maj@16"):
        assert f"embedded/{key}" in metrics
    rows = records(tmp_path / "embedded.jsonl")
    assert len(rows) == 12
    assert {"id", "answer", "completions", "extracted", "correct", "reasons"} <= set(rows[0])
    assert all(len(r["completions"]) == 16 == len(r["correct"]) for r in rows)
    assert "embedded" in proc.stdout and "accuracy" in proc.stdout  # the printed table


def test_five_math500_problems_and_a_list_of_benchmarks(tmp_path, needs_shared_data):
    # The embedded student has 256 positions, fewer than a MATH-500 prompt in its character tokens: a copy built
    # for more (RoPE positions) takes them; the student itself is refused (tests/test_refusals.py).
    model = tmp_path / "student"
    shutil.copytree(EMBEDDED_MODELS["student"][0], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    run_eval(tmp_path / "eval", f"model={model}", "eval=[embedded,math500]", "limit=5", "protocol=greedy",
             "eval.max_new_tokens=24")
    tmp_path = tmp_path / "eval"
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["math500/n"] == 5 and metrics["embedded/n"] == 5
    rows = records(tmp_path / "math500.jsonl")
    assert [r["id"] for r in rows] == [json.loads(line)["id"] for line in
                                       (needs_shared_data / "math500.jsonl").read_text().splitlines()[:5]]
    assert all(len(r["completions"]) == 1 and r["reasons"][0] for r in rows)


def test_existing_results_are_never_overwritten(tmp_path):
    run_eval(tmp_path, "eval=embedded", "limit=2", "protocol=greedy")
    before = (tmp_path / "metrics.json").read_bytes()
    proc = run_eval(tmp_path, "eval=embedded", "limit=2", "protocol=greedy", check=False)
    assert proc.returncode != 0 and "exists: a finished evaluation is never overwritten" in proc.stderr
    assert (tmp_path / "metrics.json").read_bytes() == before


def test_bad_protocol_value_is_one_clear_error(tmp_path):
    proc = run_eval(tmp_path, "eval=embedded", "eval.top_p=0", check=False)
    assert proc.returncode != 0 and "eval.top_p=0 is not allowed" in proc.stderr
