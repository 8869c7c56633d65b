"""A training step is the same step however it is arranged: one student forward shared by scoring and gradient
(the rank's rollouts in one micro-batch) or a scoring forward and then a gradient forward per micro-batch
(several micro-batches); signals from the loss's own chunk loop (every token kept) or from a scoring loop. Same
kept tokens, same loss and signals, same gradient (within fp32 tolerance). Gradients are compared rather than
updated weights: AdamW's first update is about lr * sign(g), which flips on the rounding of near-zero entries."""

import pytest
import torch

from tip.distributed import init_distributed
from tip.engine import release_engines
from tip.parts import build_parts, privileged_prompts, rank_prompts
from tip.step import StepInputs, opd_step

from support import compose_config

STATS = ("loss", "valid_tokens", "kept_tokens", "mean_h", "mean_delta", "mean_delta_fwd",
         "q1/frac", "q3/frac", "q1/of_kept", "q3/of_kept", "q3/mean_delta")


def one_step(tmp_path, micro_batch_size, *overrides, rollouts=None):
    """One opd_step on the embedded pair (fixed seed, so the same initial student): its stats and the step's
    gradient (summed over micro-batches, as the engine hands it on). The rollouts of the first call are reused.
    A self-teacher (teacher=self_privileged) reads its privileged prompts."""
    cfg = compose_config("experiment=smoke", "logger=none", "train.prompts_per_step=8", "rollout.n=2",
                         f"train.micro_batch_size={micro_batch_size}", "train.warmup_steps=0", "train.lr=1e-3",
                         *overrides)
    dist = init_distributed()
    run = build_parts(cfg, dist, tmp_path)
    try:
        share = rank_prompts(cfg, run.train_examples, run.tokenizer, 0, dist)
        if rollouts is None:
            rollouts = run.rollout.generate(share.prompt_ids, 5, share.seeds(cfg.seed, 0))
        teacher_prompts = privileged_prompts(cfg, share.chosen, run.tokenizer) if run.self_teacher else None
        before = weights_of(run.student)
        grads = {}
        hooks = [p.register_hook(lambda g, n=n: grads.__setitem__(n, grads.get(n, 0) + g.detach().clone()))
                 for n, p in run.student.named_parameters()]
        generator = torch.Generator(device=dist.device).manual_seed(7)
        stats = opd_step(run.step, run.engine, run.teacher,
                         StepInputs(rollouts.to(dist.device), cfg.keep, generator, teacher_prompts), dist).metrics
        for hook in hooks:
            hook.remove()
        after = weights_of(run.student)
        assert max(float((w - before[n]).abs().max()) for n, w in after.items()) > 1e-4  # the step moved it
        return stats, grads, rollouts
    finally:
        release_engines(run.engine, run.teacher)


def assert_same_gradient(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name, g in a.items():
        scale = float(g.abs().max()) + 1e-12
        torch.testing.assert_close(g, b[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def weights_of(model) -> dict[str, torch.Tensor]:
    """Every parameter, whole (ZeRO-3 shards gathered)."""
    import deepspeed

    params = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params if hasattr(p, "ds_id")]):
        return {n: p.detach().clone() for n, p in params}


CASES = [  # (selector, keep, divergence): a selection, every token (both ways), a random draw, each divergence
    ("soft_or", 0.5, "reverse_kl"),
    ("all", 1.0, "reverse_kl"),
    ("q3", 1.0, "forward_kl"),
    ("random", 0.3, "jsd"),
    ("q3", 0.2, "forward_kl"),
]


@pytest.mark.parametrize("selector, keep, divergence", CASES)
def test_one_shared_forward_equals_a_scoring_forward_then_a_gradient_forward(tmp_path, selector, keep, divergence):
    overrides = (f"selector={selector}", f"keep={keep}", f"divergence={divergence}", "engine=zero0")
    shared, w_shared, rollouts = one_step(tmp_path / "a", 16, *overrides)  # 16 rollouts: one micro-batch
    two_pass, w_two_pass, _ = one_step(tmp_path / "b", 5, *overrides, rollouts=rollouts)  # four micro-batches
    assert shared["valid_tokens"] > 100 and 0 < shared["kept_tokens"] <= shared["valid_tokens"]
    for key in STATS:
        assert shared[key] == pytest.approx(two_pass[key], rel=1e-5, abs=1e-7), key
    assert_same_gradient(w_shared, w_two_pass)


def test_the_shared_forward_under_zero3_equals_two_passes(tmp_path):
    shared, w_shared, rollouts = one_step(tmp_path / "a", 16, "selector=soft_or", "keep=0.5")
    two_pass, w_two_pass, _ = one_step(tmp_path / "b", 8, "selector=soft_or", "keep=0.5", rollouts=rollouts)
    for key in STATS:
        assert shared[key] == pytest.approx(two_pass[key], rel=1e-5, abs=1e-7), key
    assert_same_gradient(w_shared, w_two_pass)


@pytest.fixture(scope="module")
def untied_student(tmp_path_factory):
    """The embedded student with an output layer of its own (as Llama-3.1-8B, Qwen3-8B, and Qwen2.5-Coder-0.5B as
    converted here have): no module of the decoder uses it."""
    from tip.models import load_model, load_tokenizer

    student = load_model("embedded://student", torch.float32, "student")
    student.config.tie_word_embeddings = False
    student.lm_head.weight = torch.nn.Parameter(student.lm_head.weight.detach().clone())
    path = tmp_path_factory.mktemp("untied") / "student"
    student.save_pretrained(path)
    load_tokenizer("embedded://student").save_pretrained(path)
    reloaded = load_model(str(path), torch.float32, "student")
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    return path


@pytest.mark.parametrize("micro_batch_size", [16, 5])
def test_an_untied_output_layer_trains_under_zero3_as_under_zero0(tmp_path, untied_student, micro_batch_size):
    """Under ZeRO-3 the untied layer's gradient node was first made while the weight was a shard, and backward
    refused the whole-shaped gradient ("expected shape compatible with [0]"); then autograd could not accumulate it
    into the shard. Found by bench/rollout.py --zero3 on Qwen2.5-Coder-0.5B; every ZeRO-3 test used the tied
    embedded student."""
    overrides = (f"pair.student={untied_student}", "selector=soft_or", "keep=0.5")
    zero0, g_zero0, rollouts = one_step(tmp_path / "a", micro_batch_size, *overrides, "engine=zero0")
    zero3, g_zero3, _ = one_step(tmp_path / "b", micro_batch_size, *overrides, "engine=zero3", rollouts=rollouts)
    for key in STATS:
        assert zero3[key] == pytest.approx(zero0[key], rel=1e-5, abs=1e-7), key
    assert "lm_head.weight" in g_zero3 and float(g_zero3["lm_head.weight"].abs().max()) > 0
    assert_same_gradient(g_zero3, g_zero0)


SLOW = pytest.mark.slow
PACKING_CASES = [  # (engine, micro-batch size, teacher and rule overrides)
    ("zero0", 16, ("selector=soft_or", "keep=0.5")),
    pytest.param("zero0", 5, ("selector=q3", "keep=0.2", "divergence=forward_kl"), marks=SLOW),
    pytest.param("zero0", 16, ("selector=all", "keep=1.0"), marks=SLOW),  # signals from the loss's own loop
    pytest.param("zero3", 16, ("selector=entropy_sample", "keep=0.3"), marks=SLOW),
    ("zero3", 5, ("selector=soft_or", "keep=0.5")),
    pytest.param("zero0", 16, ("teacher=self_privileged", "teacher.weights=live", "selector=soft_or", "keep=0.5"),
                 marks=SLOW),
    ("zero3", 5, ("teacher=self_privileged", "teacher.weights=snapshot", "selector=q3", "keep=0.2")),
]


@pytest.mark.parametrize("engine, micro_batch_size, overrides", PACKING_CASES)
def test_packed_micro_batches_train_as_padded_ones(tmp_path, engine, micro_batch_size, overrides):
    """train.packing: each micro-batch's rollouts run as one row of their real tokens (position ids restarting
    per rollout) instead of right-padded rows under a padding mask. Same signals, selection, loss and gradient,
    for the student and for the teacher (separate, live self-teacher with its privileged view, ZeRO-3 snapshot)."""
    common = (f"engine={engine}", *overrides)
    padded, g_padded, rollouts = one_step(tmp_path / "a", micro_batch_size, *common, "train.packing=false")
    lengths = rollouts.attention_mask.sum(-1)
    assert int(lengths.min()) < int(lengths.max())  # rows of several lengths: the padded run computes on padding
    packed, g_packed, _ = one_step(tmp_path / "b", micro_batch_size, *common, "train.packing=true",
                                   rollouts=rollouts)
    assert packed["kept_tokens"] == padded["kept_tokens"] > 0
    for key in STATS:
        if key.endswith(("/frac", "/of_kept")):  # a token within fp32 rounding of a median may change quadrant
            one_token = 1.01 / (padded["valid_tokens"] if key.endswith("/frac") else padded["kept_tokens"])
            assert packed[key] == pytest.approx(padded[key], abs=one_token), key
        elif not key.startswith("q"):
            assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-7), key
    assert_same_gradient(g_packed, g_padded)


@pytest.mark.parametrize("one_row", [False, True])
def test_packed_rows_hold_each_rollout_whole_and_alone(one_row):
    """tip.models.pack_rows: every rollout's tokens in order, position ids from 0, no row wider than the longest
    (or one row, for FlashAttention's variable-length kernel); the decoder's hidden states at the real tokens equal
    the padded forward's (a rollout attending to its neighbour in the row would change them)."""
    from tip.models import load_model, pack_rows

    lengths = [120, 30, 77, 5, 64, 100]
    ids = torch.randint(3, 57, (6, 120), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(120)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    rows = pack_rows(ids, mask, one_row=one_row)
    assert rows.input_ids.shape == ((1, sum(lengths)) if one_row else (4, 120))  # first-fit: 120 | 100 | 77+30+5 | 64
    flat_ids, flat_pos = rows.input_ids.reshape(-1), rows.position_ids.reshape(-1)
    assert torch.equal(flat_ids[rows.index], ids[mask.bool()])
    assert torch.equal(flat_pos[rows.index], torch.cat([torch.arange(n) for n in lengths]))
    model = load_model("embedded://student", torch.float32, "student")
    decoder = model.get_decoder()
    padded = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[mask.bool()]
    packed = decoder(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(packed.reshape(-1, packed.shape[-1])[rows.index], padded, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero0", "zero3"])
def test_sgd_steps_by_minus_lr_times_the_gradient(tmp_path, engine):
    """train.optimizer=sgd (the optimizer control): the update is exactly -lr x the step's gradient (no clipping at
    this norm), where AdamW's first step is about lr x sign(g) for every weight."""
    cfg = compose_config("experiment=smoke", "logger=none", "train.prompts_per_step=4", "rollout.n=2",
                         "train.warmup_steps=0", "train.lr=0.05", "train.lr_schedule=constant", "train.grad_clip=1e6",
                         "train.optimizer=sgd", f"engine={engine}", "selector=q3", "keep=0.2")
    dist = init_distributed()
    run = build_parts(cfg, dist, tmp_path)
    try:
        share = rank_prompts(cfg, run.train_examples, run.tokenizer, 0, dist)
        rollouts = run.rollout.generate(share.prompt_ids, 5, share.seeds(cfg.seed, 0))
        before = weights_of(run.student)
        grads = {}
        hooks = [p.register_hook(lambda g, n=n: grads.__setitem__(n, grads.get(n, 0) + g.detach().clone()))
                 for n, p in run.student.named_parameters()]
        opd_step(run.step, run.engine, run.teacher, StepInputs(rollouts, cfg.keep, torch.Generator().manual_seed(7)),
                 dist)
        for hook in hooks:
            hook.remove()
        after = weights_of(run.student)
        moved = 0
        for name, g in grads.items():
            torch.testing.assert_close(after[name] - before[name], -0.05 * g, rtol=1e-4, atol=1e-7, msg=name)
            moved += int((g != 0).sum())
        assert moved > 1000
    finally:
        release_engines(run.engine, run.teacher)


def test_a_flash_kernel_gets_the_packed_boundaries_once_per_micro_batch():
    """Issue 40: tip.models.hidden_states passes FlashAttention's variable-length arguments (cu_seq_lens_q/k,
    max_length_q/k) with the packed row, the same tensor to every layer, instead of each layer deriving them from
    the position ids with host syncs. FlashAttention needs CUDA: a reference variable-length kernel, registered
    under a flash name, attends within each sequence by those boundaries alone; the hidden states equal the padded
    forward's, so the boundaries are the sequences'."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    from tip.models import hidden_states, load_model

    seen = []

    def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        cu = kwargs["cu_seq_lens_q"]
        seen.append((id(cu), kwargs["max_length_q"]))
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        bounds = cu.tolist()
        parts = [torch.nn.functional.scaled_dot_product_attention(
            query[..., a:b, :], key[..., a:b, :], value[..., a:b, :], is_causal=True, scale=scaling)
            for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None

    AttentionInterface.register("flash_reference", varlen_reference)
    ALL_MASK_ATTENTION_FUNCTIONS.register("flash_reference", flash_attention_mask)
    lengths = [40, 7, 25, 13]
    ids = torch.randint(3, 57, (4, 40), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(40)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    model = load_model("embedded://student", torch.float32, "student").eval()
    with torch.no_grad():
        padded = hidden_states(model, ids, mask)[mask.bool()]
        model.config._attn_implementation = "flash_reference"  # this test's own copy of the model
        packed = hidden_states(model, ids, mask, packed=True)[mask.bool()]
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)
    assert len(seen) == model.config.num_hidden_layers and len({s for s in seen}) == 1
    assert seen[0][1] == 40
