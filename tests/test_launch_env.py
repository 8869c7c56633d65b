"""Process environment for multi-node runs, from SLURM's variables as srun and submitit set them (2 nodes x 2
tasks), without a cluster: the environment is what a launcher hands a process."""

from pathlib import Path

import pytest

from tip.distributed import prepare_process_env, slurm_hostnames, slurm_master_port

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SUBMITIT_EXECUTOR", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NUM_NODES",
               "SLURM_NNODES", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID", "SLURM_NODEID")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; afterwards the environment exactly as before (prepare_process_env and submitit
    write os.environ themselves, which monkeypatch would not undo)."""
    import os

    saved = dict(os.environ)
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def slurm_task(env, proc_id: int, job_id="123456", nodes="gpu[07-08]"):
    """What SLURM sets for task ``proc_id`` of a 2-node x 2-task job."""
    env.setenv("SLURM_JOB_ID", job_id)
    env.setenv("SLURM_NTASKS", "4")
    env.setenv("SLURM_JOB_NUM_NODES", "2")
    env.setenv("SLURM_JOB_NODELIST", nodes)
    env.setenv("SLURM_PROCID", str(proc_id))
    env.setenv("SLURM_LOCALID", str(proc_id % 2))
    env.setenv("SLURM_NODEID", str(proc_id // 2))


def test_slurm_node_lists_expand():
    assert slurm_hostnames("gpu[07-08,10],login1") == ["gpu07", "gpu08", "gpu10", "login1"]
    assert slurm_hostnames("node1") == ["node1"]
    assert slurm_hostnames("a[1-2],b[09-10]") == ["a1", "a2", "b09", "b10"]


@pytest.mark.parametrize("proc_id", range(4))
def test_srun_tasks_on_two_nodes_meet_at_the_first_node(clean_env, proc_id):
    import os

    slurm_task(clean_env, proc_id)
    prepare_process_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == (str(proc_id), "4")
    assert (os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"]) == (str(proc_id % 2), "2")
    assert os.environ["MASTER_ADDR"] == "gpu07"  # not 127.0.0.1: the second node would meet itself
    assert os.environ["MASTER_PORT"] == str(slurm_master_port("123456"))


@pytest.mark.parametrize("proc_id", [0, 3])
def test_submitit_tasks_take_the_jobs_values_over_inherited_ones(clean_env, proc_id):
    """submitit's export() refuses pre-set MASTER_ADDR / MASTER_PORT / LOCAL_WORLD_SIZE; a shell that submitted
    the sweep may well have them (here a single-node MASTER_ADDR that would hang the second node)."""
    import os

    slurm_task(clean_env, proc_id)
    clean_env.setenv("SUBMITIT_EXECUTOR", "slurm")
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_env.setenv("LOCAL_WORLD_SIZE", "8")
    prepare_process_env()
    assert os.environ["RANK"] == str(proc_id) and os.environ["WORLD_SIZE"] == "4"
    assert os.environ["MASTER_ADDR"] == "gpu07" and os.environ["LOCAL_WORLD_SIZE"] == "2"
    assert 20000 <= int(os.environ["MASTER_PORT"]) <= 60000


def test_a_multi_node_world_without_a_master_is_refused(clean_env):
    clean_env.setenv("RANK", "2")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "0")
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")
    clean_env.setenv("MASTER_PORT", "29500")
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set for a run over several nodes"):
        prepare_process_env()


@pytest.mark.slow
def test_a_leftover_op_build_lock_of_a_killed_process_does_not_hang_the_next_run(tmp_path, monkeypatch):
    """torch guards DeepSpeed's op build folder with a plain `lock` file; a process killed mid-build leaves it (and
    no built op), and every later run used to wait on it forever. A run now takes a flock, clears the leftover,
    builds the op (about 40 s) and finishes."""
    import subprocess
    import sys

    from torch.utils.cpp_extension import _get_build_directory

    root = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    leftover = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"  # as torch names it
    leftover.write_text("")
    out = subprocess.run([sys.executable, "-m", "tip.train", "experiment=smoke", "train.steps=1", "logger=none",
                          "train.save_final=false", "train.eval_before=false", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "removed a leftover build lock" in out.stdout and not leftover.exists()
    assert "building DeepSpeed's CPU op once for this environment (about 1-3 minutes" in out.stdout  # not silent
    assert list(leftover.parent.glob("*.so")), "the op was built"
