"""HF generate under ZeRO-3 with the student gathered once per call (engine.gather_for_generate): the same samples
as with DeepSpeed's per-module gathers, and the engine's hooks back afterwards, so training goes on."""

import torch

from tip.distributed import init_distributed
from tip.engine import release_engines
from tip.rollout import prompt_seeds
from tip.train import distill_step, rank_prompts, set_up

from support import compose_config


def generate_then_train(tmp_path, setting):
    cfg = compose_config("experiment=smoke", "logger=none", "engine=zero3", f"engine.gather_for_generate={setting}",
                         "train.prompts_per_step=8", "train.lr=1e-3")
    dist = init_distributed()
    run = set_up(cfg, dist, tmp_path)
    offload = run.student.optimizer.parameter_offload
    try:
        hooks = len(offload.forward_hooks)
        prompt_ids, _, idx = rank_prompts(cfg, run.train_examples, run.tokenizer, 0, dist)
        batch = run.rollout.generate(prompt_ids, 3, prompt_seeds(cfg.seed, 0, idx))
        assert len(offload.forward_hooks) == hooks > 0  # DeepSpeed's hooks are registered again
        assert all(p.numel() == 0 for p in run.policy.parameters())  # and the weights are shards again
        stats = distill_step(cfg, run.student, run.teacher, batch.to(dist.device), run.micro_size, dist,
                             torch.Generator(device=dist.device).manual_seed(1), None, run.tokenizer.pad_token_id,
                             run.chunk_size)
        return batch, stats
    finally:
        release_engines(run.student, run.teacher)


def test_gathered_generation_samples_what_per_module_gathers_sample_and_training_goes_on(tmp_path):
    whole, whole_stats = generate_then_train(tmp_path / "whole", "always")
    per_module, module_stats = generate_then_train(tmp_path / "per_module", "never")
    assert whole.input_ids.shape[0] == 16 and int(whole.response_mask.sum()) > 50
    assert torch.equal(whole.input_ids, per_module.input_ids)
    assert whole_stats["loss"] > 0 and whole_stats["loss"] == module_stats["loss"]

