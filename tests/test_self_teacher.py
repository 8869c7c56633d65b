"""The privileged self-teacher (OPSD): alignment of teacher and student positions, weights, and training."""

import pytest
import torch

from tip.config import ConfigError, check_config
from tip.distributed import init_distributed
from tip.engine import build_teacher_engine, copy_weights, deepspeed_config
from tip.models import load_model, load_tokenizer
from tip.rollout import aligned_targets, pack, with_prompts
from tip.signals import signals_from_logits
from tip.step import StepSettings, score_micro
from tip.train import train

from support import compose_config


def test_alignment_on_a_hand_made_example():
    # Student prompts of length 2 and 1; the teacher's privileged prompts are longer (4 and 3 tokens).
    student = pack([[1, 2], [3]], [[7, 8, 9], [5, 6]], [0, 1], pad_id=0)
    teacher = with_prompts(student, [[1, 2, 40, 41], [3, 42, 43]], pad_id=0)
    assert teacher.input_ids.tolist() == [[1, 2, 40, 41, 7, 8, 9], [3, 42, 43, 5, 6, 0, 0]]
    index = aligned_targets(student, teacher)
    s_width, t_width = student.input_ids.shape[1] - 1, teacher.input_ids.shape[1] - 1
    pairs = [(divmod(int(i), s_width), divmod(int(index[i]), t_width)) for i in (index >= 0).nonzero()[:, 0]]
    # Row 0: student positions 1,2,3 predict tokens 7,8,9; the teacher's positions 3,4,5 predict the same.
    # Row 1: student positions 0,1 predict 5,6; the teacher's positions 2,3.
    assert pairs == [((0, 1), (0, 3)), ((0, 2), (0, 4)), ((0, 3), (0, 5)), ((1, 0), (1, 2)), ((1, 1), (1, 3))]
    for (sb, sp), (tb, tp) in pairs:
        assert student.input_ids[sb, sp + 1] == teacher.input_ids[tb, tp + 1]
    with pytest.raises(ValueError, match="same number of response tokens"):
        aligned_targets(student, pack([[1], [2]], [[7], [5, 6]], [0, 1], pad_id=0))


def _embedded_batch():
    tok = load_tokenizer("embedded://student")
    model = load_model("embedded://student", torch.float32, "student")
    prompts = [tok("12+34-5=")["input_ids"], tok("7+8-9=")["input_ids"]]
    responses = [tok("12+34=46;46-5=41;\\boxed{41}")["input_ids"] + [tok.eos_token_id],
                 tok("7+8=15;15-9=6;\\boxed{6}")["input_ids"] + [tok.eos_token_id]]
    student_view = pack(prompts, responses, [0, 1], tok.pad_token_id)
    privileged = [tok("12+34=46;46-5=41;\\boxed{41};12+34-5=")["input_ids"], tok("7+8=15;15-9=6;7+8-9=")["input_ids"]]
    return tok, model, student_view, with_prompts(student_view, privileged, tok.pad_token_id)


def _settings(chunk_size: int) -> StepSettings:
    return StepSettings.of(compose_config(), chunk_size, micro_size=2)


def test_signals_with_a_privileged_view_equal_slicing_the_teachers_logits_by_hand():
    _, model, student_view, teacher_view = _embedded_batch()
    scored = score_micro(_settings(chunk_size=5), None, model, model, student_view, teacher_view)
    signals, teacher_rows = scored.signals, scored.teacher_rows
    # Only the teacher's hidden states at response positions are kept for the gradient pass (no prompt, no
    # padding rows), in the order of the student's valid positions.
    assert teacher_rows.shape == (int(student_view.target_mask.sum()), model.config.hidden_size)
    with torch.no_grad():
        t_hidden = model.model(input_ids=teacher_view.input_ids,
                               attention_mask=teacher_view.attention_mask).last_hidden_state[:, :-1]
    torch.testing.assert_close(teacher_rows, t_hidden[teacher_view.target_mask])
    with torch.no_grad():
        s_logits = model(input_ids=student_view.input_ids, attention_mask=student_view.attention_mask).logits
        t_logits = model(input_ids=teacher_view.input_ids, attention_mask=teacher_view.attention_mask).logits
    for b in range(2):  # slice each row's response positions by hand, from the known prompt lengths
        s_start, t_start = student_view.prompt_lengths[b] - 1, teacher_view.prompt_lengths[b] - 1
        n = int(student_view.response_mask[b].sum())
        want = signals_from_logits(s_logits[b:b + 1, s_start:s_start + n], t_logits[b:b + 1, t_start:t_start + n],
                                   torch.ones(1, n, dtype=torch.bool))
        got = signals.reverse_kl[b][student_view.target_mask[b]]
        torch.testing.assert_close(got, want.reverse_kl[0], rtol=1e-5, atol=1e-6)
    assert signals.reverse_kl[student_view.target_mask].max() > 0.01  # the privileged view does change things


def test_a_self_teacher_with_the_students_own_view_agrees_everywhere():
    _, model, student_view, _ = _embedded_batch()
    signals = score_micro(_settings(chunk_size=7), None, model, model, student_view, student_view).signals
    assert signals.reverse_kl[student_view.target_mask].abs().max() < 1e-6


def test_snapshot_refresh_copies_zero3_shards_one_parameter_at_a_time():
    import deepspeed

    init_distributed()
    ds = deepspeed_config({"deepspeed": {"zero_optimization": {"stage": 3}}}, 1, 1, 1.0, torch.float32, train=False)
    from transformers.integrations import HfDeepSpeedConfig
    keep = HfDeepSpeedConfig(ds)  # noqa: F841 (load straight into shards)
    src = build_teacher_engine(load_model("embedded://student", torch.float32, "student"), ds)
    dst = build_teacher_engine(load_model("embedded://teacher", torch.float32, "teacher"), ds)
    names = [n for n, _ in src.named_parameters()]
    assert all(p.numel() == 0 or hasattr(p, "ds_tensor") for p in src.parameters())  # really sharded
    copy_weights(src, dst)
    sp, dp = dict(src.named_parameters()), dict(dst.named_parameters())
    for name in names:
        with deepspeed.zero.GatheredParameters([sp[name], dp[name]]):
            assert torch.equal(sp[name].data, dp[name].data), name
    del keep


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["live", "snapshot"])
def test_self_privileged_training_runs(weights, tmp_path):
    cfg = compose_config("experiment=smoke", "teacher=self_privileged", f"teacher.weights={weights}",
                         "teacher.refresh_every=1", "teacher.context_template='{solution};{problem}'", "train.steps=2",
                         "logger=none", "train.save_final=false")
    results = train(cfg, tmp_path / "run")
    assert set(results) == {"before", "after", "after_problems"}
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"step": 2' in text and '"mean_delta"' in text


def test_self_privileged_config_is_checked():
    with pytest.raises(ConfigError, match="teacher.context_template=.* must contain \\{solution\\}"):
        check_config(compose_config("teacher=self_privileged", "teacher.context_template='{problem}'"))
    with pytest.raises(ConfigError, match="teacher.weights='frozen' is not allowed"):
        check_config(compose_config("teacher=self_privileged", "teacher.weights=frozen"))
