"""A careless user loses nothing: typos are refused with the options, a refused run changes no file of
an existing run, one run holds a directory at a time, and every error is one line before any model loads."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from test_sweeps import tip_env
from tip.config import ConfigError, apply_cell, check_config, check_overrides, check_site_dir
from tip.data import DataError, load_examples
from tip.distributed import key_extensions_cache
from tip.plan import main as plan_main
from tip.rundir import RunDirError, decide_resume

from support import ROOT, compose_config


def tip(*args: str, module: str = "tip.train", env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env or tip_env(),
                          capture_output=True, text=True, timeout=timeout)


def files_of(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. A typo in a group fails with the group's options (an optional default would skip it silently).

@pytest.mark.parametrize("override,group", [("experiment=smok", "experiment"), ("sweeps=table5", "sweeps")])
def test_a_typo_in_a_group_fails_with_its_options(override, group):
    with pytest.raises(ConfigCompositionException, match=rf"(?s)Could not find '{group}/.*Available options"):
        compose_config(override)


def test_a_site_file_no_config_reads_is_refused_naming_the_right_one(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    check_site_dir(local)  # empty: nothing to say
    (local / "slurm.yaml").write_text("partition: gpu\n")
    check_site_dir(local)
    (local / "slurm.yml").write_text("partition: gpu\n")
    with pytest.raises(ConfigError, match=r"slurm.yml is not read by any config; the site files are .*slurm.yaml"):
        check_site_dir(local)


# 4. Nothing is silently ignored: additions no one reads, a cell beside what it replaces.

@pytest.mark.parametrize("overrides,message", [
    (["+train.step=5"], r"\+train.step=5 is not allowed: train has no key 'step'.*takes .*steps"),
    (["++train.step=5"], r"\+\+train.step=5 is not allowed: train has no key 'step'"),
    (["+foo=1"], r"\+foo=1 is not allowed: there is no top-level key 'foo'"),
    (["~train.lr"], r"~train.lr is not allowed: it removes train.lr"),
    (["cell=q3@0.1", "selector=soft_or", "keep=0.5"], r"cell=q3@0.1 is not allowed beside keep, selector"),
    (["cell=q3@0.1", "selector=entropy_jsd_sample", "selector.jsd_gamma=2"],
     r"cell=q3@0.1 is not allowed beside selector, selector.jsd_gamma"),
])
def test_overrides_that_nothing_would_read_are_refused(overrides, message):
    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError, match=message):
        check_overrides(cfg, overrides)


def test_what_may_be_added_or_overridden_still_runs():
    for overrides in (["++train.steps=3"], ["+pair.chat_template_kwargs.enable_thinking=false"],
                      ["cell=q3@0.1", "seed=2"], ["selector=q3", "keep=0.1"]):
        cfg = compose_config(*overrides)
        check_overrides(cfg, overrides)
        apply_cell(cfg)
        check_config(cfg)


def test_a_rule_takes_only_the_parameters_of_its_own_file():
    cfg = compose_config("selector=q3", "+selector.entropy_alpha=2")
    with pytest.raises(ConfigError, match=r"selector.entropy_alpha=2 is not allowed: selector=q3 has no parameter "
                                          r"'entropy_alpha'; it takes none"):
        check_config(cfg)


# 5 and 7. Every check before the op build and any model load, each one line.

ONE_LINE_CASES = [
    ("keep=0", "keep=0 is not allowed"),
    pytest.param("pair.teacher=/no/such/teacher", "pair.teacher='/no/such/teacher' is not allowed: /no/such/teacher "
                 "is not a folder", marks=pytest.mark.slow),
    pytest.param("seed=abc", "seed='abc' is not allowed: expected an integer", marks=pytest.mark.slow),
    pytest.param("precision=fp16", "precision='fp16' is not allowed: DeepSpeed has no fp16 on the CPU",
                 marks=pytest.mark.slow),
    pytest.param("rollout=vllm rollout.vllm_python=/no/python",
                 "rollout.vllm_python='/no/python' is not an interpreter; on CPU, `make vllm-env`",
                 marks=pytest.mark.slow),
    pytest.param("+train.step=5", "train has no key 'step'", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("overrides,message", ONE_LINE_CASES)
def test_bad_values_fail_in_one_line_before_the_op_build_and_any_model(tmp_path, overrides, message):
    """Each command would otherwise fail only after DeepSpeed's op build (60-160 s on a cold cache) and after
    one or both models load. An empty extensions folder shows that no op is built (or loaded) before."""
    env = {**tip_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "no_ops_yet")}
    t0 = time.monotonic()
    out = tip(*overrides.split(), "logger=none", f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert out.returncode == 2, (out.stdout[-1000:], out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in out.stderr and "built successfully" not in out.stdout
    assert time.monotonic() - t0 < 60
    assert not any((tmp_path / "no_ops_yet").glob("**/*.so"))
    # the refusal is recorded in the new run directory (a sweep's report shows the cell and why)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and message in status["error"]


def test_vllm_is_looked_for_in_the_interpreter_named(tmp_path):
    """Every virtual environment's python links to the same base interpreter: resolving the link took another
    environment (.venv-vllm) for the trainer's own and refused it for lacking vLLM."""
    import importlib.util

    from tip.vllm_worker import missing_vllm

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    python = tmp_path / "env" / "bin" / "python"
    assert missing_vllm(str(python)) == f"{python} has no vllm"
    site, = (tmp_path / "env" / "lib").glob("python3*/site-packages")
    (site / "vllm").mkdir()
    (site / "vllm" / "__init__.py").write_text("")  # a stand-in package: only its presence is asked
    assert missing_vllm(str(python)) == ""
    assert (missing_vllm(None) == "") == (importlib.util.find_spec("vllm") is not None)
    assert missing_vllm("/no/python") == "rollout.vllm_python='/no/python' is not an interpreter"


def test_model_paths_contexts_and_run_directories_are_checked_without_loading(tmp_path):
    """The checks the command lines below run, in process (test-fast): a local path is never a hub id, a request
    beyond the model's positions is refused with both numbers, a run directory that is a file is refused."""
    from tip.config import check_output_dirs
    from tip.models import PairError, check_model_ref, looks_local, refuse_beyond_context

    assert looks_local("/models/x") and looks_local("./x") and looks_local("a/b/c") and not looks_local("org/name")
    with pytest.raises(PairError, match=r"pair.teacher='/no/such' is not allowed: /no/such is not a folder"):
        check_model_ref("pair.teacher", "/no/such")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairError, match="holds no config.json"):
        check_model_ref("model", str(tmp_path / "empty"))
    check_model_ref("pair.student", "embedded://student")
    refuse_beyond_context("model", "embedded://student", [("the longest prompt", 200, 56, "eval.max_new_tokens")])
    with pytest.raises(PairError, match=r"eval.max_new_tokens=57 is not allowed with model=embedded://student: the "
                                        r"longest prompt has 200 tokens, so a request needs 257 positions and the "
                                        r"model has 256 \(max_position_embeddings\); eval.max_new_tokens can be at "
                                        r"most 56"):
        refuse_beyond_context("model", "embedded://student", [("the longest prompt", 200, 57, "eval.max_new_tokens")])
    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError, match=r"hydra.run.dir='.*notes.txt' is not allowed: it is a file"):
        check_output_dirs([f"hydra.run.dir={tmp_path / 'notes.txt'}"])
    check_output_dirs([f"hydra.run.dir={tmp_path / 'new'}", "keep=0.1"])


@pytest.mark.slow
def test_a_run_directory_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    out = tip(f"hydra.run.dir={tmp_path / 'notes.txt'}", timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: hydra.run.dir='{tmp_path / 'notes.txt'}' is not allowed: it is a file; expected a directory "
        "(new, or a run's own)")
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


@pytest.mark.slow
def test_a_model_path_is_never_tried_as_a_hub_id_and_eval_names_its_own_key(tmp_path):
    out = tip("model=/no/such/model", f"hydra.run.dir={tmp_path / 'eval'}", module="tip.eval", timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: model='/no/such/model' is not allowed: /no/such/model is not a folder; "
                                  "expected a local model folder in HF format, a hub id (org/name), or "
                                  "embedded://NAME")


@pytest.mark.slow
def test_a_request_longer_than_the_models_context_is_refused_before_generating(tmp_path):
    """The embedded student has 256 positions; 8,192 new tokens asked of it ran for over 10 minutes."""
    out = tip("model=embedded://student", "eval.max_new_tokens=1000", f"hydra.run.dir={tmp_path / 'eval'}",
              module="tip.eval", timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    line, = out.stderr.strip().splitlines()[-1:]
    assert "eval.max_new_tokens=1000 is not allowed with model=embedded://student" in line
    assert "the model has 256 (max_position_embeddings)" in line and "needs 10" in line
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_data_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"problem": "1+1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match=rf"{path}:2 is not UTF-8 text \(byte 0xe9 at column 17\)"):
        load_examples({"kind": "jsonl", "path": str(path), "fields": {"problem": "problem", "answer": "answer"}})


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_the_plan_refuses_a_gpu_without_memory(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        plan_main(["--gpu-gb", value, "experiment=smoke"])
    assert exit_.value.code == 2
    assert f"--gpu-gb={float(value):g} is not allowed: a GPU's memory in GB, above 0" in capsys.readouterr().err


def test_the_plan_needs_no_benchmark_files_when_the_prompt_length_is_given(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert plan_main(["--prompt-tokens", "2048", "experiment=paper_qwen3_8b_to_4b",
                      "data_root=/nonexistent"]) == 0
    assert "(prompt: --prompt-tokens)" in capsys.readouterr().out


# 6. A refused resume says which keys differ, compares only what changes the run, and says what to do.

def test_a_refused_resume_names_the_keys_that_differ_and_ignores_where_files_are(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')  # an unfinished attempt
    (run / "config.yaml").write_text("seed: 0\ndata_root: /data/a\nlogger:\n  name: jsonl\ntrain:\n  lr: 0.001\n")
    before = files_of(run)
    same = decide_resume(run, "seed: 0\ndata_root: /elsewhere\nlogger:\n  name: wandb\ntrain:\n  lr: 0.001\n")
    assert same.prior_attempt and same.checkpoint is None  # resumes: only where data and metrics live changed
    with pytest.raises(RunDirError) as refusal:
        decide_resume(run, "seed: 1\ndata_root: /data/a\nlogger:\n  name: jsonl\ntrain:\n  lr: 0.01\n")
    message = str(refusal.value)
    assert "seed: 0 there, 1 now; train.lr: 0.001 there, 0.01 now" in message
    assert "To resume it, rerun with its values (seed=0 train.lr=0.001)" in message
    assert f"hydra.run.dir={tmp_path / 'run-2'}" in message
    assert files_of(run) == before


# 9. Where things are and what is happening.

def test_the_op_cache_is_keyed_by_the_environment(monkeypatch, tmp_path):
    env: dict = {}
    key_extensions_cache(env)
    first = env["TORCH_EXTENSIONS_DIR"]
    key_extensions_cache(env)
    assert env["TORCH_EXTENSIONS_DIR"] == first and Path(first).name.startswith("tip-cpu-")
    again: dict = {}
    key_extensions_cache(again)
    assert again == env  # the same environment finds its own build again
    chosen = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    key_extensions_cache(chosen)
    assert chosen == {"TORCH_EXTENSIONS_DIR": str(tmp_path)}  # the user's choice stands


def test_the_microscope_help_succeeds(capsys):
    from tip.microscope import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0  # asked for: success (it exited 1)
    assert capsys.readouterr().out.startswith("usage: python -m tip.microscope <run dir>")


@pytest.mark.slow
def test_a_resume_with_another_config_is_refused_before_the_op_build(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')  # an unfinished attempt
    (run / "config.yaml").write_text("seed: 5\n")
    before = files_of(run)
    env = {**tip_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "no_ops_yet")}
    out = tip("logger=none", f"hydra.run.dir={run}", env=env)
    assert out.returncode == 2 and "holds an unfinished run with another config" in out.stderr
    assert "seed: 5 there, 0 now" in out.stderr and "built successfully" not in out.stdout
    assert not any((tmp_path / "no_ops_yet").glob("**/*.so")) and files_of(run) == before


# 2 and 3. Refused reruns change no file; one run per directory; a killed run resumes.

SMOKE = ("experiment=smoke", "logger=none", "train.save_final=false", "train.eval_before=false")


@pytest.mark.slow
def test_a_refused_rerun_into_a_finished_run_changes_no_file(tmp_path):
    run = tmp_path / "run"
    out = tip(*SMOKE, f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run / "train.log").read_text().count("step    2") == 1  # the console, kept
    assert (run / ".hydra" / "overrides.yaml").is_file()
    before = files_of(run)
    for rerun in ([*SMOKE], [*SMOKE, "selector=q3", "keep=0.1"]):
        out = tip(*rerun, f"hydra.run.dir={run}")
        assert out.returncode == 2 and "already holds a finished run" in out.stderr
        assert "built successfully" not in out.stdout  # refused before the op loads
        assert files_of(run) == before


@pytest.mark.slow
def test_a_refused_rerun_into_a_finished_sweep_changes_no_file_and_no_report(tmp_path):
    sweep = tmp_path / "sweep"
    cells = ("train.steps=1", "cell=all@1.0,q3@0.1", f"hydra.sweep.dir={sweep}")
    out = tip("-m", *SMOKE, *cells)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"sweep directory: {sweep}" in out.stdout and f"python -m tip.report {sweep}" in out.stdout
    report = tip(str(sweep), module="tip.report")
    assert report.returncode == 0, report.stderr[-2000:]
    table = (sweep / "report" / "table.csv").read_text()
    assert "q3" in table and "all" in table
    before = files_of(sweep)
    for rerun, message in (((*SMOKE, *cells), "every cell of the sweep"),
                           ((*SMOKE, "train.steps=1", "cell=soft_or@0.5,q3@0.1", f"hydra.sweep.dir={sweep}"),
                            "holds another sweep (cell: all@1.0,q3@0.1 there, soft_or@0.5,q3@0.1 now)")):
        out = tip("-m", *rerun)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
        assert files_of(sweep) == before
    assert tip(str(sweep), module="tip.report").returncode == 0
    assert (sweep / "report" / "table.csv").read_text() == table
    out = tip(str(sweep.parent), module="tip.report")  # a folder of runs, not a sweep
    assert out.returncode != 0 and "is not a sweep directory" in out.stderr


def _wait_for(path: Path, what, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and what(path.read_text()):
            return
        time.sleep(0.5)
    raise AssertionError(f"{path} never showed what was awaited")


@pytest.mark.slow
def test_one_run_per_directory_and_a_stopped_or_killed_run_resumes(tmp_path):
    run = tmp_path / "run"
    long = (*SMOKE, "train.steps=30", "train.checkpoint_every=4", f"hydra.run.dir={run}")
    first = subprocess.Popen([sys.executable, "-m", "tip.train", *long], cwd=ROOT, env=tip_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "metrics.jsonl", lambda text: '"step": 2' in text)
        # The same command again (launched twice, or requeued while the old job runs): refused at once...
        second = tip(*long)
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr[-2000:]
        assert "is in use by a run that is still going" in second.stderr
        assert first.poll() is None
        first.communicate(timeout=600)
    finally:
        first.kill()
    # ... and the first finishes intact: every step once, in one attempt.
    assert first.returncode == 0
    assert json.loads((run / "status.json").read_text()) == {"status": "completed", "attempt": 1}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 31))
    assert not list(run.glob("metrics.attempt-*")) and not (run / "failures").exists()

    # Stopped with SIGTERM (scancel, a time limit; one process, no launcher): recorded as interrupted.
    run = tmp_path / "stopped"
    long = (*long[:-1], f"hydra.run.dir={run}")
    stopped = subprocess.Popen([sys.executable, "-m", "tip.train", *long], cwd=ROOT, env=tip_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(run / "metrics.jsonl", lambda text: '"step": 5' in text)
        stopped.send_signal(signal.SIGTERM)
        stopped.wait(timeout=120)
    finally:
        stopped.kill()
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    # Resumed, then killed with -9 (nothing can clean up): the kernel drops the lock with the process.
    resumed = subprocess.Popen([sys.executable, "-m", "tip.train", *long], cwd=ROOT, env=tip_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(run / "status.json", lambda text: '"attempt": 2' in text)
        _wait_for(run / "metrics.jsonl", lambda text: text.count('"kind": "train"') >= 10)
    finally:
        resumed.kill()
        resumed.wait()
    out = tip(*long)
    assert out.returncode == 0, out.stderr[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["attempt"] == 3 and status["resumed_from_step"] >= 8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 31))
    assert (run / "train.log").read_text().count("attempt of") == 3
