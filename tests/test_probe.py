"""python -m tip.probe: each measured quantity against a direct computation, and the command on the embedded pair."""

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from tip.models import load_model, load_tokenizer
from tip.probe.measure import (
    ProbedTokens,
    probe_batch,
    probe_tokens,
    quadrant_masks,
    summed_gradient,
)
from tip.probe.tail import cut_before_tail, train_tail_only
from tip.rollout import hf_generate
from tip.signals import SIGNAL_ROWS, TokenSignals
from tip.tasks import sample_problems

from support import DATA_ROOT, ROOT, compose_config


@pytest.fixture(scope="module")
def pair_and_batches():
    tok = load_tokenizer("embedded://student")
    student = load_model("embedded://student", torch.float32, "student", "eager").eval()  # as tip.probe loads it
    teacher = load_model("embedded://teacher", torch.float32, "teacher").eval()
    teacher.requires_grad_(False)
    prompts = [tok(p.problem)["input_ids"] for p in sample_problems(6, seed=3)]
    torch.manual_seed(0)
    probed = hf_generate(student, tok, prompts[:3], n=2, temperature=1.0, max_new_tokens=20)
    held = hf_generate(student, tok, prompts[3:], n=2, temperature=1.0, max_new_tokens=20)
    return student, teacher, probed, held


def direct_token_losses(student, teacher, batch):
    """Per-token reverse KL straight from the models' logits (no tip code): (N,) with graph."""
    s_logp = torch.log_softmax(student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
    mask = batch.target_mask
    s, t = s_logp[:, :-1][mask], t_logp[:, :-1][mask]
    return (s.exp() * (s - t)).sum(-1)


def test_per_token_gradient_inner_products_equal_autograd_one_token_at_a_time(pair_and_batches):
    """<g_S, g_ho> from one weighted backward equals the sum over S of per-token gradients taken one token at a time
    by autograd on the models' own logits, restricted to the last block, the final norm and the output layer; the
    probe's per-token losses are the reverse KL of the logits."""
    student, teacher, probed, held = pair_and_batches
    params = train_tail_only(student, 1)
    tokens = probe_tokens(student, teacher, probed, "reverse_kl", 0.5, blocks=1)
    held_tokens = probe_tokens(student, teacher, held, "reverse_kl", 0.5, blocks=1)
    with cut_before_tail(student, 1):
        direct = direct_token_losses(student, teacher, probed)
        direct_held = direct_token_losses(student, teacher, held)
    torch.testing.assert_close(tokens.losses, direct, rtol=1e-4, atol=1e-6)

    def flat_grad(loss):
        return torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(loss, params, retain_graph=True)])

    g_ho = flat_grad(direct_held.sum())
    torch.testing.assert_close(summed_gradient(held_tokens.losses, params, torch.ones_like(held_tokens.losses)), g_ho,
                               rtol=1e-4, atol=1e-8)
    subset = torch.zeros(tokens.losses.numel(), dtype=torch.bool)
    subset[[0, 3, 7, 11]] = True
    per_token = [float(flat_grad(direct[t]) @ g_ho) for t in subset.nonzero().flatten().tolist()]
    assert float(summed_gradient(tokens.losses, params, subset.float()) @ g_ho) == pytest.approx(sum(per_token),
                                                                                                 rel=1e-4)
    # Only the tail: with the cut, the tied embedding's gradient is the output layer's part alone (the input lookup
    # would otherwise pull it through every frozen block): the same as projecting detached final hidden states.
    weight = student.get_output_embeddings().weight
    assert weight is student.get_input_embeddings().weight and any(p is weight for p in params)
    (g_weight,) = torch.autograd.grad(tokens.losses.sum(), [weight], retain_graph=True)
    with torch.no_grad():
        hidden = student.get_decoder()(input_ids=probed.input_ids,
                                       attention_mask=probed.attention_mask).last_hidden_state
    s_logp = torch.log_softmax(hidden[:, :-1][probed.target_mask] @ weight.T, -1)
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(input_ids=probed.input_ids).logits, -1)[:, :-1][probed.target_mask]
    (head_only,) = torch.autograd.grad((s_logp.exp() * (s_logp - t_logp)).sum(), [weight])
    torch.testing.assert_close(g_weight, head_only, rtol=1e-4, atol=1e-7)


def hand_tokens(h, d):
    """ProbedTokens of one row with these h and delta values (every position valid)."""
    h, d = torch.tensor([h]), torch.tensor([d])
    mask = torch.ones_like(h, dtype=torch.bool)
    flat = torch.stack([h.reshape(-1), d.reshape(-1), d.reshape(-1), h.reshape(-1)])
    assert len(SIGNAL_ROWS) == 4
    stats = {"entropy": h.reshape(-1), "reverse_kl": d.reshape(-1)}
    return ProbedTokens(torch.zeros(h.numel()), stats, TokenSignals.from_flat(flat, mask))


def test_per_token_alignments_equal_one_backward_per_token(pair_and_batches):
    """token_alignments (a double backward) gives <g_t, d> for every token at once: equal, token by token, to
    autograd's gradient of that token's loss alone."""
    from tip.probe.measure import token_alignments

    student, teacher, probed, _ = pair_and_batches
    params = train_tail_only(student, 1)
    tokens = probe_tokens(student, teacher, probed, "reverse_kl", 0.5, blocks=1)
    direction = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)
    phi = token_alignments(tokens.losses, params, direction)
    assert phi.shape == tokens.losses.shape
    scale = float(phi.abs().max())  # fp32 gradients: agreement relative to the largest alignment
    for t in (0, 4, 9, tokens.losses.numel() - 1):
        one_hot = torch.zeros_like(tokens.losses)
        one_hot[t] = 1
        assert float(phi[t]) == pytest.approx(float(summed_gradient(tokens.losses, params, one_hot) @ direction),
                                              rel=1e-3, abs=1e-4 * scale)


def test_quadrant_masks_match_a_hand_count():
    """Median thresholds (the batch's lower medians, strictly above is high) and absolute ones, against the
    quadrants written down by hand."""
    h = [0.9, 0.8, 0.1, 0.05, 0.7, 0.02, 0.3, 0.01]
    d = [3.0, 0.01, 2.0, 0.0, 0.2, 5.0, 1.0, 0.1]
    tokens = hand_tokens(h, d)
    # medians: h sorted .01 .02 .05 .1 .3 .7 .8 .9 -> lower median 0.1; d sorted 0 .01 .1 .2 1 2 3 5 -> 0.2
    by_hand = {"Q1": [0, 6], "Q2": [1, 4], "Q3": [2, 5], "Q4": [3, 7]}
    assert {q: m.nonzero().flatten().tolist() for q, m in quadrant_masks(tokens).items()} == by_hand
    absolute = {"entropy": 0.5, "divergence": 1.5}  # high h: 0.9 .8 .7; high d: 3 2 5
    by_hand = {"Q1": [0], "Q2": [1, 4], "Q3": [2, 5], "Q4": [3, 6, 7]}
    assert {q: m.nonzero().flatten().tolist() for q, m in quadrant_masks(tokens, absolute).items()} == by_hand


def test_a_probe_of_the_embedded_pair_adds_up(pair_and_batches):
    """One (probed, held-out) pair: the quadrants' token and descent shares each add up to 1, the per-quadrant means
    equal the means of the tokens' own values, `all` keeps the whole descent, and a rule's kept share is what the
    selection kept."""
    student, teacher, probed, held = pair_and_batches
    cfg = compose_config("probe.keeps=[0.2]", "probe.rules=[all,q3,entropy_sample]")
    out = probe_batch(student, teacher, probed, held, cfg, seed=0)
    assert out["all_descent"] == pytest.approx(out["all_descent_direct"], rel=1e-6)  # per-token sums = one backward
    for scheme in ("median", "absolute"):
        rows = out["quadrants"][scheme]
        assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
        assert sum(r["descent_share"] for r in rows.values()) == pytest.approx(1.0, abs=1e-6)
    tokens = probe_tokens(student, teacher, probed, "reverse_kl", 0.5, blocks=1)
    q1 = quadrant_masks(tokens)["Q1"]
    assert out["quadrants"]["median"]["Q1"]["entropy"] == pytest.approx(float(tokens.stats["entropy"][q1].mean()))
    assert out["quadrants"]["median"]["Q1"]["logit_signal"] == pytest.approx(
        float(tokens.stats["logit_signal"][q1].mean()), rel=1e-5)
    rules = {r["rule"]: r for r in out["rules"]}
    assert rules["all"]["descent_share"] == pytest.approx(1.0) and rules["all"]["cosine_with_all"] == pytest.approx(1.0)
    assert 0 < rules["q3"]["kept_frac"] <= 0.2 + 1e-6 and rules["q3"]["q3_descent_share"] > 0.5


def test_the_logit_signal_and_curvature_are_their_formulas(pair_and_batches):
    student, teacher, probed, _ = pair_and_batches
    tokens = probe_tokens(student, teacher, probed, "reverse_kl", 0.5, blocks=1)
    with torch.no_grad():
        s = torch.softmax(student(input_ids=probed.input_ids).logits, -1)[:, :-1][probed.target_mask]
        t = torch.softmax(teacher(input_ids=probed.input_ids).logits, -1)[:, :-1][probed.target_mask]
    torch.testing.assert_close(tokens.stats["logit_signal"], ((s - t) ** 2).sum(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tokens.stats["curvature"], 1 - (s ** 2).sum(-1), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_probe_command_runs_on_the_embedded_pair(tmp_path):
    cmd = [sys.executable, "-m", "tip.probe", f"hydra.run.dir={tmp_path}", f"data_root={DATA_ROOT}",
           "probe.prompts=3", "probe.batches=2", "probe.max_new_tokens=24"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=600)
    result = json.loads((tmp_path / "probe.json").read_text())
    assert len(result["batches"]) == 2 and len(result["batches"][0]["rules"]) == 8 * 3
    assert "## Quadrants, median thresholds" in (tmp_path / "probe.md").read_text()
    assert (tmp_path / "probe.png").stat().st_size > 1000
    with pytest.raises(subprocess.CalledProcessError) as err:
        subprocess.run([*cmd[:3], f"hydra.run.dir={tmp_path / 'x'}", "probe.blocks=0"], check=True,
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert "probe.blocks=0 is not allowed" in err.value.stderr


def test_probe_settings_are_checked():
    from tip.config import ConfigError
    from tip.probe.run import check_probe

    with pytest.raises(ConfigError, match="probe.rules: 'q7' is not a rule"):
        check_probe(compose_config("probe.rules=[q7]"))
    with pytest.raises(ConfigError, match="probe.keeps: 1.5 is not allowed"):
        check_probe(compose_config("probe.keeps=[1.5]"))
    with pytest.raises(ConfigError, match="probe.absolute.divergence='high' is not allowed: expected a number"):
        check_probe(compose_config("probe.absolute.divergence=high"))
    assert OmegaConf.select(compose_config(), "probe.absolute.divergence") == 0.5


def test_the_predictions_are_decided_per_batch_as_pre_registered():
    from tip.probe.predictions import verdicts

    def batch(phi, q3_share, es_q3):
        quads = {q: {"phi": v} for q, v in zip(("Q1", "Q2", "Q3", "Q4"), phi)}
        return {"quadrants": {"median": quads},
                "rules": [{"rule": "q3", "keep": 0.1, "descent_share": q3_share},
                          {"rule": "entropy_sample", "keep": 0.1, "q3_descent_share": es_q3}]}

    result = {"batches": [batch([1.0, 0.1, 1.5, 0.2], 0.6, 0.1), batch([1.0, 0.1, 0.4, 0.2], 0.3, 0.1),
                          batch([1.0, 0.1, 3.0, 0.0], 0.2, 0.5)]}
    v = verdicts(result)
    assert v["P1"]["holds"] == [True, False, True] and v["P1"]["verdict"] == "inconclusive"  # 7.5x, 2x, Q4 at 0
    assert v["P2"]["holds"] == [True, False, False] and v["P2"]["verdict"] == "inconclusive"
    assert v["P3"]["holds"] == [True, False, False]
    # P4 is true by construction (entropy sampling draws by entropy; Q3 is the low-entropy half): it is
    # reported as a sanity check, whether it held or not (issue 39)
    assert v["P4"]["holds"] == [True, True, False] and v["P4"]["verdict"] == "sanity check"
    all_fail = {"batches": [batch([1.0, 0.1, -0.5, 0.2], 0.1, 0.9)] * 3}
    assert {k: x["verdict"] for k, x in verdicts(all_fail).items()} == {
        **dict.fromkeys(("P1", "P2", "P3"), "not reproduced"), "P4": "sanity check"}


def test_the_probe_selects_each_rule_as_a_run_of_it_would():
    """The probe compared rules with their knobs dropped (every rule at entropy_alpha 1 whatever the config said);
    it now builds the same SelectionParams a run builds: the configured rule's as configured, each other rule's from
    its own file."""
    from tip.probe.measure import rule_params
    from tip.selection import SelectionParams
    from tip.step import StepSettings

    cfg = compose_config("selector=entropy_sample", "selector.entropy_alpha=2", "selection.scope=batch",
                         "probe.rules=[entropy_sample,entropy_jsd_sample,q3]")
    params = rule_params(cfg)
    run = StepSettings.of(cfg, chunk_size=64, micro_size=4).selection
    assert params["entropy_sample"] == run == SelectionParams("entropy_sample", scope="batch", entropy_alpha=2.0)
    assert params["entropy_jsd_sample"] == SelectionParams("entropy_jsd_sample", scope="batch")
    assert params["q3"].rule == "q3" and params["q3"].scope == "batch"
