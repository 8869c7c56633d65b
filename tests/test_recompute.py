"""The kept-token loss with logits recomputed in backward equals the straightforward full-logits computation —
loss and gradients, for every divergence — while autograd holds no K x V tensor."""

import pytest
import torch
import torch.nn.functional as F

from tip.losses import kept_token_divergence, recomputed_kept_divergence

K, H, V = 37, 16, 50
KINDS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


def make(seed=0, teacher_width=V, bias=True, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(K, H, generator=g, dtype=dtype) * scale).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    teacher = torch.randn(K, teacher_width, generator=g, dtype=dtype) * scale
    weights = torch.rand(K, generator=g, dtype=dtype)  # an arbitrary upstream gradient
    return hidden, weight, b, teacher, weights


def reference(hidden, weight, b, teacher, kind, beta, softcap=None):
    logits = F.linear(hidden, weight, b)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    rows = torch.arange(K)
    return kept_token_divergence(lambda i: logits[i], lambda i: teacher[i], rows, kind, beta, chunk_size=1000)


def grads(divs, weights, *tensors):
    return torch.autograd.grad((divs * weights).sum(), [t for t in tensors if t is not None], retain_graph=True)


@pytest.mark.parametrize("kind, beta", KINDS)
@pytest.mark.parametrize("teacher_width", [V, V + 3, V - 4])  # wider and narrower teacher heads
def test_loss_and_gradients_equal_the_full_logits_computation(kind, beta, teacher_width):
    hidden, weight, b, teacher, weights = make(teacher_width=teacher_width)
    want = reference(hidden, weight, b, teacher, kind, beta)
    got = recomputed_kept_divergence(hidden, weight, b, lambda i: teacher[i], kind, beta, chunk_size=8)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-10, atol=1e-12)
    for g, w in zip(grads(got, weights, hidden, weight, b), grads(want, weights, hidden, weight, b)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads(got, weights, hidden, weight, b))


@pytest.mark.parametrize("kind, beta", KINDS)
def test_with_a_final_logit_softcap_and_without_bias(kind, beta):
    hidden, weight, _, teacher, weights = make(seed=1, bias=False)
    want = reference(hidden, weight, None, teacher, kind, beta, softcap=5.0)
    got = recomputed_kept_divergence(hidden, weight, None, lambda i: teacher[i], kind, beta, chunk_size=5,
                                     softcap=5.0)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-10, atol=1e-12)
    for g, w in zip(grads(got, weights, hidden, weight), grads(want, weights, hidden, weight)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_float32_matches_within_float_tolerance_and_chunk_size_does_not_matter():
    hidden, weight, b, teacher, weights = make(seed=2, dtype=torch.float32)
    want = reference(hidden, weight, b, teacher, "reverse_kl", 0.5)
    outs = []
    for chunk in (1, 7, 64):
        got = recomputed_kept_divergence(hidden, weight, b, lambda i: teacher[i], "reverse_kl", chunk_size=chunk)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        outs.append(grads(got, weights, hidden, weight, b))
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
            lambda h, w, bb, kind=kind, beta=beta: recomputed_kept_divergence(h, w, bb, lambda i: teacher[i], kind,
                                                                              beta, chunk_size=4),
            (hidden, weight, b))


def test_no_kept_rows_gives_an_empty_result_and_zero_gradients():
    hidden = torch.zeros(0, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    out = recomputed_kept_divergence(hidden, weight, None, lambda i: torch.zeros(len(i), V), "reverse_kl")
    assert out.shape == (0,)
    out.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() == 0


def saved_numels(fn):
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        fn()
    return sizes


def test_autograd_holds_no_logits_of_the_kept_rows():
    hidden, weight, b, teacher, _ = make(seed=4, dtype=torch.float32)
    full = saved_numels(lambda: reference(hidden, weight, b, teacher, "reverse_kl", 0.5))
    ours = saved_numels(lambda: recomputed_kept_divergence(hidden, weight, b, lambda i: teacher[i], "reverse_kl",
                                                           chunk_size=8))
    assert max(full) >= K * V  # the straightforward path keeps K x V logits (and softmax outputs) for backward
    assert sum(ours) == K * H + V * H + V  # ours keeps its inputs only: hidden rows, weight, bias (references)


def test_a_gather_context_wraps_both_passes():
    hidden, weight, b, teacher, weights = make(seed=5)
    entered = []

    class Gather:
        def __enter__(self):
            entered.append("in")

        def __exit__(self, *exc):
            entered.append("out")

    out = recomputed_kept_divergence(hidden, weight, b, lambda i: teacher[i], "jsd", 0.5, chunk_size=10,
                                     gather=Gather)
    assert entered == ["in", "out"]
    (out * weights).sum().backward()
    assert entered == ["in", "out", "in", "out"]
