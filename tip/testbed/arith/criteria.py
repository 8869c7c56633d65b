"""The embedded testbed's criteria, checked on signals before any rule is compared.

    python -m tip.testbed.arith.criteria   # on the untrained student's rollouts, drawn as the
                                           # default run draws them

On the untrained student's rollouts (the default run's sampling, batches of one training step,
quadrants by the default thresholds of that step's batch):

- every quadrant holds >= 5% of the tokens;
- Q3's mean delta >= 0.25x Q1's and >= 30x Q4's;
- >= 50% of the tokens ``q3`` at keep 0.1 keeps are in Q3;
- at the confident error's positions (``tasks.CONFIDENT_ERROR``) the student's entropy lies in the
  lowest third of all tokens' and the forward KL is >= 1 nat; at the inconsistent error's, the
  entropy lies in the highest third.

The accuracy criterion (all-token OPD closes 25-75% of the teacher-student gap) needs a training
run; the test suite checks it on the default run (tests/test_testbed.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass

import torch

from tip.models import load_model, load_tokenizer
from tip.rollout import hf_generate
from tip.selection import select_tokens
from tip.signals import TokenSignals, signals_from_logits
from tip.tasks import (
    CONFIDENT_ERROR,
    ERROR_TYPES,
    INCONSISTENT_ERROR,
    error_positions,
    sample_operands,
)
from tip.taxonomy import (
    QUADRANTS,
    BatchStats,
    quadrant_labels,
    quadrant_sums,
    quantile,
    summarise_quadrants,
)


@dataclass(frozen=True)
class Criterion:
    name: str
    value: float
    bound: str  # as written in the README, e.g. ">= 0.05"
    ok: bool


def _response_text(tok, ids: list[int]) -> str:
    """One character per token (special tokens as '?'), so that a character index is a token
    index."""
    special = set(tok.all_special_ids)
    return "".join("?" if i in special else tok.convert_ids_to_tokens(i) for i in ids)


@torch.no_grad()
def measure(student: str = "embedded://student", teacher: str = "embedded://teacher",
            steps: int = 8, prompts_per_step: int = 16, samples: int = 4, max_new_tokens: int = 40,
            seed: int = 0) -> dict:
    """Signals of ``steps`` batches of the untrained student's rollouts: quadrant statistics, what
    q3@0.1 keeps, and the signals at each error type's positions."""
    torch.manual_seed(seed)
    tok = load_tokenizer(student)
    s_model = load_model(student, torch.float32, "student").eval()
    t_model = load_model(teacher, torch.float32, "teacher").eval()
    operands = sample_operands(steps * prompts_per_step, seed, "train")
    # the tiny pair is measured on CPU (load_model)
    sums = torch.zeros(4, 5, dtype=torch.float64, device="cpu")
    q3_kept_in_q3 = q3_kept = 0
    all_h: list[torch.Tensor] = []
    at_error: dict[str, dict[str, list[float]]] = {t: {"h": [], "fkl": [], "rkl": []}
                                                   for t in ERROR_TYPES}
    for step in range(steps):
        part = operands[step * prompts_per_step:(step + 1) * prompts_per_step]
        prompts = [tok(f"{a}+{b}-{c}=", add_special_tokens=False)["input_ids"] for a, b, c in part]
        batch = hf_generate(s_model, tok, prompts, n=samples, temperature=1.0,
                            max_new_tokens=max_new_tokens)
        s_logits = s_model(input_ids=batch.input_ids,
                           attention_mask=batch.attention_mask).logits[:, :-1]
        t_logits = t_model(input_ids=batch.input_ids,
                           attention_mask=batch.attention_mask).logits[:, :-1]
        sig: TokenSignals = signals_from_logits(s_logits, t_logits, batch.target_mask)
        mask = sig.mask
        stats = BatchStats.of(sig.entropy[mask], sig.reverse_kl[mask])
        labels = quadrant_labels(sig.entropy, sig.reverse_kl, mask, stats=stats)
        kept = select_tokens("q3", sig, 0.1, stats=stats)
        sums += quadrant_sums(labels, sig.entropy, sig.reverse_kl, kept,
                              sig.teacher_entropy).double()
        q3_kept += int(kept.sum())
        q3_kept_in_q3 += int((kept & (labels == 3)).sum())
        all_h.append(sig.entropy[mask])
        for row, responses in enumerate(batch.responses()):
            a, b, c = part[batch.example_index[row]]
            start = batch.prompt_lengths[row] - 1  # target position of the first response token
            for kind, pos in error_positions(a, b, c, _response_text(tok, responses)).items():
                at = start + pos
                for key, values in (("h", sig.entropy), ("fkl", sig.forward_kl),
                                    ("rkl", sig.reverse_kl)):
                    at_error[kind][key].append(float(values[row, at]))
    h = torch.cat(all_h)
    quads = summarise_quadrants(sums)
    return {
        "tokens": int(h.numel()),
        "quadrants": {q: {k: quads[f"{q}/{k}"] for k in ("frac", "mean_h", "mean_delta")}
                      for q in QUADRANTS},
        "q3_at_0.1_kept_in_q3": q3_kept_in_q3 / max(1, q3_kept),
        "entropy_thirds": [float(quantile(h, 1 / 3)), float(quantile(h, 2 / 3))],
        "errors": {kind: {"positions": len(v["h"]),
                          **{f"mean_{k}": statistics.fmean(x) if x else float("nan")
                                                         for k, x in v.items()}}
                   for kind, v in at_error.items()},
    }


def criteria(m: dict) -> list[Criterion]:
    """The signal criteria of the module docstring, from ``measure``'s result."""
    q = m["quadrants"]
    low_third, high_third = m["entropy_thirds"]
    confident, inconsistent = m["errors"][CONFIDENT_ERROR], m["errors"][INCONSISTENT_ERROR]
    out = [Criterion(f"{name.upper()} share of tokens", q[name]["frac"], ">= 0.05",
                     q[name]["frac"] >= 0.05)
           for name in QUADRANTS]
    r1 = q["q3"]["mean_delta"] / max(q["q1"]["mean_delta"], 1e-30)
    r4 = q["q3"]["mean_delta"] / max(q["q4"]["mean_delta"], 1e-30)
    out += [Criterion("Q3 mean delta / Q1 mean delta", r1, ">= 0.25", r1 >= 0.25),
            Criterion("Q3 mean delta / Q4 mean delta", r4, ">= 30", r4 >= 30),
            Criterion("share of q3@0.1's kept tokens in Q3", m["q3_at_0.1_kept_in_q3"], ">= 0.5",
                      m["q3_at_0.1_kept_in_q3"] >= 0.5),
            Criterion(f"{CONFIDENT_ERROR} (confident) mean h, in units of the lowest third's bound",
                      confident["mean_h"] / low_third, "<= 1", confident["mean_h"] <= low_third),
            Criterion(f"{CONFIDENT_ERROR} (confident) mean forward KL (nats)",
                      confident["mean_fkl"], ">= 1", confident["mean_fkl"] >= 1),
            Criterion(f"{INCONSISTENT_ERROR} (inconsistent) mean h, in units of the highest "
                      "third's bound",
                      inconsistent["mean_h"] / high_third, ">= 1",
                      inconsistent["mean_h"] >= high_third)]
    return out


def markdown(m: dict, rows: list[Criterion]) -> str:
    lines = ["| criterion | measured | required | met |", "|---|---|---|---|"]
    lines += [f"| {c.name} | {c.value:.3g} | {c.bound} | {'yes' if c.ok else '**no**'} |"
              for c in rows]
    lines += ["",
              f"{m['tokens']} tokens; per quadrant (share, mean h, mean delta in nats): "
              + "; ".join(
        f"{q.upper()} {v['frac']:.3f}, {v['mean_h']:.3g}, {v['mean_delta']:.3g}"
                          for q, v in m["quadrants"].items())]
    lines += [f"{kind}: {v['positions']} positions, mean h {v['mean_h']:.3g}, forward KL "
              f"{v['mean_fkl']:.3g}, reverse KL "
              f"{v['mean_rkl']:.3g}" for kind, v in m["errors"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="embedded://student")
    ap.add_argument("--teacher", default="embedded://teacher")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="print the measurements as JSON too")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    m = measure(args.student, args.teacher, args.steps)
    rows = criteria(m)
    print(markdown(m, rows))
    if args.json:
        print(json.dumps(m, indent=2))
    return 0 if all(c.ok for c in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
