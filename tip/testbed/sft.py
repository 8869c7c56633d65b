"""Supervised fitting, the one loop every testbed build trains with: soft-target batches with
drilled positions, their loss, AdamW with warm-up (then cosine decay or constant), and ``fit``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sample:
    """A training text: prompt, solution, and the solution's drilled positions {char index: correct
    char}."""

    prompt: str
    solution: str
    drilled: dict[int, str] | None = None


def sft_batch(tok, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+solution+eos, labels on the solution and eos (-100 elsewhere), and
    ``alt``: at a drilled position the id of the right token (the target there keeps ``carry_tail``
    on it), else -100."""
    rows, labels, alts = [], [], []
    for smp in samples:
        prompt = tok(smp.prompt, add_special_tokens=False)["input_ids"]
        answer = tok(smp.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        alt = [-100] * len(answer)
        for i, ch in (smp.drilled or {}).items():
            alt[i] = tok.convert_tokens_to_ids(ch)
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
        alts.append([-100] * len(prompt) + alt)
    width = max(map(len, rows))
    # on the host: the builds train on CPU
    ids = torch.full((len(rows), width), tok.pad_token_id, device="cpu")
    lab = torch.full((len(rows), width), -100, device="cpu")
    alt_t = torch.full((len(rows), width), -100, device="cpu")
    att = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    for i, (r, lb, al) in enumerate(zip(rows, labels, alts)):
        ids[i, : len(r)], lab[i, : len(lb)], alt_t[i, : len(al)], att[i, : len(r)] = (
            torch.tensor(r, device="cpu"), torch.tensor(lb, device="cpu"),
            torch.tensor(al, device="cpu"), 1)
    return {"input_ids": ids, "attention_mask": att, "labels": lab, "alt": alt_t}


def sft_loss(model, batch: dict[str, torch.Tensor], smoothing: float, carry_tail: float = 0.0,
             drill_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy against soft targets: ``1 - smoothing`` on the label and ``smoothing`` spread
    uniformly over the vocabulary, except at drilled positions (``alt`` set): ``1 - carry_tail`` on
    the label, ``carry_tail`` on ``alt``, weighted ``drill_weight``. Normalised by the number of
    label tokens."""
    logits = model(input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels, alt = batch["labels"][:, 1:], batch["alt"][:, 1:]
    valid = labels != -100
    logp = logits.log_softmax(-1)[valid]
    label, alt = labels[valid], alt[valid]
    nll = -logp.gather(1, label[:, None]).squeeze(1)
    uniform = -logp.mean(-1)
    drilled = alt != -100
    alt_nll = -logp.gather(1, alt.clamp(min=0)[:, None]).squeeze(1)
    ordinary = (1 - smoothing) * nll + smoothing * uniform
    drilled_loss = (1 - carry_tail) * nll + carry_tail * alt_nll
    return torch.where(drilled, drill_weight * drilled_loss, ordinary).mean()


def adamw(model, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             betas=(0.9, 0.98))


def warmup_cosine(opt, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup)
        * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def warmup_constant(opt, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then the full rate."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))


def fit(model, loss_at: Callable[[int], torch.Tensor], steps: int, opt, sched,
        clip: float | None = 1.0, log_every: int = 100) -> None:
    """``steps`` optimizer steps on ``loss_at(step)``, clipping the gradient norm at ``clip`` (None:
    no clipping); prints the loss every ``log_every`` steps and at the last. Leaves ``model`` in
    eval mode."""
    model.train()
    t0 = time.time()
    for step in range(steps):
        loss = loss_at(step)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)
    model.eval()
