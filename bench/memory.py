"""Peak memory and time of one OPD training step, by loss path: ``python bench/memory.py [--shape decoder]``.

Every variant runs in a fresh subprocess on the same Qwen3-shaped student and teacher (the real 151,936-token
vocabulary) and the same batch of response tokens (reverse KL, AdamW). Two shapes (``SHAPES``):

- ``logits`` (default): a small hidden size (student 256, teacher 512, 2 layers), so the output layer and the
  input embedding are 49% of the student each and the N x V logits dominate memory and time;
- ``decoder``: a Qwen3-0.6B-like student (hidden 1024, 24 layers, 16 query / 8 key-value heads of 128) whose
  output layer is ~23% of its parameters, as in the paper's pairs (Qwen3-4B: 10%), with a frozen teacher of the
  same shape; fewer tokens (2 x 512), so that it fits 24 GB in fp32 with AdamW.

Variants:

- ``base``: the TIP release's style: the student's forward returns logits at every position (N x V, kept for
  backward), the teacher's too, and the loss is computed over all tokens in chunks of positions;
- ``tip@rho``: tip.step's step on one micro-batch (``step_tip``): one student forward, Soft-OR selection of
  rho N tokens from a scoring loop over its hidden states (rho = 1: every token, signals from the loss's loop),
  and the output layer only at kept rows, once per model (tip.losses.fused_divergence_sum);
- ``trl``: TRL's GKDTrainer loss (generalized_jsd_loss, beta = 1: reverse KL; lmbda = 1 only says the
  rollouts are the student's own) over full student and teacher logits, when TRL is installed;
- any of them with ``+ckpt`` (e.g. ``tip@0.1+ckpt``): the student with activation checkpointing, as
  ``train.gradient_checkpointing=true`` sets it; the table then says what it saves against the same variant
  without it.

Peak memory is the process's peak RSS during the measured step above its RSS before it (Linux VmHWM after
resetting it through /proc/self/clear_refs), and the whole process's peak; on a GPU (--device cuda) CUDA's max
allocated. One warm-up step (it allocates AdamW's state) precedes the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ["base", "tip@1.0", "tip@0.5", "tip@0.2", "tip@0.1", "trl"]
SHAPES = {  # model and batch of each shape; command-line flags override
    "logits": dict(hidden=256, teacher_hidden=512, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=768,
                   batch=4, response=1024),
    "decoder": dict(hidden=1024, teacher_hidden=1024, layers=24, heads=16, kv_heads=8, head_dim=128,
                    intermediate=3072, batch=2, response=512),
}


def build_models(args, device):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    def model(hidden, layers, seed):
        torch.manual_seed(seed)
        cfg = Qwen3Config(vocab_size=151_936, hidden_size=hidden, intermediate_size=args.intermediate * hidden //
                          args.hidden, num_hidden_layers=layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, head_dim=args.head_dim * hidden // args.hidden,
                          tie_word_embeddings=False, max_position_embeddings=args.prompt + args.response + 8)
        return Qwen3ForCausalLM(cfg).to(device)

    student = model(args.hidden, args.layers, 1)
    teacher = model(args.teacher_hidden, args.layers, 2).requires_grad_(False).eval()
    return student, teacher


def batch(args, device):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151_000, (args.batch, args.prompt + args.response), generator=g).to(device)
    attention = torch.ones_like(ids)
    target_mask = torch.zeros(args.batch, ids.shape[1] - 1, dtype=torch.bool, device=device)
    target_mask[:, args.prompt - 1:] = True  # logits at position t predict token t+1: the response tokens
    return ids, attention, target_mask


def step_base(student, teacher, ids, attention, target_mask, chunk):
    """Full logits from both models, loss over all response tokens in chunks of positions."""
    import torch

    from tip.reference_loss import kept_token_divergence, opd_loss

    logits = student(input_ids=ids, attention_mask=attention).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attention).logits[:, :-1]
    s_flat, t_flat = logits.reshape(-1, logits.shape[-1]), t_logits.reshape(-1, t_logits.shape[-1])
    rows = target_mask.reshape(-1).nonzero(as_tuple=True)[0]
    divs = kept_token_divergence(lambda i: s_flat[i], lambda i: t_flat[i], rows, "reverse_kl", chunk_size=chunk)
    return opd_loss(divs, target_mask, target_mask).loss, 0.0


def step_tip(student, teacher, ids, attention, target_mask, chunk, keep):
    """tip.step's step on one micro-batch: one student forward (with gradient) shared by scoring and loss; at
    rho < 1 a scoring loop over its detached hidden states and Soft-OR selection, at rho = 1 the signals from the
    loss's own loop; the loss projects only kept rows, once per model, gradients formed in the same loop."""
    import torch

    from tip.losses import fused_divergence_sum, loss_denominator, normalised_loss
    from tip.models import head_logits_raw, hidden_states
    from tip.selection import select_tokens
    from tip.signals import token_signals

    with torch.no_grad():
        t_flat = hidden_states(teacher, ids, attention)[:, :-1].reshape(-1, teacher.config.hidden_size)
    s_flat = hidden_states(student, ids, attention)[:, :-1].reshape(-1, student.config.hidden_size)
    s_head = student.get_output_embeddings()
    t0 = time.perf_counter()
    if keep >= 1:
        kept = target_mask
    else:  # the scoring loop and the selection: what a rho < 1 step adds
        with torch.no_grad():
            signals = token_signals(lambda i: head_logits_raw(student, s_flat.detach()[i]),
                                    lambda i: head_logits_raw(teacher, t_flat[i]), target_mask, chunk)
            kept = select_tokens("soft_or", signals, keep)
    select_s = time.perf_counter() - t0
    rows = kept.reshape(-1).nonzero(as_tuple=True)[0]
    t_kept = t_flat[rows]
    fused = fused_divergence_sum(s_flat[rows], s_head.weight, None, lambda i: head_logits_raw(teacher, t_kept[i]),
                                 "reverse_kl", chunk_size=chunk, with_signals=keep >= 1)
    return normalised_loss(fused.total, loss_denominator(kept, target_mask, "kept")), select_s


def step_trl(student, teacher, ids, attention, target_mask, chunk):
    import torch
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    logits = student(input_ids=ids, attention_mask=attention).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attention).logits[:, :-1]
    labels = torch.where(target_mask, ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    return GKDTrainer.generalized_jsd_loss(logits, t_logits, labels=labels, beta=1.0), 0.0


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(args) -> dict:
    import torch

    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    student, teacher = build_models(args, device)
    ids, attention, target_mask = batch(args, device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    name, _, extra = args.variant.partition("+")
    if extra == "ckpt":  # what tip.parts does for train.gradient_checkpointing=true
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.train()
    elif extra:
        raise SystemExit(f"unknown variant suffix +{extra}; known: +ckpt")
    if name == "trl":
        try:
            import trl  # noqa: F401
        except ImportError:
            return {"variant": name, "skipped": "TRL is not installed (pip install trl)"}

    def one_step():
        opt.zero_grad(set_to_none=True)
        if name == "base":
            loss, sel = step_base(student, teacher, ids, attention, target_mask, args.chunk)
        elif name == "trl":
            loss, sel = step_trl(student, teacher, ids, attention, target_mask, args.chunk)
        else:
            loss, sel = step_tip(student, teacher, ids, attention, target_mask, args.chunk, float(name.split("@")[1]))
        loss.backward()
        opt.step()
        return float(loss), sel

    one_step()  # warm-up: AdamW state, allocator pools
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    loss, select_s = one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        process_peak = peak
    else:
        peak = _rss_mb("VmHWM")
        import resource
        process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    elapsed = time.perf_counter() - t0
    return {"variant": args.variant, "loss": loss, "step_s": elapsed, "select_s": select_s, "before_mb": before,
            "peak_mb": peak, "step_mb": peak - before, "process_peak_mb": process_peak,
            "tokens": int(target_mask.sum()),
            "head_share": student.get_output_embeddings().weight.numel() / sum(p.numel() for p in student.parameters())}


def median_run(runs: list[dict]) -> dict:
    """The run with the median step time (its memory figures with it); skipped if any run was."""
    skipped = [r for r in runs if "skipped" in r]
    if skipped:
        return skipped[0]
    return sorted(runs, key=lambda r: r["step_s"])[len(runs) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--shape", choices=list(SHAPES), default="logits")
    parser.add_argument("--prompt", type=int, default=64)
    for key, value in SHAPES["logits"].items():  # defaults come from --shape
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="runs of every variant, side by side; medians")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0

    runs: dict[str, list[dict]] = {v: [] for v in args.variants.split(",")}
    for repeat in range(args.repeats):  # side by side: each repeat runs every variant once
        for variant in runs:
            cmd = [sys.executable, __file__, "--variant", variant] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("variant", "variants")]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
            if proc.returncode == -9:
                runs[variant].append({"variant": variant, "skipped": "killed by the kernel (out of memory)"})
            elif proc.returncode:
                runs[variant].append({"variant": variant,
                                      "skipped": f"failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"})
            else:
                runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {variant} done ({repeat + 1}/{args.repeats})", file=sys.stderr, flush=True)
    results = [median_run(rs) for rs in runs.values()]

    base = next((r for r in results if r["variant"] == "base" and "skipped" not in r), None)
    tokens = next((r["tokens"] for r in results if "tokens" in r), 0)
    unit = "CUDA max allocated" if args.device.startswith("cuda") else "RSS"
    head_share = next((r["head_share"] for r in results if "head_share" in r), 0.0)
    print(f"\nOne OPD step, {args.shape}-heavy Qwen3-shaped pair (V = 151,936, student hidden {args.hidden}, "
          f"teacher {args.teacher_hidden}, {args.layers} layers; output layer {100 * head_share:.0f}% of the "
          f"student), {tokens} response tokens, chunk {args.chunk}, {args.device}; median of {args.repeats}")
    print(f"memory: {unit}; 'step' = peak during the step above the memory before it")
    print(f"{'variant':<14} {'step MB':>9} {'peak MB':>9} {'step s':>8} {'score+select':>13} "
          f"{'step/base':>10} {'peak/base':>10} {'time/base':>10}")
    for r in results:
        if "skipped" in r:
            print(f"{r['variant']:<14} skipped: {r['skipped']}")
            continue
        ratios = ("", "", "")
        if base:
            ratios = (f"{r['step_mb'] / base['step_mb']:.2f}x", f"{r['peak_mb'] / base['peak_mb']:.2f}x",
                      f"{r['step_s'] / base['step_s']:.2f}x")
        share = f"{100 * r['select_s'] / r['step_s']:.0f}%" if r["select_s"] else "—"
        print(f"{r['variant']:<14} {r['step_mb']:9.0f} {r['peak_mb']:9.0f} {r['step_s']:8.2f} {share:>13} "
              f"{ratios[0]:>10} {ratios[1]:>10} {ratios[2]:>10}")
    by_name = {r["variant"]: r for r in results if "skipped" not in r}
    for name, r in by_name.items():
        plain = by_name.get(name.removesuffix("+ckpt"))
        if name.endswith("+ckpt") and plain:
            print(f"checkpointing, {plain['variant']}: step memory {r['step_mb'] / plain['step_mb']:.2f}x "
                  f"({plain['step_mb'] - r['step_mb']:.0f} MB less), peak {r['peak_mb'] / plain['peak_mb']:.2f}x, "
                  f"time {r['step_s'] / plain['step_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
