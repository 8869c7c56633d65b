"""Signals and divergences against a float64 brute-force reference, plus the identities they must satisfy."""

import math

import pytest
import torch

from tip.signals import (
    CHUNK_BUDGET_MIB,
    divergence,
    entropy,
    forward_kl,
    jsd,
    log_probs,
    logits_rows,
    projected_rows,
    resolve_chunk_size,
    reverse_kl,
    signals_from_logits,
    token_signals,
)


def reference(student_logits, teacher_logits, beta=0.5):
    """Textbook float64 formulas, written independently of tip.signals."""
    ps = torch.softmax(student_logits.double(), -1)
    pt = torch.softmax(teacher_logits.double(), -1)
    ent = -(ps * ps.log()).nan_to_num().sum(-1)
    rkl = (ps * (ps.log() - pt.log())).nan_to_num().sum(-1)
    fkl = (pt * (pt.log() - ps.log())).nan_to_num().sum(-1)
    m = beta * pt + (1 - beta) * ps
    js = beta * (pt * (pt.log() - m.log())).nan_to_num().sum(-1) + (1 - beta) * (
        ps * (ps.log() - m.log())
    ).nan_to_num().sum(-1)
    return ent, rkl, fkl, js


def logit_pairs(vocab, rows=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    base_s, base_t = torch.randn(rows, vocab, generator=g), torch.randn(rows, vocab, generator=g)
    return {
        "normal": (base_s * 2, base_t * 2),
        "peaked": (base_s * 40, base_t * 40),  # near one-hot; several ids underflow to p = 0 in fp32
        "flat": (base_s * 1e-3, base_t * 1e-3),
        "peaked_vs_flat": (base_s * 40, base_t * 1e-3),
    }


@pytest.mark.parametrize("regime", ["normal", "peaked", "flat", "peaked_vs_flat"])
@pytest.mark.parametrize("vocab", [7, 1000])
def test_divergences_match_float64_reference(regime, vocab):
    s, t = logit_pairs(vocab)[regime]
    ent, rkl, fkl, js = reference(s, t, beta=0.3)
    ls, lt = log_probs(s), log_probs(t)
    assert ls.dtype == torch.float32
    torch.testing.assert_close(entropy(ls).double(), ent, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(reverse_kl(ls, lt).double(), rkl, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(forward_kl(ls, lt).double(), fkl, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(jsd(ls, lt, 0.3).double(), js, atol=5e-5, rtol=1e-4)


def test_full_qwen_vocabulary_bf16_inputs_chunked():
    vocab = 151_936
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(1, 6, vocab, generator=g) * 3).to(torch.bfloat16)
    t = (torch.randn(1, 6, vocab, generator=g) * 3).to(torch.bfloat16)
    mask = torch.ones(1, 6, dtype=torch.bool)
    sig = signals_from_logits(s, t, mask, chunk_size=4)  # two chunks, the second ragged
    ent, rkl, fkl, _ = reference(s[0], t[0])  # the reference sees exactly the bf16 values, in float64
    torch.testing.assert_close(sig.entropy[0].double(), ent / math.log(vocab), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sig.reverse_kl[0].double(), rkl, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(sig.forward_kl[0].double(), fkl, atol=1e-3, rtol=1e-4)


def test_identical_inputs_give_zero_and_kl_is_nonnegative():
    s, t = logit_pairs(500)["normal"]
    ls, lt = log_probs(s), log_probs(t)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        assert divergence(ls, ls, kind).abs().max() < 1e-5, kind
        assert (divergence(ls, lt, kind) >= -1e-6).all(), kind
        assert divergence(ls, lt, kind).min() > 1e-3, kind  # distinct inputs give a clearly positive value


def test_jsd_symmetric_at_half_and_bounded_by_log2():
    s, t = logit_pairs(300)["peaked_vs_flat"]
    ls, lt = log_probs(s), log_probs(t)
    torch.testing.assert_close(jsd(ls, lt, 0.5), jsd(lt, ls, 0.5))
    # Disjoint supports reach the bound: two one-hot distributions on different ids.
    a = torch.full((1, 4), -1e4)
    a[0, 0] = 0.0
    b = torch.full((1, 4), -1e4)
    b[0, 3] = 0.0
    bound = jsd(log_probs(a), log_probs(b), 0.5)
    assert (jsd(ls, lt, 0.5) <= math.log(2) + 1e-6).all()
    assert abs(float(bound) - math.log(2)) < 1e-5


def test_jsd_beta_limits():
    s, t = logit_pairs(200)["normal"]
    ls, lt = log_probs(s).double(), log_probs(t).double()
    # Endpoints are the limits of the rescaled divergence (TRL's convention).
    torch.testing.assert_close(jsd(ls, lt, 0.0), forward_kl(ls, lt))
    torch.testing.assert_close(jsd(ls, lt, 1.0), reverse_kl(ls, lt))
    # Near the endpoints the rescaled JSD converges to the KL directions, and the gap shrinks with beta.
    gaps_fwd, gaps_rev = [], []
    for eps in (1e-2, 1e-4, 1e-6, 1e-8):
        gaps_fwd.append(float((jsd(ls, lt, eps) / eps - forward_kl(ls, lt)).abs().max()))
        gaps_rev.append(float((jsd(ls, lt, 1 - eps) / eps - reverse_kl(ls, lt)).abs().max()))
    assert gaps_fwd == sorted(gaps_fwd, reverse=True) and gaps_fwd[-1] < 1e-4, gaps_fwd
    assert gaps_rev == sorted(gaps_rev, reverse=True) and gaps_rev[-1] < 1e-4, gaps_rev
    with pytest.raises(ValueError, match="beta must lie in"):
        jsd(ls, lt, 1.5)


def test_unknown_divergence_names_the_known_ones():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match=r"unknown divergence 'kl'.*reverse_kl, forward_kl, jsd"):
        divergence(x, x, "kl")


def test_chunk_size_invariance_and_mask_zeroes():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 9, 40, generator=g), torch.randn(3, 9, 40, generator=g)
    mask = torch.rand(3, 9, generator=g) > 0.3
    ref = signals_from_logits(s, t, mask, chunk_size=1000)
    for chunk in (1, 2, 5):
        got = signals_from_logits(s, t, mask, chunk_size=chunk)
        for name in ("entropy", "reverse_kl", "forward_kl"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=1e-6)
    assert (ref.entropy[~mask] == 0).all() and (ref.reverse_kl[~mask] == 0).all()
    assert (ref.entropy[mask] > 0).all()


def test_hidden_state_path_equals_logits_path_and_projects_only_valid_rows():
    g = torch.Generator().manual_seed(3)
    hs, ht = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 24, generator=g)
    ws, wt = torch.randn(30, 16, generator=g), torch.randn(30, 24, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    projected = []

    def counting(source):
        def rows(idx):
            projected.append(len(idx))
            return source(idx)
        return rows

    via_hidden = token_signals(counting(projected_rows(hs, ws)), projected_rows(ht, wt), mask, chunk_size=2)
    via_logits = token_signals(logits_rows(hs @ ws.T), logits_rows(ht @ wt.T), mask, chunk_size=2)
    for name in ("entropy", "reverse_kl", "forward_kl"):
        torch.testing.assert_close(getattr(via_hidden, name), getattr(via_logits, name))
    assert projected == [2, 2, 1]  # 5 valid rows in chunks of 2; padding never projected


def test_teacher_with_wider_vocabulary_is_cut_to_the_shared_ids():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(1, 3, 10, generator=g), torch.randn(1, 3, 12, generator=g)
    mask = torch.ones(1, 3, dtype=torch.bool)
    got = signals_from_logits(s, t, mask)
    want = signals_from_logits(s, t[..., :10], mask)
    torch.testing.assert_close(got.reverse_kl, want.reverse_kl)


def test_auto_chunk_size_fills_the_devices_budget_per_chunk_tensor():
    qwen = 151_936
    for device, mib in CHUNK_BUDGET_MIB.items():
        rows = resolve_chunk_size("auto", qwen, torch.device(device))
        assert rows * qwen * 4 <= mib * 2**20 < (rows + 1) * qwen * 4
    assert resolve_chunk_size("auto", qwen, torch.device("cpu")) == 48
    assert resolve_chunk_size("auto", qwen, torch.device("cuda", 3)) == 552
    assert resolve_chunk_size("auto", 10**9, torch.device("cpu")) == 1  # never 0 rows
    assert resolve_chunk_size(17, qwen, torch.device("cpu")) == 17
