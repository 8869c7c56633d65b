"""Build the embedded teacher-student pair from a seed.

    python -m tip.testbed.build --seed 0        # writes tip/assets/embedded_pair (about 9 minutes
    on 2 cores) python -m tip.testbed.build --student-only  # re-derives the student from the
    shipped teacher

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
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from tip.checkpoint import atomic_dir
from tip.tasks import add_without_carry, sample_operands, sample_problems, solution_text

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list("0123456789+-*/=;:.,()[]{}\\ ") + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character over digits, operators, brackets, backslash, space and lowercase
    letters."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>",
        padding_side="left", model_max_length=256,
    )


@dataclass
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    steps: int
    lr: float
    # vLLM's CPU attention kernels support head sizes 32, 64, ...; not hidden/heads = 24
    head_dim: int = 32
    # label smoothing: the probability kept off the target token, spread uniformly
    smoothing: float = 0.01


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


def make_model(spec: ModelSpec, vocab_size: int, tok: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                      num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    return Qwen3ForCausalLM(cfg)


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
    ids = torch.full((len(rows), width), tok.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    alt_t = torch.full((len(rows), width), -100)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb, al) in enumerate(zip(rows, labels, alts)):
        ids[i, : len(r)], lab[i, : len(lb)], alt_t[i, : len(al)], att[i, : len(r)] = (
            torch.tensor(r), torch.tensor(lb), torch.tensor(al), 1)
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


def _fit(model, samples: list[Sample], tok, steps: int, batch_size: int, opt, sched,
         smoothing: float, carry_tail: float = 0.0, drill_weight: float = 1.0, log_every: int = 100,
         clip: float | None = None) -> None:
    model.train()
    t0 = time.time()
    for step in range(steps):
        loss = sft_loss(model, sft_batch(tok, samples[step * batch_size : (step + 1) * batch_size]),
                        smoothing, carry_tail, drill_weight)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)
    model.eval()


def train(spec: ModelSpec, tok, seed: int, batch_size: int,
          log_every: int = 100) -> Qwen3ForCausalLM:
    """The teacher: from scratch on correct solutions, AdamW with warm-up and cosine decay."""
    torch.manual_seed(seed)
    model = make_model(spec, len(tok), tok)
    samples = teacher_samples(spec.steps * batch_size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup)
        * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps)))
    )
    _fit(model, samples, tok, spec.steps, batch_size, opt, sched, spec.smoothing,
         log_every=log_every, clip=1.0)
    return model


def derive_student(teacher: Qwen3ForCausalLM, spec: StudentSpec, tok, seed: int, batch_size: int,
                   log_every: int = 50) -> Qwen3ForCausalLM:
    """A copy of the teacher fine-tuned on solutions with the student's two misconceptions."""
    torch.manual_seed(seed)
    model = copy.deepcopy(teacher)
    samples = student_samples(spec.steps * batch_size, seed, spec.borrow_rate)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / spec.warmup))
    _fit(model, samples, tok, spec.steps, batch_size, opt, sched, spec.smoothing, spec.carry_tail,
         spec.drill_weight, log_every)
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


def save_pair(out: Path, models_: dict, tok, report: dict, measure_key: str, measure) -> None:
    """Record each model's size and ``measure(model)`` under ``report[name][measure_key]``, then
    write each model with the tokenizer in ``out/<name>`` and ``build.json``, all at once (a rebuild
    replaces the pair; a failed one leaves the old pair whole)."""
    for name, model in models_.items():
        report[name]["params"] = sum(p.numel() for p in model.parameters())
        report[name][measure_key] = measure(model)
        print(f"{name}: held-out greedy {measure_key}: {report[name][measure_key]}", flush=True)
    write_pair(out, models_, tok, report)


def write_pair(out: Path, models_: dict, tok, report: dict) -> None:
    """Each model with the tokenizer in ``out/<name>`` and ``report`` as ``build.json``, all at once
    (a rebuild replaces the pair; a failed one leaves the old pair whole)."""

    def write(tmp: Path) -> None:
        for name, model in models_.items():
            model.save_pretrained(tmp / name)
            tok.save_pretrained(tmp / name)
        (tmp / "build.json").write_text(json.dumps(report, indent=2) + "\n")

    atomic_dir(out, write, replace=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parents[1] / "assets" / "embedded_pair")
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
