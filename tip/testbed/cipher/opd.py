"""On-policy distillation on a testbed-v2 pair, one cell at a time, with the metrics the v2 claims
are decided on (``tip.testbed.cipher.sweep`` runs the grid).

A cell is (rule, keep, optimizer, build, seed). Each step: the student samples rollouts of the
step's training prompts, the teacher scores them, the library's ``tip.signals`` and
``tip.selection.select`` decide the kept tokens, the loss is the library's reverse KL
(``tip.signals.divergence``) over them. The loop is compact (no Hydra, DeepSpeed or run directory)
so that the sweep's hundreds of cells fit in 30 minutes on 2 cores; the rules and the loss are the
library's.

- ``adamw``: the loss is the kept tokens' mean (train.denominator=auto's, the paper's).
- ``sgd``: the optimizer control. The loss is the kept tokens' sum over *all* valid tokens
  (train.denominator=all), so each rule's step is the all-token step restricted to its tokens:
  what a rule gains is what its tokens' gradients carry, not a step AdamW rescales to lr.

Metrics, on a fixed held-out set of prompts (``heldout``):

- primary: the teacher-forced mean log-probability of the correct token at each planted kind's
  positions (``logp@confident``, ``logp@inconsistent``; a choice letter's either code is correct);
- secondary: greedy accuracy at those positions (the generated code equals the correct one);
- per step: each kind's recall (the share of the batch's planted positions the rule kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tip.engine import OPTIMIZERS
from tip.losses import loss_denominator, normalised_loss
from tip.models import load_model, load_tokenizer
from tip.rollout import hf_generate
from tip.selection import select
from tip.signals import divergence, log_probs, signals_from_logits
from tip.testbed.cipher.build import ERROR_KINDS, LENGTH, Cipher, load_cipher


@dataclass(frozen=True)
class Budget:
    """The training budget of every cell (frozen after calibration on the development build)."""

    steps: int = 30
    prompts: int = 8  # per step
    samples: int = 4  # rollouts per prompt
    adamw_lr: float = 3e-5
    sgd_lr: float = 2e-4
    adamw_max_norm: float = 1.0  # the library's default clipping
    sgd_max_norm: float = 0.0  # none: clipping would rescale each rule's step to one size again


BUDGET = Budget()
OPTIMIZER_LOSS = {"adamw": "kept", "sgd": "all"}  # each arm's loss denominator (module docstring)


@dataclass
class Pair:
    cipher: Cipher
    tok: object
    teacher: torch.nn.Module
    student_state: dict  # the untrained student's weights (each cell starts from them)
    student: torch.nn.Module

    @classmethod
    def load(cls, pair_dir: Path) -> Pair:
        tok = load_tokenizer(str(pair_dir / "student"))
        teacher = load_model(str(pair_dir / "teacher"), torch.float32, "teacher").eval()
        student = load_model(str(pair_dir / "student"), torch.float32, "student").eval()
        state = {k: v.clone() for k, v in student.state_dict().items()}
        return cls(load_cipher(pair_dir), tok, teacher, state, student)

    def fresh_student(self) -> torch.nn.Module:
        self.student.load_state_dict(self.student_state)
        return self.student.eval()


def cell_loss(per_token: torch.Tensor, kept: torch.Tensor, mask: torch.Tensor,
              optimizer: str) -> torch.Tensor:
    """The kept tokens' summed divergence over the arm's denominator (``OPTIMIZER_LOSS``): the kept
    count (AdamW) or every valid token (SGD), normalised as a training run normalises it
    (``tip.losses``)."""
    kept = kept & mask
    return normalised_loss(torch.where(kept, per_token, 0.0).sum(),
                           loss_denominator(kept, mask, OPTIMIZER_LOSS[optimizer]))


def kind_masks(cipher: Cipher, prompts: list[str], rows: list[int], width: int,
               start: int) -> dict[str, torch.Tensor]:
    """(B, width) bool per error kind: the target positions (from ``start``) of rollouts answering
    ``prompts[rows[b]]`` whose prompt letter is of that kind."""
    out = {kind: torch.zeros(len(rows), width, dtype=torch.bool, device="cpu")
           for kind in ERROR_KINDS}
    for b, i in enumerate(rows):
        for j, kind in enumerate(cipher.kinds(prompts[i])):
            if kind in out and start + j < width:  # a rollout that ended early is narrower
                out[kind][b, start + j] = True
    return out


def sample_batch(pair: Pair, student, part: list[str], budget: Budget):
    """The student's rollouts of ``part`` (temperature 1), the teacher's logits over them (B, L-1,
    V), and each error kind's planted positions among the valid ones (B, L-1)."""
    tok = pair.tok
    batch = hf_generate(student, tok, [tok.convert_tokens_to_ids(list(p)) for p in part],
                        n=budget.samples, temperature=1.0, max_new_tokens=LENGTH + 1)
    with torch.no_grad():
        t_logits = pair.teacher(input_ids=batch.input_ids,
                                attention_mask=batch.attention_mask).logits[:, :-1]
    mask = batch.target_mask
    planted = kind_masks(pair.cipher, part, batch.example_index, mask.shape[1], LENGTH)
    return batch, t_logits, {kind: at & mask for kind, at in planted.items()}


@torch.no_grad()
def heldout(pair: Pair, model, prompts: list[str]) -> dict[str, float]:
    """The primary (teacher-forced log-probability) and secondary (greedy accuracy) metrics per
    error kind, and over every answer position (``@all``: the whole task, where a rule that
    concentrates its step on one kind may lose elsewhere; a choice letter's code is the one
    ``Cipher.answer`` writes, which both models give about half)."""
    tok, cipher = pair.tok, pair.cipher
    ids = torch.tensor([tok.convert_tokens_to_ids(list(p + cipher.answer(p))) + [tok.eos_token_id]
                        for p in prompts], device="cpu")
    logp = log_probs(model(input_ids=ids).logits[:, LENGTH:LENGTH + LENGTH])  # answer positions
    right = ids[:, LENGTH + 1:LENGTH + 1 + LENGTH]
    logp_right = logp.gather(-1, right[..., None]).squeeze(-1)
    prompt_ids = ids[:, :LENGTH + 1]
    greedy = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                            max_new_tokens=LENGTH, min_new_tokens=LENGTH, do_sample=False,
                            pad_token_id=tok.pad_token_id)[:, LENGTH + 1:]
    out = {}
    for kind in ERROR_KINDS:
        at = torch.tensor([[k == kind for k in cipher.kinds(p)[:LENGTH]] for p in prompts],
                          device="cpu")
        out[f"logp@{kind}"] = float(logp_right[at].mean())
        out[f"greedy@{kind}"] = float((greedy == right)[at].float().mean())
    out["logp@all"] = float(logp_right.mean())
    out["greedy@all"] = float((greedy == right).float().mean())
    return out


def train_cell(pair: Pair, rule: str, keep: float, optimizer: str, seed: int,
               eval_prompts: list[str], budget: Budget = BUDGET) -> dict:
    """One cell: ``budget.steps`` OPD steps from the untrained student; the held-out metrics after
    them, each kind's mean recall over steps and the mean kept share."""
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    student = pair.fresh_student()
    lr, max_norm = ((budget.adamw_lr, budget.adamw_max_norm) if optimizer == "adamw"
                    else (budget.sgd_lr, budget.sgd_max_norm))
    opt = OPTIMIZERS[optimizer](student.parameters(), max_norm=max_norm, lr=lr)
    prompts = pair.cipher.prompts(budget.steps * budget.prompts, 1000 + seed, "train")
    recall: dict[str, list[float]] = {kind: [] for kind in ERROR_KINDS}
    kept_share = 0.0
    for step in range(budget.steps):
        part = prompts[step * budget.prompts:(step + 1) * budget.prompts]
        batch, t_logits, planted = sample_batch(pair, student, part, budget)
        mask = batch.target_mask
        student.train()
        s_logits = student(input_ids=batch.input_ids,
                           attention_mask=batch.attention_mask).logits[:, :-1]
        signals = signals_from_logits(s_logits.detach(), t_logits, mask)
        chosen = select(rule, signals, keep, generator=gen)
        kept = chosen.kept & mask
        per_token = divergence(log_probs(s_logits), log_probs(t_logits), "reverse_kl")
        cell_loss(per_token, kept, mask, optimizer).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        student.eval()
        for kind, at in planted.items():
            recall[kind].append(round(float((kept & at).sum() / at.sum().clamp_min(1)), 4))
        kept_share += float(kept.sum() / mask.sum()) / budget.steps
    out = heldout(pair, student, eval_prompts)
    if not all(math.isfinite(v) for v in out.values()):
        raise FloatingPointError(f"{rule}@{keep} ({optimizer}, seed {seed}) ended "
                                 f"non-finite: {out}")
    out.update({f"recall@{k}": sum(v) / len(v) for k, v in recall.items()})
    out["recall_per_step"] = recall
    out["kept_share"] = kept_share
    return out
