"""Non-finite guard: a step whose signals are NaN/inf is not applied, is logged with its cause, and too many in a
row stop the run with a clear error and a failed status."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tip.models import resolve_model_ref
from tip.step import nonfinite_signals
from tip.step_metrics import NonFiniteStep
from tip.train import train

from support import compose_config, read_metrics


def test_the_cause_names_the_model_whose_values_went_non_finite():
    finite = torch.tensor([0.1, 0.2])
    assert nonfinite_signals(finite, finite) == ""
    assert "teacher's logits" in nonfinite_signals(finite, torch.tensor([0.1, float("nan")]))
    assert "1 of 2 tokens" in nonfinite_signals(finite, torch.tensor([float("inf"), 0.3]))
    assert "student's logits" in nonfinite_signals(torch.tensor([float("nan"), 0.1]), torch.tensor([0.0, 0.0]))


@pytest.fixture
def broken_teacher(tmp_path):
    """The embedded teacher with one inf in the embedding row of '=' (in every prompt): its logits are NaN."""
    src = resolve_model_ref("embedded://teacher")
    model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids("="), 0] = float("inf")
    out = tmp_path / "broken_teacher"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_skipped_steps_leave_the_student_as_it_was(tmp_path, broken_teacher):
    run_dir = tmp_path / "run"
    cfg = compose_config("experiment=smoke", "logger=none", "engine=zero0", f"pair.teacher={broken_teacher}",
                         "train.max_skipped_steps=5", "train.eval_before=false")
    train(cfg, run_dir)
    skipped = read_metrics(run_dir, "skipped")
    assert [r["step"] for r in skipped] == [1, 2] and not read_metrics(run_dir, "train")
    assert all("teacher's logits" in r["cause"] for r in skipped)
    assert [r["skipped_in_a_row"] for r in skipped] == [1, 2]
    final = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final").state_dict()
    shipped = AutoModelForCausalLM.from_pretrained(resolve_model_ref("embedded://student")).state_dict()
    assert all(torch.equal(final[k], shipped[k]) for k in shipped)  # nothing was applied
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


def test_too_many_skipped_steps_in_a_row_stop_the_run_failed(tmp_path, broken_teacher):
    run_dir = tmp_path / "run"
    cfg = compose_config("experiment=smoke", "logger=none", "engine=zero0", f"pair.teacher={broken_teacher}",
                         "train.steps=5", "train.max_skipped_steps=1", "train.eval_before=false",
                         "train.checkpoint_every=1")
    with pytest.raises(NonFiniteStep, match=r"2 steps in a row were skipped \(train.max_skipped_steps=1\).*teacher"):
        train(cfg, run_dir)
    assert [r["step"] for r in read_metrics(run_dir, "skipped")] == [1, 2]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "train.max_skipped_steps=1" in status["error"]
    # No step was applied, so none was checkpointed (checkpoint_every=1), and no final student was written.
    assert not list(run_dir.glob("checkpoints/step_*")) and not (run_dir / "checkpoints" / "final").exists()


class _NanGradient(torch.autograd.Function):
    """Identity forward; its backward turns the gradient into NaN. The scoring pass and the loss stay finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.fixture
def nan_gradient_at():
    """``nan_gradient_at({2, 3})``: the student's gradient is NaN in the gradient forwards numbered 2 and 3 (one per
    step here: one micro-batch), through a process-wide forward hook on its first decoder layer (the teacher, the
    scoring pass and generation run without gradient and are left alone)."""
    handles = []

    def install(bad: set[int]):
        seen = {"grad_forwards": 0}

        def hook(module, args, output):
            if not (torch.is_grad_enabled() and type(module).__name__.endswith("DecoderLayer")
                    and module.self_attn.layer_idx == 0):
                return None
            seen["grad_forwards"] += 1
            return _NanGradient.apply(output) if seen["grad_forwards"] in bad else None

        handles.append(torch.nn.modules.module.register_module_forward_hook(hook))
        return seen

    yield install
    for handle in handles:
        handle.remove()


_GUARD_BASE = ["experiment=smoke", "logger=none", "train.eval_before=false", "train.warmup_steps=0",
               "eval.benchmarks.embedded.source.size=4"]


@pytest.fixture(scope="module")
def one_step_students(tmp_path_factory):
    """engine -> the student after one clean step (warm-up 0: step 1's learning rate does not depend on
    train.steps), the reference for runs whose later steps were all skipped."""
    out = {}
    for engine in ("zero0", "zero3"):
        run_dir = tmp_path_factory.mktemp(f"one_step_{engine}")
        train(compose_config(*_GUARD_BASE, f"engine={engine}", "train.steps=1"), run_dir)
        out[engine] = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final").state_dict()
    return out


@pytest.mark.parametrize("engine", ["zero0", "zero3"])
def test_a_non_finite_gradient_is_not_applied(tmp_path, nan_gradient_at, one_step_students, engine):
    """Finite signals and loss, NaN gradient at step 2 of 2: the step is skipped with the gradient pass as its cause,
    and nothing of it reaches the weights or the schedule. Without ZeRO, DeepSpeed applied such a step (NaN
    weights) and logged no gradient norm; GuardedAdamW now discards it as DeepSpeed's ZeRO optimizers do."""
    seen = nan_gradient_at({2})
    run_dir = tmp_path / "run"
    train(compose_config(*_GUARD_BASE, f"engine={engine}", "train.steps=2"), run_dir)
    assert seen["grad_forwards"] == 2
    (trained,), (skipped,) = read_metrics(run_dir, "train"), read_metrics(run_dir, "skipped")
    assert trained["step"] == 1 and skipped["step"] == 2
    assert "gradient pass (the gradient norm went non-finite" in skipped["cause"], skipped["cause"]
    assert math.isfinite(trained["grad_norm"]) and trained["grad_norm"] > 0
    # The schedule did not advance (cosine over 2 steps: 0.5 x lr after one step, 0 after two).
    assert skipped["lr"] == trained["lr"] == pytest.approx(0.5 * 1e-4)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final").state_dict()
    reference = one_step_students[engine]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_skips_in_a_row_after_a_good_step_stop_the_run_with_its_checkpoint_intact(tmp_path, nan_gradient_at,
                                                                                      one_step_students):
    nan_gradient_at({2, 3})
    run_dir = tmp_path / "run"
    cfg = compose_config(*_GUARD_BASE, "engine=zero0", "train.steps=4", "train.max_skipped_steps=1",
                         "train.checkpoint_every=1", "train.max_checkpoints=2")
    with pytest.raises(NonFiniteStep, match=r"2 steps in a row were skipped .*the gradient pass"):
        train(cfg, run_dir)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert [r["step"] for r in read_metrics(run_dir, "skipped")] == [2, 3]
    (checkpoint,) = (run_dir / "checkpoints").glob("step_*")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    (states,) = checkpoint.rglob("*model_states.pt")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    reference = one_step_students["zero0"]
    assert all(torch.equal(module["lm." + k], reference[k]) for k in reference)  # the weights after step 1


