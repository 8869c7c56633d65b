"""The kept-token loss with gradients formed in its forward chunk loop (tip.losses.fused_divergence_sum) equals
the straightforward full-logits computation — loss, gradients and signals, for every divergence — while each row
is projected once per model and autograd holds no K x V tensor."""

import pytest
import torch
import torch.nn.functional as F

from tip.losses import fused_divergence_sum
from tip.reference_loss import kept_token_divergence
from tip.signals import logits_rows, token_signals

K, H, V = 37, 16, 50
KINDS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


def make(seed=0, teacher_width=V, bias=True, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(K, H, generator=g, dtype=dtype) * scale).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    teacher = torch.randn(K, teacher_width, generator=g, dtype=dtype) * scale
    return hidden, weight, b, teacher


def reference(hidden, weight, b, teacher, kind, beta, softcap=None):
    logits = F.linear(hidden, weight, b)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    rows = torch.arange(K)
    return kept_token_divergence(lambda i: logits[i], lambda i: teacher[i], rows, kind, beta, chunk_size=1000)


def grads(total, *tensors):
    return torch.autograd.grad(total, [t for t in tensors if t is not None], retain_graph=True)


@pytest.mark.parametrize("kind, beta", KINDS)
@pytest.mark.parametrize("teacher_width", [V, V + 3, V - 4])  # wider and narrower teacher heads
def test_loss_and_gradients_equal_the_full_logits_computation(kind, beta, teacher_width):
    hidden, weight, b, teacher = make(teacher_width=teacher_width)
    want = reference(hidden, weight, b, teacher, kind, beta)
    got = fused_divergence_sum(hidden, weight, b, lambda i: teacher[i], kind, beta, chunk_size=8)
    torch.testing.assert_close(got.per_row, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.total, want.sum(), rtol=1e-10, atol=1e-12)
    # An upstream scale (the loss's 1/count and the engine's factors) reaches every gradient.
    for g, w in zip(grads(got.total * 0.37, hidden, weight, b), grads(want.sum() * 0.37, hidden, weight, b)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
        assert g.abs().sum() > 0


@pytest.mark.parametrize("kind, beta", KINDS)
def test_with_a_final_logit_softcap_and_without_bias(kind, beta):
    hidden, weight, _, teacher = make(seed=1, bias=False)
    want = reference(hidden, weight, None, teacher, kind, beta, softcap=5.0)
    got = fused_divergence_sum(hidden, weight, None, lambda i: teacher[i], kind, beta, chunk_size=5, softcap=5.0)
    torch.testing.assert_close(got.total, want.sum(), rtol=1e-10, atol=1e-12)
    for g, w in zip(grads(got.total, hidden, weight), grads(want.sum(), hidden, weight)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind, beta", KINDS)
def test_the_signals_of_its_loop_equal_the_scoring_loops(kind, beta):
    hidden, weight, b, teacher = make(seed=6, teacher_width=V + 3, dtype=torch.float32)
    got = fused_divergence_sum(hidden, weight, b, lambda i: teacher[i], kind, beta, chunk_size=6, with_signals=True)
    logits = F.linear(hidden, weight, b).detach()
    want = token_signals(logits_rows(logits[None]), logits_rows(teacher[None]), torch.ones(1, K, dtype=torch.bool))
    for row, signal in zip(got.signals, (want.entropy, want.reverse_kl, want.forward_kl)):
        torch.testing.assert_close(row, signal[0], rtol=1e-5, atol=1e-6)
    assert got.signals[0].min() > 0 and got.signals[1].max() > 0.1


def test_float32_matches_within_float_tolerance_and_chunk_size_does_not_matter():
    hidden, weight, b, teacher = make(seed=2, dtype=torch.float32)
    want = reference(hidden, weight, b, teacher, "reverse_kl", 0.5)
    outs = []
    for chunk in (1, 7, 64):
        got = fused_divergence_sum(hidden, weight, b, lambda i: teacher[i], "reverse_kl", chunk_size=chunk)
        torch.testing.assert_close(got.per_row, want.detach(), rtol=1e-5, atol=1e-6)
        outs.append(grads(got.total, hidden, weight, b))
    for g in outs[1:]:
        for x, y in zip(g, outs[0]):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)  # fp32 summation order differs per chunking


def test_gradcheck():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 9, generator=g, dtype=torch.float64)
    for kind, beta in KINDS:
        assert torch.autograd.gradcheck(
            lambda h, w, bb, kind=kind, beta=beta: fused_divergence_sum(h, w, bb, lambda i: teacher[i], kind, beta,
                                                                        chunk_size=4).total,
            (hidden, weight, b))


def test_no_kept_rows_gives_zero_and_zero_gradients():
    hidden = torch.zeros(0, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    out = fused_divergence_sum(hidden, weight, None, lambda i: torch.zeros(len(i), V), "reverse_kl")
    assert out.per_row.shape == (0,) and float(out.total) == 0.0
    out.total.backward()
    assert weight.grad is not None and weight.grad.abs().sum() == 0


def test_autograd_holds_no_logits_of_the_kept_rows():
    hidden, weight, b, teacher = make(seed=4, dtype=torch.float32)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        reference(hidden, weight, b, teacher, "reverse_kl", 0.5)
    assert max(sizes) >= K * V  # the straightforward path keeps K x V logits (and softmax outputs) for backward
    out = fused_divergence_sum(hidden, weight, b, lambda i: teacher[i], "reverse_kl", chunk_size=8)
    # What backward will use: the gradients w.r.t. the hidden rows, the weight and the bias, nothing else.
    assert [t.shape for t in out.total.grad_fn.saved_tensors] == [(K, H), (V, H), (V,)]


def test_each_row_is_projected_once_per_model_and_the_layers_gathered_once():
    hidden, weight, b, teacher = make(seed=5)
    entered, teacher_rows = [], []

    class Gather:
        def __enter__(self):
            entered.append("in")

        def __exit__(self, *exc):
            entered.append("out")

    def teacher_source(i):
        teacher_rows.extend(i.tolist())
        return teacher[i]

    out = fused_divergence_sum(hidden, weight, b, teacher_source, "jsd", 0.5, chunk_size=10, gather=Gather)
    assert entered == ["in", "out"]
    out.total.backward()
    assert entered == ["in", "out"]  # backward only scales what forward formed
    assert sorted(teacher_rows) == list(range(K))
