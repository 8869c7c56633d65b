"""Table 7's confirmation (issue 39, part 5): the carry metric separates the teacher's first decision
from the untrained student's, and the verdicts come from each cell's dev-chosen lr on the test half."""

import json
import math

import torch
import yaml

from tip.models import load_model, load_tokenizer
from tip.sweep_tuning import half_of
from tip.testbed.agent.confirm import confirm
from tip.testbed.agent.decision import carry_prompts, first_decision_logp

from support import compose_config


def test_the_carry_metric_sees_the_decision_greedy_accuracy_cannot():
    """On carry problems the teacher calls the tool first; the untrained student adds in its head.
    Greedy accuracy is 0% for the student there; the log-probability of <tool_call> is a number
    a training run can move."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_config("env=embedded_agent", "pair=embedded_agent",
                                                "eval=embedded_agent"), resolve=True)
    tok = load_tokenizer("embedded://agent_student")
    ids, prompts = carry_prompts(cfg, tok)
    assert ids and len(ids) == len(prompts)
    prompts = prompts[:16]
    scores = {}
    for who in ("teacher", "student"):
        model = load_model(f"embedded://agent_{who}", torch.float32, who).eval()
        scores[who] = sum(first_decision_logp(model, tok, prompts)) / len(prompts)
    assert scores["teacher"] > math.log(0.9)  # the teacher calls the tool
    assert scores["student"] < scores["teacher"] - 1.0  # the student mostly does not


def _cell(root, name, cell, seed, lr, acc, decision):
    (root / "multirun.yaml").write_text("hydra: {}\n")
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"cell={cell}", f"seed={seed}", f"train.lr={lr}"]))
    (d / "config.yaml").write_text(yaml.safe_dump(
        {"cell": cell, "seed": seed, "train": {"steps": 12, "lr": lr}}))
    (d / "status.json").write_text(json.dumps({"status": "completed"}))
    problems = [f"agent-{i}" for i in range(60)]
    (d / "eval.json").write_text(json.dumps({
        "before": {}, "after": {"embedded_agent/accuracy": acc},
        "after_problems": {"embedded_agent": {p: acc for p in problems}}}))
    (d / "decision.json").write_text(json.dumps({p: decision for p in problems[:30]}))


def test_the_confirmation_reads_each_cell_at_its_own_lr_on_the_test_half(tmp_path):
    n = 0
    for seed in (4, 5, 6, 7):
        noise = 0.01 * (seed % 3)
        for lr in (3e-5, 1e-4, 3e-4):
            best = lr == 1e-4
            _cell(tmp_path, str(n), "all@1.0", seed, lr, (0.50 if best else 0.3) + noise, -3.0)
            _cell(tmp_path, str(n + 1), "q3@0.2", seed, lr, (0.52 if lr == 3e-4 else 0.3) + noise,
                  -2.0 + noise)
            _cell(tmp_path, str(n + 2), "random@0.2", seed, lr, 0.40 + noise, -3.0 - noise)
            n += 3
    text = confirm(tmp_path)
    assert "| q3@0.2 | 0.0003 |" in text and "| all@1 | 0.0001 |" in text
    lines = {line.split(" | ")[0].lstrip("| ").split(" ")[0]: line for line in text.splitlines()
             if line.startswith("| T")}
    assert "+2.000" in lines["T1"]  # 52 - 50 points, the same on every seed: decided by its sign
    assert lines["T1"].endswith("| reproduced |") and lines["T2"].endswith("| reproduced |")
    assert lines["T3"].endswith("| reproduced |")
    assert any(half_of(f"agent-{i}", 0) == "test" for i in range(30))
