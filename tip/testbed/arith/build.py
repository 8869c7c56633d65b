"""Build the embedded teacher-student pair from a seed.

    python -m tip.testbed.arith.build --seed 0        # writes tip/assets/embedded_pair (9 min)
    python -m tip.testbed.arith.build --student-only  # re-derives the student from the teacher

Both models are Qwen3 architectures (transformers) sharing one character-level tokenizer, saved in
HF format (``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` load them). The task and its
error types are in ``tip.tasks``.

- The teacher is trained from scratch on correct solutions, each in a random one of its equally
  valid forms, with label smoothing: a real LM keeps a little probability off its top token
  everywhere, and so its ordinary tokens carry some entropy; a saturated tiny model's would be ~0,
  and no misconception could be more certain.
- The student starts from the teacher's weights and is fine-tuned on solutions that never carry and
  forget the borrow in half the cases, with the same smoothing on ordinary tokens. At the sum's
  characters that the dropped carries change, its target puts ``carry_tail`` on the right one and
  the rest on the wrong one (weighted ``drill_weight``): a drilled misconception, held with more
  certainty than the ordinary tokens (low entropy, Q3). The borrow, learned from inconsistent data,
  leaves the student split between two digits (high entropy, Q1). That certainty has a price
  docs/testbed.md states: a dozen OPD steps do not undo the drilled error.

Why not a smaller student trained from scratch: we measured that tiny from-scratch students sit in
minima so sharp that any AdamW step large enough to matter in a dozen OPD steps makes them worse
(and reverse KL barely reacts to a saturated confident mistake, as the paper notes); this testbed
has to show OPD effects on 2 CPU cores within minutes. Runs on CPU in fp32; the committed weights
were produced by the command above (torch 2.13.0).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import Qwen3ForCausalLM

from tip.tasks import add_without_carry, sample_operands, sample_problems, solution_text
from tip.testbed.sft import (
    Sample,
    adamw,
    fit,
    sft_batch,
    sft_loss,
    warmup_constant,
    warmup_cosine,
)
from tip.testbed.tiny import ModelSpec, build_tokenizer, make_model, save_pair

TEACHER = ModelSpec(hidden=96, layers=3, heads=4, kv_heads=2, ffn=384, steps=2000, lr=3e-3)


@dataclass
class StudentSpec:
    """The student: the teacher's weights fine-tuned on solutions with its two misconceptions."""

    steps: int = 600
    lr: float = 1e-3
    warmup: int = 10
    borrow_rate: float = 0.5  # share of borrow-needing problems whose solution forgets the borrow
    carry_tail: float = 0.005  # target probability of the right digit where the carry is forgotten
    # weight of that position's loss: the misconception is rehearsed, not just seen
    drill_weight: float = 30.0
    smoothing: float = 0.01  # as the teacher's, on every other token


STUDENT = StudentSpec()


def teacher_samples(n: int, seed: int) -> list[Sample]:
    return [Sample(p.problem, p.solution) for p in sample_problems(n, seed=seed, split="train")]


def student_samples(n: int, seed: int, borrow_rate: float) -> list[Sample]:
    """Solutions that never carry and forget the borrow at ``borrow_rate``, in random valid forms;
    the characters of the sum that the dropped carries change are drilled."""
    rng = random.Random(f"{seed}-student")
    out = []
    for a, b, c in sample_operands(n, seed, "train"):
        swap, sep, forget_borrow = (rng.random() < 0.5, rng.choice((";", ",")),
                                    rng.random() < borrow_rate)
        right = solution_text(a, b, c, swap, sep, forget_carry=False, forget_borrow=forget_borrow)
        wrong = solution_text(a, b, c, swap, sep, forget_carry=True, forget_borrow=forget_borrow)
        start = wrong.index("=") + 1
        end = start + len(str(add_without_carry(a, b)))
        # the sum's digits and the separator after them (12; where 122 goes on)
        drilled = {i: right[i] for i in range(start, end + 1) if wrong[i] != right[i]}
        out.append(Sample(f"{a}+{b}-{c}=", wrong, drilled or None))
    return out


def batch_loss(model, tok, samples: list[Sample], batch_size: int, smoothing: float,
               carry_tail: float = 0.0, drill_weight: float = 1.0):
    """The loss of step ``s``: ``sft_loss`` on the s-th slice of ``batch_size`` samples."""
    return lambda step: sft_loss(
        model, sft_batch(tok, samples[step * batch_size:(step + 1) * batch_size]),
        smoothing, carry_tail, drill_weight)


def train(spec: ModelSpec, tok, seed: int, batch_size: int,
          log_every: int = 100) -> Qwen3ForCausalLM:
    """The teacher: from scratch on correct solutions, AdamW with warm-up and cosine decay."""
    torch.manual_seed(seed)
    model = make_model(spec, len(tok), tok)
    samples = teacher_samples(spec.steps * batch_size, seed)
    opt = adamw(model, spec.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, spec.steps, warmup=max(1, spec.steps // 20))
    fit(model, batch_loss(model, tok, samples, batch_size, spec.smoothing), spec.steps, opt, sched,
        clip=1.0, log_every=log_every)
    return model


def derive_student(teacher: Qwen3ForCausalLM, spec: StudentSpec, tok, seed: int, batch_size: int,
                   log_every: int = 50) -> Qwen3ForCausalLM:
    """A copy of the teacher fine-tuned on solutions with the student's two misconceptions."""
    torch.manual_seed(seed)
    model = copy.deepcopy(teacher)
    samples = student_samples(spec.steps * batch_size, seed, spec.borrow_rate)
    opt = adamw(model, spec.lr)
    sched = warmup_constant(opt, spec.warmup)
    loss_at = batch_loss(model, tok, samples, batch_size, spec.smoothing, spec.carry_tail,
                         spec.drill_weight)
    fit(model, loss_at, spec.steps, opt, sched, clip=None, log_every=log_every)
    return model


@torch.no_grad()
def greedy_accuracy(model, tok, n: int = 256, seed: int = 1) -> float:
    from tip.grading import boxed_answer

    problems = sample_problems(n, seed=seed, split="test")
    enc = tok([p.problem for p in problems], return_tensors="pt", padding=True,
              add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(boxed_answer(t) == p.answer for t, p in zip(texts, problems)) / n


def build(out: Path, seed: int = 0, batch_size: int = 128, teacher: ModelSpec = TEACHER,
          student: StudentSpec = STUDENT, student_only: bool = False) -> dict:
    """Train both models and write the pair to ``out``; with ``student_only`` keep the teacher found
    there."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tok = build_tokenizer()
    report: dict = {"seed": seed, "batch_size": batch_size, "torch": torch.__version__}
    if student_only:
        if not (out / "teacher" / "config.json").is_file():
            raise SystemExit(f"--student-only needs a built pair in {out} (no teacher/config.json "
                             "there)")
        teacher_model = Qwen3ForCausalLM.from_pretrained(out / "teacher").eval()
        report["teacher"] = json.loads((out / "build.json").read_text())["teacher"]
    else:
        print(f"training the teacher ({teacher})", flush=True)
        t0 = time.time()
        teacher_model = train(teacher, tok, seed, batch_size)
        report["teacher"] = {**asdict(teacher), "train_seconds": round(time.time() - t0, 1)}
    print(f"deriving the student ({student})", flush=True)
    t0 = time.time()
    student_model = derive_student(teacher_model, student, tok, seed + 1, batch_size)
    report["student"] = {**asdict(student), "init": "teacher",
                         "train_seconds": round(time.time() - t0, 1)}
    save_pair(out, {"teacher": teacher_model, "student": student_model}, tok, report,
              "heldout_greedy_accuracy", lambda model: greedy_accuracy(model, tok))
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parents[2] / "assets" / "embedded_pair")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply both models' training steps (tests)")
    ap.add_argument("--student-only", action="store_true",
                    help="keep the teacher in --out, derive the student")
    args = ap.parse_args(argv)
    scaled = lambda s: replace(s, steps=max(1, int(s.steps * args.steps_scale)))
    build(args.out, args.seed, args.batch_size, scaled(TEACHER), scaled(STUDENT), args.student_only)


if __name__ == "__main__":
    main()
