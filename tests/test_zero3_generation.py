"""HF generate under ZeRO-3 with the student gathered once per call (engine.gather_for_generate): the same samples
as with DeepSpeed's per-module gathers, and the engine's hooks back afterwards, so training goes on."""

import pytest
import torch

from tip.distributed import init_distributed
from tip.engine import release_engines
from tip.parts import build_parts, rank_prompts
from tip.step import StepInputs, opd_step

from support import compose_config


def generate_then_train(tmp_path, setting):
    cfg = compose_config("experiment=smoke", "logger=none", "engine=zero3", f"engine.gather_for_generate={setting}",
                         "train.prompts_per_step=8", "train.lr=1e-3")
    dist = init_distributed()
    run = build_parts(cfg, dist, tmp_path)
    offload = run.engine.optimizer.parameter_offload
    try:
        hooks = len(offload.forward_hooks)
        share = rank_prompts(cfg, run.train_examples, run.tokenizer, 0, dist)
        batch = run.rollout.generate(share.prompt_ids, 3, share.seeds(cfg.seed, 0))
        assert len(offload.forward_hooks) == hooks > 0  # DeepSpeed's hooks are registered again
        assert all(p.numel() == 0 for p in run.student.parameters())  # and the weights are shards again
        inputs = StepInputs(batch.to(dist.device), cfg.keep, torch.Generator(device=dist.device).manual_seed(1))
        stats = opd_step(run.step, run.engine, run.teacher, inputs, dist).metrics
        return batch, stats
    finally:
        release_engines(run.engine, run.teacher)


def test_gathered_generation_samples_what_per_module_gathers_sample_and_training_goes_on(tmp_path):
    whole, whole_stats = generate_then_train(tmp_path / "whole", "always")
    per_module, module_stats = generate_then_train(tmp_path / "per_module", "never")
    assert whole.input_ids.shape[0] == 16 and int(whole.response_mask.sum()) > 50
    assert torch.equal(whole.input_ids, per_module.input_ids)
    assert whole_stats["loss"] > 0 and whole_stats["loss"] == module_stats["loss"]



def zero3_coordinator(root):
    """The ZeRO-3 parameter coordinator whose hooks are on ``root`` (the engine's root module)."""
    import gc

    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    (offload,) = [o for o in gc.get_objects() if isinstance(o, DeepSpeedZeRoOffload) and o.module is root]
    return offload.get_param_coordinator()


@pytest.mark.slow
def test_the_zero3_teachers_trace_completes_like_the_students(tmp_path):
    """DeepSpeed traces a ZeRO-3 module's parameter order from its root module's forward: the teacher, called
    through its decoder alone, bypassed the root's hook and its trace stayed INVALID every step (no prefetch,
    persistent parameters gathered on every call). Called through its root, it completes from the second step."""
    cfg = compose_config("experiment=smoke", "logger=none", "engine=zero3", "train.prompts_per_step=4",
                         "rollout.n=2", "train.micro_batch_size=2")
    dist = init_distributed()
    run = build_parts(cfg, dist, tmp_path)
    try:
        teacher, student = zero3_coordinator(run.teacher), zero3_coordinator(run.engine.module)
        for step in range(3):
            share = rank_prompts(cfg, run.train_examples, run.tokenizer, step, dist)
            rollouts = run.rollout.generate(share.prompt_ids, step, share.seeds(cfg.seed, step))
            generator = torch.Generator(device=dist.device).manual_seed(step)
            opd_step(run.step, run.engine, run.teacher, StepInputs(rollouts.to(dist.device), cfg.keep, generator),
                     dist)
            assert not teacher.is_invalid_trace(), f"step {step + 1}: the teacher's trace is invalid"
        assert teacher.is_complete_trace() and student.is_complete_trace()
    finally:
        release_engines(run.engine, run.teacher)
