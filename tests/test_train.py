"""`python -m tip.train` end to end on the embedded pair: every selector, outputs, and DeepSpeed ZeRO-3 with one
and two processes."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tip.models import load_model, load_tokenizer
from tip.rollout import hf_generate
from tip.selection import RULES
from tip.signals import signals_from_logits
from tip.tasks import sample_problems
from tip.train import train

from support import DATA_ROOT, ROOT, compose_config, read_metrics


@pytest.mark.parametrize("selector", sorted(r for r in RULES if not r.startswith("test_")))
def test_every_selector_trains(selector, tmp_path):
    # engine=zero0: selection does not touch the engine (ZeRO-3 has its own tests), and generation after training
    # under ZeRO-3 costs ~50 s per run here (per-module gathers).
    cfg = compose_config("experiment=smoke", f"selector={selector}", "keep=0.3", "logger=none",
                         "train.save_final=false", "engine=zero0")
    results = train(cfg, tmp_path / "run")
    steps = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["loss"] is not None and r["loss"] >= 0 and r["valid_tokens"] > 0
        assert abs(sum(r[f"q{i}/frac"] for i in range(1, 5)) - 1) < 1e-6
        if RULES[selector].ignores_keep:
            assert r["kept_frac"] == 1.0
        else:  # k = max(1, floor(0.3 m)) per rollout: never more than 0.3, and close to it
            assert 0.15 < r["kept_frac"] <= 0.3 + 1e-9
    assert set(results) == {"before", "after", "after_problems"}
    assert len(results["after_problems"]["embedded"]) == results["after"]["embedded/n"]
    assert 0.0 <= results["after"]["embedded/accuracy"] <= 1.0


def test_outputs_are_complete_and_a_run_directory_is_never_reused(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config("experiment=smoke", "selector=q3", "keep=0.1", "divergence=jsd")
    train(cfg, run_dir)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "eval.json").is_file()
    evals = read_metrics(run_dir, "eval")
    assert [e["when"] for e in evals] == ["before", "after"]
    train_rows = read_metrics(run_dir, "train")
    for key in ("loss", "kept_frac", "q3/frac", "q3/kept", "q3/of_kept", "mean_h", "mean_delta", "tokens_per_s",
                "peak_mem_mb", "rollout_s", "scoring_s", "selection_s", "gradient_s", "optimizer_s",
                "rollout_tokens_per_s", "trained_tokens_per_s"):
        assert key in train_rows[0], key
    # The phases measured inside the step fit in the step's wall time.
    row = train_rows[0]
    parts = sum(row[k] for k in ("rollout_s", "scoring_s", "selection_s", "gradient_s", "optimizer_s"))
    assert 0 < parts <= row["step_s"] + 1e-3
    final = run_dir / "checkpoints" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.model_type == "qwen3" and len(tok) == model.config.vocab_size
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        train(cfg, run_dir)
    assert (run_dir / "metrics.jsonl").read_bytes() == before  # nothing of the finished run was touched


@torch.no_grad()
def mean_reverse_kl(student, teacher, batch) -> float:
    """Teacher-forced KL(P_S || P_T) averaged over the response tokens of fixed sequences."""
    mask = batch.target_mask
    s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    t = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    return float(signals_from_logits(s, t, mask).reverse_kl[mask].mean())


@pytest.mark.slow  # seconds-long: test-fast keeps under 5 minutes
def test_distillation_moves_the_student_towards_the_teacher(tmp_path):
    tok = load_tokenizer("embedded://student")
    student0 = load_model("embedded://student", torch.float32, "student")
    teacher = load_model("embedded://teacher", torch.float32, "teacher")
    # Fixed evaluation sequences: the untrained student's own samples on training prompts (what OPD trains on).
    torch.manual_seed(123)
    prompts = [tok(p.problem)["input_ids"] for p in sample_problems(48, seed=0)]
    fixed = hf_generate(student0, tok, prompts, n=2, temperature=1.0, max_new_tokens=40)
    # lr 3e-4: the step that moves the borrow within 8 steps; most of the mean KL sits at the drilled carry, which
    # no dozen steps move (docs/testbed.md, "The embedded testbed").
    cfg = compose_config("selector=all", "train.steps=8", "train.prompts_per_step=8", "rollout.n=4", "train.lr=3e-4",
                         "eval.benchmarks.embedded.source.size=16", "logger=none")
    train(cfg, tmp_path / "run")
    student1 = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "final")
    before, after = mean_reverse_kl(student0, teacher, fixed), mean_reverse_kl(student1, teacher, fixed)
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow  # seconds-long: test-fast keeps under 5 minutes
def test_gradient_accumulation_gives_the_gradient_of_one_batch(tmp_path):
    """ZeRO-3 counts accumulation micro-steps inside engine.forward; a training forward that bypasses it makes the
    second micro-batch overwrite the first's gradients (a bug this test caught). Same step, same tokens: the
    gradient norm must not depend on how the batch is split or on the ZeRO stage."""
    base = ["experiment=smoke", "selector=soft_or", "keep=0.5", "selection.norm_scope=sequence",
            "rollout.temperature=0", "rollout.n=1", "train.prompts_per_step=4", "train.steps=1",
            "train.save_final=false", "logger=none"]
    norms = {}
    for name, extra in {"zero3_one_micro": ["train.micro_batch_size=4"],
                        "zero3_two_micros": ["train.micro_batch_size=2"],
                        "zero2_two_micros": ["train.micro_batch_size=2", "engine=zero2"]}.items():
        train(compose_config(*base, *extra), tmp_path / name)
        (row,) = read_metrics(tmp_path / name, "train")
        norms[name] = row["grad_norm"]
    assert norms["zero3_one_micro"] > 0
    for name in ("zero3_two_micros", "zero2_two_micros"):
        assert abs(norms[name] - norms["zero3_one_micro"]) < 1e-5 * norms["zero3_one_micro"], norms


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, run_dir: Path, prompts: int = 4, n: int = 1, extra: tuple = ()):
    """The same global batch: 4 prompts x 1 greedy rollout per step; micro-batches of 2 rollouts, so one process
    accumulates 2 micro-batches where each of two processes runs 1."""
    overrides = ["experiment=smoke", "selector=soft_or", "keep=0.5",  # norm_scope=batch: global statistics
                 "rollout.temperature=0", f"rollout.n={n}", f"train.prompts_per_step={prompts}",
                 "train.micro_batch_size=2",
                 "train.steps=3", "train.lr=1e-5", "train.warmup_steps=0", "train.save_final=false", "logger=none",
                 f"data_root={DATA_ROOT}", f"hydra.run.dir={run_dir}", *extra]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(var, None)
    cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
           "-m", "tip.train", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_metrics(run_dir, "train")


@pytest.mark.slow
def test_a_failure_on_another_rank_is_recorded_and_ends_the_run(tmp_path, monkeypatch):
    """Only rank 0 used to write status.json; a failure on rank 1 left it 'running' while rank 0 waited in a
    collective (on NCCL, until the watchdog killed it) and the W&B run was never finished."""
    import time

    from wandb_records import exit_code

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    run_dir = tmp_path / "run"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(var, None)
    overrides = ["experiment=smoke", "logger=wandb", "train.eval_before=false", "train.save_final=false",
                 "dist_timeout_s=900", f"data_root={DATA_ROOT}", f"hydra.run.dir={run_dir}"]

    def torchrun(*target):
        return subprocess.run([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                               *target, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    start = time.time()
    proc = torchrun(str(ROOT / "tests" / "failing_rank.py"))
    assert proc.returncode != 0
    assert time.time() - start < 300  # not the process-group timeout (900 s)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["rank"] == 1, status
    assert "injected failure on rank 1" in status["error"]
    assert "injected failure on rank 1" in json.loads((run_dir / "failures" / "rank1.json").read_text())["error"]
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    assert exit_code(wandb_file) == 1  # rank 0's W&B run is finished, marked failed
    # Running it again in the same directory starts a new attempt: the old failure records are set aside (kept),
    # so rank 0's watch does not mistake them for this attempt's.
    proc = torchrun("-m", "tip.train")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert (run_dir / "failures.attempt-1" / "rank1.json").is_file() and not (run_dir / "failures").exists()


@pytest.mark.slow
def test_batch_scope_keeps_the_top_k_of_the_global_batch_on_two_processes(tmp_path):
    """selection.scope=batch took each rank's own top-k (the kept set depended on the number of processes); it is
    now the step's global batch's top K: 2 processes keep the same tokens, quadrant by quadrant, as 1."""
    one = _launch(1, tmp_path / "one", extra=("selection.scope=batch",))
    two = _launch(2, tmp_path / "two", extra=("selection.scope=batch",))
    for key in ("kept_tokens", "kept_of_target", *(f"q{i}/of_kept" for i in range(1, 5))):
        torch.testing.assert_close([r[key] for r in two], [r[key] for r in one], rtol=1e-9, atol=1e-9, msg=key)
    torch.testing.assert_close(two[0]["loss"], one[0]["loss"], rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_one_prompts_samples_split_over_two_processes_train_as_on_one(tmp_path):
    """1 prompt x 2 samples on 2 processes (refused before: the prompts did not divide over the ranks): each rank
    holds one sample, and the step is the one-process step (greedy samples, so the tokens are equal too)."""
    one = _launch(1, tmp_path / "one", prompts=1, n=2)
    two = _launch(2, tmp_path / "two", prompts=1, n=2)
    assert [r["valid_tokens"] for r in one] == [r["valid_tokens"] for r in two] and one[0]["valid_tokens"] > 0
    assert [r["kept_tokens"] for r in one] == [r["kept_tokens"] for r in two]
    torch.testing.assert_close(two[0]["loss"], one[0]["loss"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(two[0]["grad_norm"], one[0]["grad_norm"], rtol=1e-4, atol=1e-8)


@pytest.mark.slow
def test_two_process_zero3_matches_one_process(tmp_path):
    """With the default norm_scope=batch the clip, min-max and median statistics are those of the step's global
    batch (gathered over ranks): taken per rank, they made 2 processes keep other tokens than 1."""
    one = _launch(1, tmp_path / "one")
    two = _launch(2, tmp_path / "two")
    # The same tokens kept in every quadrant, step by step.
    for key in ("kept_tokens", *(f"q{i}/of_kept" for i in range(1, 5)), *(f"q{i}/frac" for i in range(1, 5))):
        torch.testing.assert_close([r[key] for r in two], [r[key] for r in one], rtol=1e-9, atol=1e-9, msg=key)
    # Step 1 sees the same weights and tokens: loss and gradient norm (before clipping) must agree up to float
    # summation order. The gradient norm is what exposes a wrong normalisation over micro-batches or ranks
    # (a factor of 2 would show here; Adam's first, sign-like update would hide it).
    torch.testing.assert_close(two[0]["loss"], one[0]["loss"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(two[0]["grad_norm"], one[0]["grad_norm"], rtol=1e-4, atol=1e-8)
    assert one[0]["grad_norm"] > 0
    # Later steps roll out from the updated students: same tokens, same selection, and losses agree within 1e-3
    # relative (Adam turns float noise in near-zero gradient coordinates into +-lr steps; lr is small here).
    assert [r["valid_tokens"] for r in one] == [r["valid_tokens"] for r in two]
    assert [r["kept_tokens"] for r in one] == [r["kept_tokens"] for r in two]
    torch.testing.assert_close([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_a_finished_cell_frees_its_models(tmp_path):
    """A sweep runs its cells one after another in one process (hydra's basic launcher): what a cell built must
    be freed when it returns. ZeRO-3 kept every root module on DeepSpeed's global forward-module stack, so both
    models of every finished cell stayed alive (on GPUs the second cell ran out of memory)."""
    import gc

    from transformers import PreTrainedModel

    def live_models():
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel)}

    before = live_models()
    cfg = compose_config("experiment=smoke", "train.steps=1", "logger=none", "train.save_final=false",
                         "train.eval_before=false", "eval.benchmarks.embedded.source.size=4")
    train(cfg, tmp_path / "cell")
    assert live_models() - before == set()


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_loss_and_gradient(tmp_path):
    """Activation checkpointing under ZeRO-3, with the kept-rows loss path: the same step, same numbers."""
    base = ["experiment=smoke", "selector=soft_or", "keep=0.5", "rollout.temperature=0", "rollout.n=1",
            "train.prompts_per_step=4", "train.micro_batch_size=2", "train.steps=1", "train.eval_before=false",
            "train.save_final=false", "eval.benchmarks.embedded.source.size=4", "logger=none"]
    rows = {}
    for flag in ("false", "true"):
        train(compose_config(*base, f"train.gradient_checkpointing={flag}"), tmp_path / flag)
        (rows[flag],) = read_metrics(tmp_path / flag, "train")
    assert rows["true"]["kept_tokens"] == rows["false"]["kept_tokens"]
    torch.testing.assert_close(rows["true"]["loss"], rows["false"]["loss"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(rows["true"]["grad_norm"], rows["false"]["grad_norm"], rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_a_paper_overlay_trains_on_the_cpu_stand_in(tmp_path):
    """experiment=paper_qwen3_8b_to_4b with the embedded pair, task and HF rollouts in place of the real ones, and
    only sizes cut (response length, steps, eval size): bf16, ZeRO-3, activation checkpointing, 16 rollouts per
    prompt at T = 1, the overlay's optimizer settings and checkpointing all run together."""
    cfg = compose_config("experiment=paper_qwen3_8b_to_4b", "pair=embedded", "data=embedded", "eval=embedded",
                         "protocol=greedy", "rollout=hf", "logger=none",
                         "rollout.max_new_tokens=40", "eval.max_new_tokens=40", "train.steps=2",
                         "train.checkpoint_every=1", "train.eval_every=0", "eval.benchmarks.embedded.source.size=16")
    assert (cfg.precision, cfg.engine.stage, cfg.train.gradient_checkpointing, cfg.rollout.n) == ("bf16", 3, True, 16)
    results = train(cfg, tmp_path / "run")
    steps = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["valid_tokens"] > 8 * 16 * 10 and math.isfinite(r["loss"]) for r in steps)  # 8 prompts x 16
    assert (tmp_path / "run" / "checkpoints" / "final" / "config.json").is_file()
    assert list((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert 0 <= results["after"]["embedded/accuracy"] <= 1


@pytest.mark.slow
def test_every_rank_runs_in_rank_0s_directory_when_each_resolves_its_own(tmp_path):
    """Under torchrun each process resolves hydra.run.dir itself (the default holds the time to the microsecond):
    checkpoints used to scatter over one folder per rank, and a restart resumed some ranks only. Here each rank
    resolves a different folder on purpose; everything lands in rank 0's."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(var, None)
    overrides = ["experiment=smoke", "logger=none", "train.eval_before=false", "train.save_final=false",
                 "train.steps=1", "train.checkpoint_every=1", f"data_root={DATA_ROOT}",
                 f"hydra.run.dir={tmp_path}/run_${{oc.env:RANK}}"]
    proc = subprocess.run([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                           "-m", "tip.train", *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "run_0" / "status.json").read_text())["status"] == "completed"
    assert (tmp_path / "run_0" / "checkpoints" / "step_000001").is_dir()
    assert not (tmp_path / "run_1").exists(), sorted(p.name for p in (tmp_path / "run_1").rglob("*"))
    assert "the run directory is rank 0's" in proc.stdout


@pytest.mark.slow
def test_zero3_with_hpz_partitions_trains_as_without(tmp_path):
    """Four processes stand in for 2 nodes of 2 GPUs: engine.hpz_partition_size=2 (what auto picks when a run spans
    nodes) gives the same losses and gradient norms as plain ZeRO-3. Before, the teacher's load failed with
    DeepSpeed's "ZeRO parameter intra parallel group is already initialized" (DeepSpeed issue #4901): every ZeRO-3
    model's zero.Init creates the hpZ group anew."""
    plain = _launch(4, tmp_path / "plain", extra=("engine.hpz_partition_size=1",))
    hpz = _launch(4, tmp_path / "hpz", extra=("engine.hpz_partition_size=2",))
    assert len(plain) == len(hpz) == 3
    for a, b in zip(plain, hpz):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
