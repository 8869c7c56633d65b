"""The OPD loss: normalisation, accumulation, masking and gradients."""

import pytest
import torch

from tip.reference_loss import kept_token_divergence, opd_loss, opd_loss_from_logits
from tip.signals import logits_rows, projected_rows


def batch(seed=0, b=3, t=8, v=20, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g, dtype=dtype)
    te = torch.randn(b, t, v, generator=g, dtype=dtype)
    valid = torch.rand(b, t, generator=g) > 0.25
    keep = (torch.rand(b, t, generator=g) > 0.5) & valid
    return s, te, valid, keep


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_identical_student_and_teacher_give_zero_loss(kind):
    s, _, valid, keep = batch()
    out = opd_loss_from_logits(s, s.clone(), keep, valid, kind=kind)
    assert abs(float(out.loss)) < 1e-6


def test_kept_mean_and_all_mean_denominators():
    s, t, valid, keep = batch()
    per_pos = (torch.log_softmax(s, -1).exp() * (torch.log_softmax(s, -1) - torch.log_softmax(t, -1))).sum(-1)
    kept_out = opd_loss_from_logits(s, t, keep, valid, denominator="kept")
    all_out = opd_loss_from_logits(s, t, keep, valid, denominator="all")
    torch.testing.assert_close(kept_out.loss, per_pos[keep].mean())
    torch.testing.assert_close(all_out.loss, per_pos[keep].sum() / valid.sum())
    assert kept_out.kept_tokens == int(keep.sum()) and kept_out.valid_tokens == int(valid.sum())
    with pytest.raises(ValueError, match="unknown loss denominator 'tokens'"):
        opd_loss_from_logits(s, t, keep, valid, denominator="tokens")


def test_keep_outside_valid_is_ignored():
    s, t, valid, keep = batch()
    polluted = keep | ~valid  # claim to keep padding too
    torch.testing.assert_close(opd_loss_from_logits(s, t, polluted, valid).loss,
                               opd_loss_from_logits(s, t, keep, valid).loss)


def test_micro_batches_with_global_count_equal_one_big_batch():
    s, t, valid, keep = batch(b=4)
    s = s.requires_grad_()
    whole = opd_loss_from_logits(s, t, keep, valid)
    (g_whole,) = torch.autograd.grad(whole.loss, s)
    total_kept = int(keep.sum())
    # Two micro-batches of two rollouts each, normalised by the step's global count, summed.
    parts = [opd_loss_from_logits(s[i:i + 2], t[i:i + 2], keep[i:i + 2], valid[i:i + 2], global_count=total_kept)
             for i in (0, 2)]
    summed = parts[0].loss + parts[1].loss
    (g_parts,) = torch.autograd.grad(summed, s)
    torch.testing.assert_close(summed, whole.loss)
    torch.testing.assert_close(g_parts, g_whole)
    # Normalising each micro-batch by its own count instead is not the same objective (the per-micro-batch trap).
    naive = sum(opd_loss_from_logits(s[i:i + 2], t[i:i + 2], keep[i:i + 2], valid[i:i + 2]).loss for i in (0, 2)) / 2
    assert not torch.allclose(naive, whole.loss)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_gradient_check_float64(kind, beta):
    s, t, valid, keep = batch(b=2, t=4, v=6, dtype=torch.float64)
    s.requires_grad_()

    def f(x):
        return opd_loss_from_logits(x, t, keep, valid, kind=kind, beta=beta, chunk_size=3).loss

    assert torch.autograd.gradcheck(f, (s,))
    (g,) = torch.autograd.grad(f(s), s)
    assert (g[~keep] == 0).all() and g[keep].abs().sum() > 0  # only kept positions get gradient


def test_reverse_kl_gradient_has_the_closed_form():
    # d KL(P_S||P_T) / d z_S = P_S * (log P_S - log P_T - KL)  for each row.
    s, t, valid, _ = batch(b=1, t=3, v=5, dtype=torch.float64)
    keep = valid.clone()
    s.requires_grad_()
    out = opd_loss_from_logits(s, t, keep, valid, denominator="kept")
    (g,) = torch.autograd.grad(out.loss, s)
    ls, lt = torch.log_softmax(s.detach(), -1), torch.log_softmax(t, -1)
    kl = (ls.exp() * (ls - lt)).sum(-1, keepdim=True)
    want = ls.exp() * (ls - lt - kl) / keep.sum()
    torch.testing.assert_close(g[keep], want[keep])


def test_hidden_state_loss_equals_logits_loss_with_gradients():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 6, 11, generator=g, dtype=torch.float64)
    rows = torch.tensor([1, 2, 7, 9])
    a = kept_token_divergence(projected_rows(hidden, weight), logits_rows(teacher), rows, chunk_size=3).sum()
    ga = torch.autograd.grad(a, (hidden, weight))
    b = kept_token_divergence(logits_rows(hidden @ weight.T), logits_rows(teacher), rows).sum()
    gb = torch.autograd.grad(b, (hidden, weight))
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_mismatched_divergence_count_is_an_error():
    _, _, valid, keep = batch()
    with pytest.raises(ValueError, match="divergences for"):
        opd_loss(torch.zeros(1), keep, valid)
