"""Build the embedded teacher-student pair from a seed.

    python -m tip.testbed.build --seed 0        # writes tip/assets/embedded_pair

Both models are Qwen3 architectures (transformers) sharing one character-level tokenizer, saved in HF format
(``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` load them).

- The teacher is trained from scratch on correct solutions.
- The student starts from the teacher's weights and is fine-tuned briefly on solutions in which the units borrow
  is forgotten in 80% of the problems that need one (see ``tip.testbed.arith``). It is thus weaker, and
  systematically, confidently wrong in one identifiable place, but not saturated: a few OPD steps can move it.

Why not a smaller student trained from scratch: we measured that tiny from-scratch students sit in minima so
sharp that any AdamW step large enough to matter in a dozen OPD steps makes them worse (and reverse KL barely
reacts to a saturated confident mistake, as the paper notes); this testbed has to show OPD effects on 2 CPU cores
within minutes. Runs on CPU in fp32; the committed weights were produced by the command above (torch 2.13.0).
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
from tip.testbed.arith import sample_problems

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list("0123456789+-*/=;:.,()[]{}\\ ") + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character over digits, operators, brackets, backslash, space and lowercase letters."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
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
    head_dim: int = 32  # vLLM's CPU attention kernels support head sizes 32, 64, ...; not hidden/heads = 24


TEACHER = ModelSpec(hidden=96, layers=3, heads=4, kv_heads=2, ffn=384, steps=1000, lr=3e-3)


@dataclass
class StudentSpec:
    """The student: the teacher's weights fine-tuned on partly buggy solutions."""

    steps: int = 150
    lr: float = 1e-3
    warmup: int = 10
    bug_rate: float = 0.8  # share of borrow-needing problems whose solution forgets the borrow


STUDENT = StudentSpec()


def make_model(spec: ModelSpec, vocab_size: int, tok: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    return Qwen3ForCausalLM(cfg)


def sft_batch(tok, problems) -> dict[str, torch.Tensor]:
    """Right-padded prompt+solution+eos with labels on the solution and eos only."""
    rows, labels = [], []
    for p in problems:
        prompt = tok(p.problem, add_special_tokens=False)["input_ids"]
        answer = tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], lab[i, : len(lb)], att[i, : len(r)] = torch.tensor(r), torch.tensor(lb), 1
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def train(spec: ModelSpec, tok, seed: int, batch_size: int, log_every: int = 100) -> Qwen3ForCausalLM:
    """The teacher: from scratch on correct solutions, AdamW with warm-up and cosine decay."""
    torch.manual_seed(seed)
    model = make_model(spec, len(tok), tok)
    problems = sample_problems(spec.steps * batch_size, seed=seed, split="train")
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps)))
    )
    model.train()
    t0 = time.time()
    for step in range(spec.steps):
        loss = model(**sft_batch(tok, problems[step * batch_size : (step + 1) * batch_size])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == spec.steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)
    return model.eval()


def derive_student(teacher: Qwen3ForCausalLM, spec: StudentSpec, tok, seed: int, batch_size: int,
                   log_every: int = 50) -> Qwen3ForCausalLM:
    """A copy of the teacher fine-tuned on solutions that forget the borrow in ``bug_rate`` of the problems."""
    torch.manual_seed(seed)
    model = copy.deepcopy(teacher).train()
    n = spec.steps * batch_size
    correct = sample_problems(n, seed=seed, split="train")
    buggy = sample_problems(n, seed=seed, split="train", buggy=True)  # same problems, same order
    rng = random.Random(seed)
    problems = [b if rng.random() < spec.bug_rate else c for c, b in zip(correct, buggy)]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / spec.warmup))
    t0 = time.time()
    for step in range(spec.steps):
        loss = model(**sft_batch(tok, problems[step * batch_size : (step + 1) * batch_size])).loss
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == spec.steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)
    return model.eval()


@torch.no_grad()
def greedy_accuracy(model, tok, n: int = 256, seed: int = 1) -> float:
    from tip.testbed.grading_simple import boxed_answer  # local import keeps build.py importable alone

    problems = sample_problems(n, seed=seed, split="test")
    enc = tok([p.problem for p in problems], return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(boxed_answer(t) == p.answer for t, p in zip(texts, problems)) / n


def build(out: Path, seed: int = 0, batch_size: int = 128, teacher: ModelSpec = TEACHER,
          student: StudentSpec = STUDENT) -> dict:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tok = build_tokenizer()
    report: dict = {"seed": seed, "batch_size": batch_size, "torch": torch.__version__}
    print(f"training the teacher ({teacher})", flush=True)
    t0 = time.time()
    teacher_model = train(teacher, tok, seed, batch_size)
    report["teacher"] = {**asdict(teacher), "train_seconds": round(time.time() - t0, 1)}
    print(f"deriving the student ({student})", flush=True)
    t0 = time.time()
    student_model = derive_student(teacher_model, student, tok, seed + 1, batch_size)
    report["student"] = {**asdict(student), "init": "teacher", "train_seconds": round(time.time() - t0, 1)}
    models_ = {"teacher": teacher_model, "student": student_model}
    for name, model in models_.items():
        report[name]["params"] = sum(p.numel() for p in model.parameters())
        report[name]["heldout_greedy_accuracy"] = greedy_accuracy(model, tok)
        print(f"{name}: held-out greedy accuracy {report[name]['heldout_greedy_accuracy']:.3f}", flush=True)

    def write(tmp: Path) -> None:
        for name, model in models_.items():
            model.save_pretrained(tmp / name)
            tok.save_pretrained(tmp / name)
        (tmp / "build.json").write_text(json.dumps(report, indent=2) + "\n")

    atomic_dir(out, write, replace=True)  # a rebuild replaces the pair
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "embedded_pair")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply both models' training steps (tests)")
    args = ap.parse_args(argv)
    scaled = lambda s: replace(s, steps=max(1, int(s.steps * args.steps_scale)))
    build(args.out, args.seed, args.batch_size, scaled(TEACHER), scaled(STUDENT))


if __name__ == "__main__":
    main()
