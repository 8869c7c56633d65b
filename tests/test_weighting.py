"""Weighting rules, the weighted loss and its denominators, the teacher's entropy, and keep schedules."""

import math

import pytest
import torch

from tip.config import ConfigError, check_config
from tip.keep import gumbel_threshold, keep_at
from tip.losses import fused_divergence_sum, loss_denominator
from tip.reference_loss import kept_token_divergence, opd_loss
from tip.selection import SelectionParams, select
from tip.signals import TokenSignals, entropy, jsd, jsd_rows, log_probs, logits_rows, row_signals, token_signals
from tip.sweep_cells import read_cell
from tip.train import train

from support import compose_config, read_metrics


def _signals(h, h_teacher=None, delta=None):
    h = torch.tensor(h, dtype=torch.float32)
    delta = torch.rand_like(h) if delta is None else torch.tensor(delta, dtype=torch.float32)
    return TokenSignals(h, delta, delta, torch.ones_like(h, dtype=torch.bool),
                        teacher_entropy=None if h_teacher is None else torch.tensor(h_teacher, dtype=torch.float32))


def test_hard_masks_give_todays_loss_and_weights_enter_as_stated():
    divs = torch.tensor([0.5, 2.0, 1.0])
    keep = torch.tensor([[True, False, True, True]])
    valid = torch.ones_like(keep)
    w = torch.tensor([[2.0, 9.0, 0.5, 1.0]])  # 9.0 sits on a dropped token: it must not count
    assert opd_loss(divs, keep, valid).loss == pytest.approx(3.5 / 3)
    assert opd_loss(divs, keep, valid, weights=torch.ones(1, 4)).loss == pytest.approx(3.5 / 3)
    weighted = 2.0 * 0.5 + 0.5 * 2.0 + 1.0 * 1.0
    assert opd_loss(divs, keep, valid, "kept", weights=w).loss == pytest.approx(weighted / 3)
    assert opd_loss(divs, keep, valid, "all", weights=w).loss == pytest.approx(weighted / 4)
    assert opd_loss(divs, keep, valid, "weight", weights=w).loss == pytest.approx(weighted / 3.5)
    assert loss_denominator(keep, valid, "weight") == 3  # hard mask: the sum of weights is the kept count


def test_the_fused_loss_weights_each_row_and_its_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(7, 11, dtype=torch.float64)
    w = torch.rand(7, dtype=torch.float64) * 3
    fused = fused_divergence_sum(hidden, weight, None, lambda i: teacher[i], chunk_size=3, row_weights=w)
    g_fused = torch.autograd.grad(fused.total, (hidden, weight))
    plain = kept_token_divergence(lambda i: hidden[i] @ weight.t(), lambda i: teacher[i], torch.arange(7), chunk_size=3)
    reference = (plain * w).sum()
    g_ref = torch.autograd.grad(reference, (hidden, weight))
    torch.testing.assert_close(fused.total, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.per_row, plain.detach(), rtol=1e-10, atol=1e-12)  # per_row stays unweighted
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_importance_weighted_entropy_sampling_is_unbiased_for_the_all_token_sum():
    """Averaged over many draws, sum_{kept} w_t x_t matches sum_t x_t (1%); plain entropy sampling scaled by m/k does
    not (it over-counts high-entropy tokens), which shows the check can fail."""
    torch.manual_seed(1)
    m, k_frac, draws = 8, 0.25, 40_000
    h = torch.tensor([0.9, 0.05, 0.3, 0.6, 0.02, 0.2, 0.5, 0.1])
    x = torch.tensor([1.0, 5.0, 2.0, 0.5, 4.0, 3.0, 1.5, 2.5])  # per-token losses, larger where h is small
    sig = TokenSignals(h.expand(draws, m).clone(), torch.zeros(draws, m), torch.zeros(draws, m),
                       torch.ones(draws, m, dtype=torch.bool))
    gen = torch.Generator().manual_seed(2)
    sel = select("entropy_sample_is", sig, k_frac, gen)
    assert (sel.kept.sum(-1) == 2).all()
    estimate = (torch.where(sel.kept, sel.weights, 0.0) * x).sum(-1).mean()
    assert float(estimate) == pytest.approx(float(x.sum()), rel=0.01)
    naive = (sel.kept.float() * x).sum(-1).mean() * (m / 2)
    assert abs(float(naive) / float(x.sum()) - 1) > 0.1
    # The threshold is the (k+1)-th largest key; with k = m nothing is left out and every weight is 1.
    assert torch.equal(gumbel_threshold(torch.tensor([[3.0, 1.0, 2.0]]), torch.ones(1, 3, dtype=torch.bool), 0.5,
                                        "sequence"), torch.full((1, 3), 2.0))
    one = TokenSignals(h[None], torch.zeros(1, m), torch.zeros(1, m), torch.ones(1, m, dtype=torch.bool))
    everything = select("entropy_sample_is", one, 1.0, gen)
    assert torch.equal(everything.weights, torch.ones(1, m))


def test_gumbel_keys_are_not_truncated():
    """The keys were -log(-log u) with fp32 u clamped at 1 - 1e-7: none above 15.9, so a token whose log-weight lay
    more than 15.9 below the threshold (the lowest-entropy ones) could never be drawn. This seed's first million
    keys hold one of 17.2 (a key above 16.5 turns up about once per 15 million draws)."""
    from tip.keep import gumbel as _gumbel

    keys = _gumbel(torch.Size([1_000_000]), torch.Generator().manual_seed(5), "cpu")
    assert float(keys.max()) > 16.5
    assert abs(float(keys.mean()) - 0.5772) < 0.005  # Gumbel(0, 1): mean Euler's gamma


def test_importance_weights_are_unbiased_with_low_entropies_and_the_capped_variant_is_biased_low():
    """Entropies log-uniform over [1e-4, 1] (weights reach about 1e3-1e4): the mean of the weighted kept sum is
    the all-token sum within 3 standard errors. Capping weights at c / rho bounds them and biases the estimate
    low, as documented."""
    m, keep, draws = 40, 0.25, 20_000
    h = torch.logspace(-4, 0, m)
    x = torch.ones(m)
    sig = TokenSignals(h.expand(draws, m).clone(), torch.zeros(draws, m), torch.zeros(draws, m),
                       torch.ones(draws, m, dtype=torch.bool))
    sel = select("entropy_sample_is", sig, keep, torch.Generator().manual_seed(3))
    per_draw = (torch.where(sel.kept, sel.weights, 0.0) * x).sum(-1).double()
    se = float(per_draw.std() / math.sqrt(draws))
    assert abs(float(per_draw.mean()) - m) < 3 * se, (float(per_draw.mean()), se)
    assert float(sel.weights.max()) > 1e3  # the low-entropy tokens were drawn, with their large weights
    capped = select("entropy_sample_is_capped", sig, keep, torch.Generator().manual_seed(3))
    assert float(capped.weights.max()) <= 10 / keep + 1e-6
    low = (torch.where(capped.kept, capped.weights, 0.0) * x).sum(-1).double()
    assert float(low.mean()) < m - 3 * float(low.std() / math.sqrt(draws))


def test_relative_confidence_and_position_weights_by_hand():
    log_v = math.log(100)
    sig = _signals([[0.5, 0.1, 0.3, 0.2]], h_teacher=[[0.1, 0.1, 0.4, 0.0]])
    want = torch.sigmoid(torch.tensor([[0.4, 0.0, -0.1, 0.2]]) * log_v)
    every = select("rel_conf", sig, 0.5, log_vocab=log_v)
    assert every.kept.all()
    torch.testing.assert_close(every.weights, want)
    top = select("rel_conf_topk", sig, 0.5, log_vocab=log_v)  # the 2 largest weights: positions 0 and 3
    assert top.kept.tolist() == [[True, False, False, True]]
    torch.testing.assert_close(top.weights, torch.where(top.kept, want, 0.0))
    with pytest.raises(ValueError, match="needs log"):
        select("rel_conf", sig, 0.5)
    ramp = select("position_weight", _signals([[0.1, 0.2, 0.3, 0.4]]), 0.5).weights
    torch.testing.assert_close(ramp, torch.tensor([[0.4, 0.8, 1.2, 1.6]]))
    assert select("teacher_entropy_topk", sig, 0.5).kept.tolist() == [[True, False, True, False]]


def test_the_teacher_entropy_is_computed_with_the_other_signals():
    logits_s, logits_t = torch.randn(5, 50), torch.randn(5, 50) * 3
    rows = row_signals(log_probs(logits_s), log_probs(logits_t))
    torch.testing.assert_close(rows[3], entropy(log_probs(logits_t)) / math.log(50))


def test_the_jsd_signal_is_the_symmetric_jsd_over_log_2_and_only_computed_when_asked():
    torch.manual_seed(3)
    logits_s, logits_t = torch.randn(2, 6, 40) * 2, torch.randn(2, 6, 40) * 2
    logits_t[1, 2] = logits_s[1, 2]  # identical rows: JSD 0
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    plain = token_signals(logits_rows(logits_s), logits_rows(logits_t), mask, chunk_size=4)
    asked = token_signals(logits_rows(logits_s), logits_rows(logits_t), mask, chunk_size=4, with_jsd=True,
                          with_top1=True)
    assert plain.jsd is None
    want = jsd(log_probs(logits_s), log_probs(logits_t), 0.5) / math.log(2)
    torch.testing.assert_close(asked.jsd, torch.where(mask, want, 0.0), atol=2e-6, rtol=1e-5)
    assert float(asked.jsd[1, 2]) == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= float(asked.jsd.max()) <= 1.0
    torch.testing.assert_close(asked.entropy, plain.entropy)  # the other rows do not move
    assert asked.top1 is not None and asked.top1.shape == (4, 2, 6)
    # Two disjoint point masses: JSD = log 2, i.e. 1 after normalising.
    s, t = torch.full((1, 3), -1e4), torch.full((1, 3), -1e4)
    s[0, 0], t[0, 1] = 0.0, 0.0
    lps, lpt = log_probs(s), log_probs(t)
    assert float(jsd_rows(lps, lpt, row_signals(lps, lpt))[0]) == pytest.approx(1.0, abs=1e-5)


def test_entropy_jsd_sampling_draws_with_p_proportional_to_h_alpha_jsd_gamma():
    """One token of two kept per draw: P(first) = w_0 / (w_0 + w_1) with w = h^alpha JSD^gamma (by hand)."""
    draws = 20_000
    h, j = torch.tensor([[0.2, 0.8]]), torch.tensor([[0.9, 0.1]])
    sig = TokenSignals(h.expand(draws, 2).clone(), torch.zeros(draws, 2), torch.zeros(draws, 2),
                       torch.ones(draws, 2, dtype=torch.bool), jsd=j.expand(draws, 2).clone())
    for alpha, gamma in ((1.0, 1.0), (1.0, 0.0), (2.0, 1.0)):
        w = h[0] ** alpha * j[0] ** gamma
        params = SelectionParams("entropy_jsd_sample", entropy_alpha=alpha, jsd_gamma=gamma)
        kept = select(params, sig, 0.5, torch.Generator().manual_seed(4)).kept
        assert (kept.sum(-1) == 1).all()
        assert float(kept[:, 0].float().mean()) == pytest.approx(float(w[0] / w.sum()), abs=0.015)
    with pytest.raises(ValueError, match="needs the JSD signal"):
        select("entropy_jsd_sample", TokenSignals(h, h, h, torch.ones(1, 2, dtype=torch.bool)), 0.5)


def test_keep_schedules_at_chosen_steps():
    assert keep_at(3, 10, 0.2) == 0.2
    assert keep_at(0, 10, 0.1, "linear", 1.0) == pytest.approx(1.0)
    assert keep_at(9, 10, 0.1, "linear", 1.0) == pytest.approx(0.1)
    assert keep_at(3, 10, 0.1, "linear", 1.0) == pytest.approx(1.0 - 0.9 * 3 / 9)
    assert keep_at(0, 11, 0.1, "cosine", 1.0) == pytest.approx(1.0)
    assert keep_at(5, 11, 0.1, "cosine", 1.0) == pytest.approx(0.55)  # half way
    assert keep_at(10, 11, 0.1, "cosine", 1.0) == pytest.approx(0.1)
    steps = [keep_at(s, 12, 0.1, "step", 1.0, [[5, 0.5], [9, 0.2]]) for s in range(12)]
    assert steps == [1.0] * 4 + [0.5] * 4 + [0.2] * 4  # milestones count steps from 1, as logged


def test_a_keep_schedule_and_a_weighting_rule_train_and_are_logged(tmp_path):
    train(compose_config("experiment=smoke", "logger=none", "selector=entropy_sample_is", "keep=0.2",
                         "train.denominator=all", "train.steps=3", "keep_schedule.kind=linear",
                         "train.eval_before=false", "eval.benchmarks.embedded.source.size=4", "train.save_final=false"),
          tmp_path / "run")
    rows = read_metrics(tmp_path / "run", "train")
    assert [r["keep"] for r in rows] == pytest.approx([1.0, 0.6, 0.2])
    assert rows[0]["effective_tokens"] == pytest.approx(rows[0]["kept_tokens"])  # keep 1: every weight 1
    assert rows[2]["mean_weight"] > 1.5 and rows[2]["effective_tokens"] < rows[2]["kept_tokens"]
    for q in ("q1", "q2", "q3", "q4"):
        assert 0.0 <= rows[0][f"{q}/mean_h_teacher"] <= 1.0
    assert rows[0]["mean_h_teacher"] > 0
    cell = read_cell(tmp_path / "run")  # the report's effective token fraction is below the kept fraction
    assert cell.effective_frac < cell.kept_frac


def test_bad_keep_schedules_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"keep_schedule.kind='exp' is not allowed: expected one of constant"):
        check_config(compose_config("keep_schedule.kind=exp"))
    with pytest.raises(ConfigError, match=r"keep_schedule.milestones=.* a step schedule needs"):
        check_config(compose_config("keep_schedule.kind=step"))
    with pytest.raises(ConfigError, match=r"keep_schedule.milestones\[0\]\[1\]=1.5 is not allowed"):
        check_config(compose_config("keep_schedule.kind=step", "keep_schedule.milestones=[[3,1.5]]"))


@pytest.mark.slow
def test_the_per_rollout_denominator_averages_each_rollouts_mean(tmp_path):
    """train.denominator=sequence (the paper's Eq. 1 and 9 read per rollout): the step's loss is the mean over
    rollouts of each rollout's mean divergence over its kept tokens, read back from the token records; the
    default token mean (kept) differs on the same tokens, since the rollouts differ in length."""
    from tip.token_records import read_token_records
    from tip.train import train

    from support import compose_config, read_metrics

    losses = {}
    for denominator in ("sequence", "kept"):
        run = tmp_path / denominator
        train(compose_config("experiment=smoke", "logger=none", "train.steps=1", "train.eval_before=false",
                             "train.save_final=false", "selector=soft_or", "keep=0.5",
                             f"train.denominator={denominator}"), run)
        (row,) = read_metrics(run, "train")
        losses[denominator] = row["loss"]
        columns, _ = read_token_records(run, 1)
        per_rollout = {}
        for r, kept, delta in zip(columns["rollout"], columns["kept"], columns["delta"]):
            if kept:
                per_rollout.setdefault(r, []).append(delta)
        lengths = {len(v) for v in per_rollout.values()}
        assert len(lengths) > 1  # rollouts of different lengths, or the two readings would agree
        if denominator == "sequence":
            expected = sum(sum(v) / len(v) for v in per_rollout.values()) / len(per_rollout)
        else:
            expected = sum(sum(v) for v in per_rollout.values()) / sum(len(v) for v in per_rollout.values())
        assert row["loss"] == pytest.approx(expected, rel=1e-4), denominator
    assert losses["sequence"] != pytest.approx(losses["kept"], rel=1e-3)
