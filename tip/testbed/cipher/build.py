"""Testbed v2 (the cipher): a pair where the Q3 claims can fail (issue 31). Its task and its build.

    python -m tip.testbed.cipher.build --seed 0    # one build (about a minute on 2 cores), cached

**The task** (``Cipher``): the prompt is 12 letters of ``a``-``p`` and ``=``; the answer writes each
letter's code, in order, then end-of-sequence (``fbk=`` -> ``7q2``). Each answer position depends on
one prompt letter only (attention at a fixed offset), so a position's error never changes whether
another position is right: errors cannot cancel, and every position's correct token is known.

A build draws, from its seed, the letter-to-code map and which letters play which part:

- ``confident``: 4 letters the student maps to a wrong code with p = 0.98 (drilled; low entropy,
  high divergence: Q3);
- ``inconsistent``: 4 letters the student maps to a wrong code with p = 0.6 and the right one with
  0.32 (high entropy, high divergence: Q1);
- ``choice``: 2 letters with two equally valid codes that both models take 50/50 (Q2);
- ``ordinary``: 6 letters both models know (Q4).

Prompt letters are drawn 20% confident, 20% inconsistent, 15% choice, 45% ordinary: a rollout of
13 response tokens holds about 2.4 planted positions of each error kind, more than rho * m at keep
0.1 and 0.2 (1 and 2 tokens per rollout), so rules compete for their budget.

Both models are trained towards explicit target distributions (soft-target cross-entropy): the
teacher from scratch, with label smoothing 0.08 everywhere (its ordinary tokens keep about 0.6 nats
of entropy, well above a drilled error's 0.1); the student from the teacher's weights, towards the
same targets except at the planted letters. Differences from v1 (``tip.testbed.arith``), and why:
v1 planted one error token of each kind per rollout, which any divergence-aware rule keeps at any
keep fraction, and its confident error (p = 0.995 at 0.09 nats of ordinary entropy) was never moved
by any rule; v2 gives ordinary tokens more entropy so a p = 0.98 error is still the most confident
token, and plants several errors of each kind per rollout.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tip.testbed.sft import adamw, fit
from tip.testbed.tiny import ModelSpec, build_tokenizer, make_model, write_pair

LETTERS = "abcdefghijklmnop"
CODES = "0123456789qrstuvwxyz"
LENGTH = 12  # letters per prompt
# the parts a letter plays: how many letters, and each part's share of the prompt letters
PARTS = {"confident": (4, 0.20), "inconsistent": (4, 0.20), "choice": (2, 0.15),
         "ordinary": (6, 0.45)}
ERROR_KINDS = ("confident", "inconsistent")  # the planted errors, the metrics' kinds


def cache_dir() -> Path:
    """Where builds are kept: $TIP_TESTBED_CACHE, else ~/.cache/tip/testbed_v2."""
    default = Path.home() / ".cache" / "tip" / "testbed_v2"
    return Path(os.environ.get("TIP_TESTBED_CACHE", default))


@dataclass(frozen=True)
class Targets:
    """The target distributions, as probabilities (the rest of 1 spread uniformly over the
    vocabulary): label smoothing, the student's planted errors."""

    smoothing: float = 0.08
    confident_wrong: float = 0.98  # the student's drilled error; no smoothing there
    inconsistent_wrong: float = 0.60
    inconsistent_right: float = 0.32  # plus smoothing 0.08


TARGETS = Targets()
TEACHER_SPEC = ModelSpec(hidden=64, layers=2, heads=2, kv_heads=1, ffn=256, steps=1200, lr=3e-3)


@dataclass(frozen=True)
class StudentSpec:
    steps: int = 400
    lr: float = 1e-3


STUDENT_SPEC = StudentSpec()


@dataclass(frozen=True)
class Cipher:
    """One build's task: codes, alternative codes of the choice letters, wrong codes of the
    planted letters, each letter's part."""

    code: dict[str, str]
    alternative: dict[str, str]  # choice letters: the second valid code
    wrong: dict[str, str]  # confident and inconsistent letters: the student's wrong code
    part: dict[str, str]

    @classmethod
    def of_seed(cls, seed: int) -> Cipher:
        rng = random.Random(f"cipher-{seed}")
        codes = rng.sample(CODES, len(CODES))
        letters = rng.sample(LETTERS, len(LETTERS))
        code = dict(zip(letters, codes))
        spare = codes[len(letters):]  # 4 codes no letter has
        part, i = {}, 0
        for name, (count, _) in PARTS.items():
            part.update({x: name for x in letters[i:i + count]})
            i += count
        choice = [x for x in letters if part[x] == "choice"]
        alternative = dict(zip(choice, spare))
        wrong = {x: rng.choice([c for c in codes if c != code[x] and c not in spare])
                 for x in letters if part[x] in ERROR_KINDS}
        return cls(code, alternative, wrong, part)

    def letters_of(self, part: str) -> list[str]:
        return sorted(x for x, p in self.part.items() if p == part)

    def prompts(self, n: int, seed: int, split: str) -> list[str]:
        """n prompts of the split (train and held-out disjoint by a hash), in a seeded order."""
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; known: train, test")
        rng = random.Random(f"prompts-{seed}-{split}")
        by_part = {name: self.letters_of(name) for name in PARTS}
        weights = [share for _, share in PARTS.values()]
        out: list[str] = []
        while len(out) < n:
            letters = "".join(rng.choice(by_part[rng.choices(list(PARTS), weights)[0]])
                              for _ in range(LENGTH))
            held_out = hashlib.sha256(letters.encode()).digest()[0] % 8 == 0
            if held_out == (split == "test"):
                out.append(letters + "=")
        return out

    def answer(self, prompt: str, rng: random.Random | None = None) -> str:
        """The correct answer (a choice letter's code drawn 50/50 with ``rng``, else the first)."""
        return "".join(self.alternative[x] if x in self.alternative and rng and rng.random() < 0.5
                       else self.code[x] for x in prompt.rstrip("="))

    def kinds(self, prompt: str) -> list[str]:
        """Each answer position's part (the last, end-of-sequence, is ``ordinary``)."""
        return [self.part[x] for x in prompt.rstrip("=")] + ["ordinary"]


def target_distributions(cipher: Cipher, tok, prompts: list[str], student: bool,
                         t: Targets = TARGETS) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids (prompt + correct answer + eos, all one length) and the target distribution over
    the vocabulary at each answer position (B, LENGTH + 1, V), for the teacher or the student."""
    vocab = len(tok)
    ids = lambda s: tok.convert_tokens_to_ids(list(s))
    rng = random.Random(f"targets-{prompts[0]}")
    rows, targets = [], torch.zeros(len(prompts), LENGTH + 1, vocab, device="cpu")
    for i, prompt in enumerate(prompts):
        answer = cipher.answer(prompt, rng)
        rows.append(ids(prompt) + ids(answer) + [tok.eos_token_id])
        for j, letter in enumerate(prompt.rstrip("=") + "$"):
            dist = torch.full((vocab,), t.smoothing / vocab, device="cpu")
            right = tok.eos_token_id if letter == "$" else ids(cipher.code[letter])[0]
            kind = cipher.part.get(letter, "ordinary")
            if kind == "choice":
                dist[right] += (1 - t.smoothing) / 2
                dist[ids(cipher.alternative[letter])[0]] += (1 - t.smoothing) / 2
            elif student and kind == "confident":
                dist.zero_()
                dist[ids(cipher.wrong[letter])[0]] = t.confident_wrong
                dist[right] = 1 - t.confident_wrong
            elif student and kind == "inconsistent":
                dist[ids(cipher.wrong[letter])[0]] += t.inconsistent_wrong
                dist[right] += t.inconsistent_right
            else:
                dist[right] += 1 - t.smoothing
            targets[i, j] = dist / dist.sum()
    return torch.tensor(rows, device="cpu"), targets


def answer_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, LENGTH + 1, V): the logits that predict each answer token and the end-of-sequence."""
    start = LENGTH  # the '=' predicts the first answer token
    return model(input_ids=input_ids).logits[:, start:start + LENGTH + 1].float()


def fit_targets(model, cipher: Cipher, tok, steps: int, lr: float, seed: int, student: bool,
                batch_size: int = 64, log_every: int = 200) -> None:
    """``sft.fit`` towards ``target_distributions`` (soft-target cross-entropy); AdamW, warm-up,
    cosine decay."""
    opt = adamw(model, lr)
    warmup = max(1, steps // 20)
    # this build's own spelling of the cosine (pi * s / steps, not sft.warmup_cosine's
    # pi * min(1, s / steps)): the two round differently, and builds stay bit-identical
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    prompts = cipher.prompts(steps * batch_size, seed, "train")

    def loss_at(step: int) -> torch.Tensor:
        ids, target = target_distributions(
            cipher, tok, prompts[step * batch_size:(step + 1) * batch_size], student)
        return -(target * answer_logits(model, ids).log_softmax(-1)).sum(-1).mean()

    fit(model, loss_at, steps, opt, sched, clip=1.0, log_every=log_every)


@torch.no_grad()
def match_report(model, cipher: Cipher, tok, student: bool, n: int = 256) -> dict:
    """Mean probability the model gives the right token at each part's positions on held-out
    prompts, beside the target's: how closely the build hit its targets."""
    prompts = cipher.prompts(n, 7, "test")
    ids, target = target_distributions(cipher, tok, prompts, student)
    probs = answer_logits(model, ids).softmax(-1)
    right = ids[:, LENGTH + 1:]  # the answer and eos tokens
    p_right = probs.gather(-1, right[..., None]).squeeze(-1)
    t_right = target.gather(-1, right[..., None]).squeeze(-1)
    kinds = [cipher.kinds(p) for p in prompts]
    out = {}
    for part in PARTS:
        at = torch.tensor([[k == part for k in row] for row in kinds], device="cpu")
        out[part] = {"p_right": round(float(p_right[at].mean()), 4),
                     "target": round(float(t_right[at].mean()), 4)}
    return out


def build(seed: int, out: Path | None = None, steps_scale: float = 1.0) -> Path:
    """Train the teacher, derive the student, write both with the tokenizer and ``build.json``
    (atomically) to ``out`` (default: the cache's ``build_<seed>``). ``steps_scale`` multiplies
    both models' steps (tests)."""
    out = out or cache_dir() / f"build_{seed}"
    teacher_steps = max(1, int(TEACHER_SPEC.steps * steps_scale))
    student_steps = max(1, int(STUDENT_SPEC.steps * steps_scale))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tok = build_tokenizer()
    cipher = Cipher.of_seed(seed)
    torch.manual_seed(seed)
    report: dict = {"seed": seed, "torch": torch.__version__, "targets": asdict(TARGETS),
                    "cipher": asdict(cipher)}
    t0 = time.time()
    teacher = make_model(TEACHER_SPEC, len(tok), tok)
    print(f"build {seed}: training the teacher", flush=True)
    fit_targets(teacher, cipher, tok, teacher_steps, TEACHER_SPEC.lr, seed, student=False)
    report["teacher"] = {**asdict(TEACHER_SPEC), "steps": teacher_steps,
                         "train_seconds": round(time.time() - t0, 1),
                         "match": match_report(teacher, cipher, tok, student=False)}
    t0 = time.time()
    student = copy.deepcopy(teacher)
    print(f"build {seed}: deriving the student", flush=True)
    fit_targets(student, cipher, tok, student_steps, STUDENT_SPEC.lr, seed + 1000, student=True)
    report["student"] = {**asdict(STUDENT_SPEC), "steps": student_steps, "init": "teacher",
                         "train_seconds": round(time.time() - t0, 1),
                         "match": match_report(student, cipher, tok, student=True)}
    write_pair(out, {"teacher": teacher, "student": student}, tok, report)
    print(json.dumps({k: report[k]["match"] for k in ("teacher", "student")}), flush=True)
    return out


def built(seed: int) -> Path:
    """The cached build of ``seed``, built first if absent."""
    out = cache_dir() / f"build_{seed}"
    return out if (out / "build.json").is_file() else build(seed, out)


def load_cipher(pair_dir: Path) -> Cipher:
    return Cipher(**json.loads((pair_dir / "build.json").read_text())["cipher"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply both models' training steps (tests)")
    args = ap.parse_args(argv)
    build(args.seed, args.out, args.steps_scale)


if __name__ == "__main__":
    main()
