"""Device discipline, checked on a CPU-only machine: every tensor the step makes lives on the run's device.

Two checks stand in for a GPU. (1) torch's FakeTensorMode makes fake ``cuda:0`` tensors on this CPU build and
raises when an op mixes them with CPU tensors: the step's statistics, selection, quadrant labels and sums run
on fake CUDA inputs. (The loss cannot: on this CPU build, indexing a fake CUDA tensor with a tensor fails, and
autograd aborts the process on fake CUDA inputs; the static check below covers it.) (2) A static check: every tensor
factory in ``tip/`` names its device, because a factory without one makes a CPU tensor, and PyTorch refuses a
CPU generator for CUDA draws, which FakeTensorMode does not catch.
"""

import ast
import math
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tip.distributed import DistInfo, all_gather_rows, all_reduce_sum
from tip.selection import RULES, select, select_tokens
from tip.signals import TokenSignals
from tip.step_metrics import STEP_SUMS, reduce_step_sums
from tip.taxonomy import BatchStats, quadrant_labels

CUDA = torch.device("cuda", 0)
FAKE_GPU_RUN = DistInfo(rank=0, world_size=1, local_rank=0, device=CUDA)
TIP = Path(__file__).resolve().parents[1] / "tip"
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint",
             "randperm", "linspace", "eye", "Generator"}


def factories_without_device(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            found.append(f"{path.relative_to(TIP.parent)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_every_tensor_factory_names_its_device():
    """`torch.Generator()` (selection's generator, defect: entropy_sample and random crashed on CUDA) and
    `torch.tensor([...])` (the step's all-reduce buffers, defect: NCCL refuses CPU tensors) were such factories.
    A host tensor is fine when it says so (device="cpu")."""
    offenders = [line for path in sorted(TIP.rglob("*.py")) if "testbed" not in path.parts
                 for line in factories_without_device(path)]
    assert not offenders, "tensor factories without device=:\n" + "\n".join(offenders)


def fake_signals(mode, batch=3, length=12, dtype=torch.float32):
    real = dict(entropy=torch.rand(batch, length), reverse_kl=torch.rand(batch, length) * 2,
                forward_kl=torch.rand(batch, length) * 3, mask=torch.rand(batch, length) > 0.2,
                teacher_entropy=torch.rand(batch, length), jsd=torch.rand(batch, length))
    return TokenSignals(**{k: mode.from_tensor(v.to(dtype) if v.is_floating_point() else v).to(CUDA)
                           for k, v in real.items()})


def test_selection_refuses_a_generator_on_another_device():
    with FakeTensorMode() as mode:
        sig = fake_signals(mode)
        with pytest.raises(ValueError, match="generator is on cpu but the signals are on cuda:0"):
            select_tokens("entropy_sample", sig, 0.5, generator=torch.Generator(device="cpu"))


@pytest.mark.parametrize("rule", sorted(r for r in RULES if r not in ("random", "entropy_sample", "entropy_sample_is",
                                                                    "entropy_sample_is_capped")
                                        and not r.startswith("test_")))
def test_statistics_selection_labels_and_step_sums_stay_on_the_device(rule):
    with FakeTensorMode() as mode:
        sig = fake_signals(mode)
        h = all_gather_rows(sig.entropy.reshape(-1), FAKE_GPU_RUN)  # a stand-in for the gathered valid values
        stats = BatchStats.of(h, all_gather_rows(sig.reverse_kl.reshape(-1), FAKE_GPU_RUN))
        selection = select(rule, sig, 0.3, stats=stats, log_vocab=math.log(100))
        keep = selection.kept
        labels = quadrant_labels(sig.entropy, sig.reverse_kl, sig.mask, stats=stats)
        sums, quad = reduce_step_sums(sig, keep, labels, torch.zeros((), device=CUDA), FAKE_GPU_RUN,
                                      selection.weights)
        for t in (stats.entropy_cap, stats.divergence_max, keep, labels, sums, quad):
            assert t.device == CUDA
        if selection.weights is not None:
            assert selection.weights.device == CUDA
        assert sums.shape == (len(STEP_SUMS),) and sums.dtype == torch.float64


def test_collectives_refuse_tensors_off_the_device():
    with FakeTensorMode():
        with pytest.raises(RuntimeError, match="on cpu, but the run's device is cuda:0"):
            all_reduce_sum(torch.zeros(3, device="cpu"), FAKE_GPU_RUN)
        with pytest.raises(RuntimeError, match="on cpu, but the run's device is cuda:0"):
            all_gather_rows(torch.zeros(3, device="cpu"), FAKE_GPU_RUN)
