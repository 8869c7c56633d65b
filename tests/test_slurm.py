"""A 2-cell sweep through hydra/launcher=slurm on a real single-node SLURM (slurmctld + slurmd + munge), with one
cell preempted mid-run: submitit requeues it and it resumes from its last checkpoint."""

import json
import subprocess
import time

import pytest
import yaml

from test_sweeps import tip_env

import slurm_cluster
from support import DATA_ROOT, ROOT


@pytest.fixture(scope="module")
def slurm():
    reason = slurm_cluster.start()
    if reason:
        pytest.skip(f"no SLURM on this machine: {reason}")
    yield
    slurm_cluster.stop()


def _job_of(cell_dir) -> str | None:
    """The SLURM job id (array_task) that runs a cell, from the hydra job config submitit wrote there."""
    hydra_cfg = cell_dir / ".hydra" / "hydra.yaml"
    return str(yaml.safe_load(hydra_cfg.read_text())["hydra"]["job"]["id"]) if hydra_cfg.is_file() else None


@pytest.mark.slow
def test_a_two_cell_sweep_on_slurm_with_a_preempted_cell_that_resumes(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = ["experiment=smoke", "eval.benchmarks.embedded.source.size=8", "train.save_final=false",
                 "logger=none", "train.steps=8", "train.checkpoint_every=2", f"data_root={DATA_ROOT}",
                 "cell=all@1.0,q3@0.2", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
                 "hydra.launcher.gpus_per_node=null", "hydra.launcher.tasks_per_node=1",
                 "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20",
                 f"hydra.sweep.dir={sweep}"]
    cmd = ["python", "-m", "tip.train", "-m", *overrides]
    driver = subprocess.Popen(cmd, cwd=ROOT, env=tip_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        # Preempt cell 0 once its first checkpoint exists: submitit catches USR2, requeues the job, and the same
        # cell starts again in the same directory.
        deadline = time.time() + 600
        while not (sweep / "0" / "checkpoints" / "latest").exists() and time.time() < deadline:
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            time.sleep(0.1)
        job = _job_of(sweep / "0")
        assert job, "cell 0 has no SLURM job id"
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        out, _ = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-4000:]
    for n in (0, 1):
        assert json.loads((sweep / str(n) / "status.json").read_text())["status"] == "completed", n
        rows = [json.loads(line) for line in (sweep / str(n) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))
        assert (sweep / str(n) / "eval.json").is_file()
    resumed = [json.loads(line) for line in (sweep / "0" / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 2, resumed
    assert (sweep / "0" / "metrics.attempt-1.jsonl").is_file()
    # Both cells ran as SLURM jobs of one array (submitit's layout).
    assert len(list((sweep / ".submitit").iterdir())) >= 2
