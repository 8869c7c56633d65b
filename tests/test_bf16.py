"""bf16, the GPU path's precision, run on this CPU (slowly, but for real): gradients are accumulated and
communicated in fp32, and a bf16 run follows the fp32 one within bf16's error."""

import json

import pytest
import torch

from tip.config import ConfigError
from tip.engine import deepspeed_config
from tip.losses import fused_divergence_sum
from tip.reference_loss import kept_token_divergence
from tip.signals import logits_rows
from tip.train import train

from support import compose_config


def output_layer_gradients(dtype, custom: bool, chunk: int):
    g = torch.Generator().manual_seed(0)
    rows, hidden_size, vocab = 2048, 64, 512
    hidden = torch.randn(rows, hidden_size, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    teacher = torch.randn(rows, vocab, generator=g, dtype=torch.float64).to(dtype)
    if custom:
        total = fused_divergence_sum(hidden, weight, None, lambda i: teacher[i], "reverse_kl", chunk_size=chunk).total
    else:  # plain autograd through the full logits
        logits = torch.nn.functional.linear(hidden, weight)[None]
        total = kept_token_divergence(logits_rows(logits), logits_rows(teacher[None]), torch.arange(rows),
                                      "reverse_kl", chunk_size=chunk).sum()
    total.backward()
    return weight.grad.double(), hidden.grad.double()


def test_fused_weight_gradient_in_bf16_is_as_accurate_as_plain_autograd():
    """The fused loss sums the weight gradient over chunks in fp32 and rounds once. Summed in bf16 (as it
    was), 512 chunks made its error 2.6x plain autograd's (0.025 vs 0.0095 relative)."""
    ref_w, ref_h = output_layer_gradients(torch.float64, custom=True, chunk=4096)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    plain_w, plain_h = output_layer_gradients(torch.bfloat16, custom=False, chunk=512)
    for chunk in (4, 512):
        w, h = output_layer_gradients(torch.bfloat16, custom=True, chunk=chunk)
        assert rel(w, ref_w) <= 1.1 * rel(plain_w, ref_w), (chunk, rel(w, ref_w), rel(plain_w, ref_w))
        assert rel(h, ref_h) <= 1.1 * rel(plain_h, ref_h)


@pytest.mark.parametrize("engine", ["zero2", "zero3", "zero3_offload"])
def test_a_bf16_run_asks_deepspeed_for_fp32_communication_and_accumulation(engine):
    cfg = compose_config(f"engine={engine}")
    ds = deepspeed_config(cfg.engine, 4, 2, 1.0, torch.bfloat16)
    assert ds["bf16"] == {"enabled": True}
    assert ds["communication_data_type"] == "fp32" and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = deepspeed_config(cfg.engine, 4, 2, 1.0, torch.float32)
    assert "communication_data_type" not in fp32 and "data_types" not in fp32


def test_zero0_in_bf16_is_refused_before_any_model_loads(tmp_path):
    """DeepSpeed 0.19 has no fp32 gradient accumulation at stage 0 (it raises NotImplementedError)."""
    cfg = compose_config("experiment=smoke", "engine=zero0", "precision=bf16", "logger=none")
    with pytest.raises(ConfigError, match="engine=zero0 is not allowed with torch.bfloat16 weights"):
        train(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"


def one_step(precision: str, run_dir):
    cfg = compose_config("experiment=smoke", f"precision={precision}", "selector=all",
                         "rollout.temperature=0", "rollout.n=1", "rollout.max_new_tokens=24", "train.steps=2",
                         "train.micro_batch_size=2", "train.warmup_steps=0", "train.lr=1e-5",
                         "train.eval_before=false", "train.save_final=false", "eval.benchmarks.embedded.source.size=4",
                         "logger=none")
    train(cfg, run_dir)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def test_bf16_training_follows_fp32(tmp_path):
    """Two ZeRO-3 steps of the embedded pair (all tokens, 2 micro-batches each) in bf16 and in fp32 on the same
    greedy rollouts: losses and gradient norms within 10%. Measured here: 6.3% and 2.3% at step 1. The loss is
    a KL of ~0.09 nats between two close distributions, whose bf16 logits (8 bits of mantissa, after the
    decoder's layers) move it by a few percent; a gradient summed in bf16 or a wrong normalisation is larger."""
    fp32 = one_step("fp32", tmp_path / "fp32")
    bf16 = one_step("bf16", tmp_path / "bf16")
    assert [r["valid_tokens"] for r in bf16] == [r["valid_tokens"] for r in fp32]
    for a, b in zip(bf16, fp32):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.1), (a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.1), (a["grad_norm"], b["grad_norm"])
