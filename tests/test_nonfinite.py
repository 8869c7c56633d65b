"""Non-finite guard: a step whose signals are NaN/inf is not applied, is logged with its cause, and too many in a
row stop the run with a clear error and a failed status."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tip.models import resolve_model_ref
from tip.train import NonFiniteStep, nonfinite_signals, train

from support import compose_config


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


def _records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_skipped_steps_leave_the_student_as_it_was(tmp_path, broken_teacher):
    run_dir = tmp_path / "run"
    cfg = compose_config("experiment=smoke", "logger=none", "engine=zero0", f"pair.teacher={broken_teacher}",
                         "train.max_skipped_steps=5", "train.eval_before=false")
    train(cfg, run_dir)
    skipped = _records(run_dir, "skipped")
    assert [r["step"] for r in skipped] == [1, 2] and not _records(run_dir, "train")
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
    assert [r["step"] for r in _records(run_dir, "skipped")] == [1, 2]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "train.max_skipped_steps=1" in status["error"]
    # No step was applied, so none was checkpointed (checkpoint_every=1), and no final student was written.
    assert not list(run_dir.glob("checkpoints/step_*")) and not (run_dir / "checkpoints" / "final").exists()
