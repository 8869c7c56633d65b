"""Tail-only OPD on a real pair, on cached trunk features: does a selective rule keep all-token
OPD's gain when every cell trains at its own learning rate? (issue 39, part 4; pre-registration and
results in docs/probe.md, "Tail-only OPD on the real pair")

    python -m tip.probe.tail_opd pair=qwen25_coder_cpu data=gsm8k

Per independent batch (``probe.tail_opd.batches``), from disjoint training prompts: the untrained
student's rollouts of ``train_prompts`` prompts (trained on), of ``heldout_prompts`` prompts for
half A (chooses each cell's lr) and as many for half B (reports it), sampled as the probe samples
them (``tip.probe.run.student_rollouts``), and half B's problems with their reference solutions.
The student's hidden states entering its last ``probe.blocks`` blocks and the teacher's
log-probabilities at every scored position are computed once (``trunk_features``): no rollout is
regenerated, and each training step runs only the tail (those blocks, the final norm and the output
layer, ``tip.probe.tail``) on the fixed training rollouts.

Each cell (``cells``: rule@keep) trains ``steps`` AdamW steps at each lr of ``lrs`` from the
untrained student, with the run's selection (``tip.selection.select`` with the rule's parameters,
``tip.probe.measure.rule_params``) and the run's loss (``tip.signals.divergence`` summed over the
kept tokens, ``tip.losses.normalised_loss`` over the kept count: Eq. 9). Metrics, after training:

- primary: the held-out reverse-KL reduction, mean KL(P_S || P_T) over a half's response tokens
  before minus after training;
- secondary: the reduction of the teacher-forced NLL of half B's GSM8K reference solutions.

A cell's lr is the one with the largest mean reduction on half A over the batches (ties: the
smaller); its numbers are half B's at that lr, one per batch. The claims and their decision rule are
``CLAIMS`` and ``decide``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tip.claims import Claim
from tip.config import CONF_DIR, ConfigError, check_config, parse_cell, require_conf_dir
from tip.errors import one_line_errors
from tip.losses import loss_denominator, normalised_loss
from tip.models import final_logit_softcap, hidden_states, load_model, load_tokenizer
from tip.probe.measure import rule_params
from tip.probe.run import student_rollouts
from tip.probe.tail import tail_parameters, train_tail_only
from tip.rollout import RolloutBatch
from tip.selection import select
from tip.signals import SIGNAL_ROWS, TokenSignals, divergence, log_probs, row_signals, softcap
from tip.stats import difference
from tip.sweep_claims import Reading, verdict_words
from tip.sweep_tuning import dev_best
from tip.taxonomy import BatchStats

ROWS = 256  # output-layer rows at a time where no gradient is needed (memory)


class _AtTail(Exception):
    """Raised by the hook that caught the first tail block's input: the rest is not needed."""


@dataclass
class FixedSet:
    """Fixed sequences with what the tail needs: the hidden states entering the first tail block
    (B, L, d), the other arguments the model passed it, the scored positions (B, L-1), the token
    each predicts (N,) and, for rollouts, the teacher's log-probabilities there (N, V) in fp16."""

    hidden: torch.Tensor
    block_kwargs: dict
    mask: torch.Tensor
    targets: torch.Tensor
    teacher_logp: torch.Tensor | None


@torch.no_grad()
def trunk_features(student, batch: RolloutBatch, blocks: int) -> tuple[torch.Tensor, dict]:
    """The hidden states entering the student's last ``blocks`` blocks and what the model passed
    that block besides them (attention mask, positions, rotary embeddings), from one forward that
    stops there."""
    caught: dict = {}

    def grab(module, args, kwargs):
        caught["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _AtTail

    layer = list(student.get_decoder().layers)[-blocks]
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _AtTail:
        pass
    finally:
        handle.remove()
    return caught["hidden"], caught["kwargs"]


def tail_rows(student, blocks: int, fixed: FixedSet) -> torch.Tensor:
    """(N, d): the final-norm hidden states at the scored positions, through the tail blocks (with
    the graph to their parameters when gradients are on)."""
    h = fixed.hidden
    for layer in list(student.get_decoder().layers)[-blocks:]:
        out = layer(h, **fixed.block_kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return student.get_decoder().norm(h)[:, :-1][fixed.mask]


def head(student, rows: torch.Tensor) -> torch.Tensor:
    return softcap(student.get_output_embeddings()(rows), final_logit_softcap(student))


@torch.no_grad()
def teacher_log_probs(teacher, batch: RolloutBatch, width: int) -> torch.Tensor:
    """(N, width) fp16: the teacher's log-probabilities at the batch's scored positions, over the
    first ``width`` ids (the pair's common vocabulary)."""
    rows = hidden_states(teacher, batch.input_ids, batch.attention_mask)[:, :-1][batch.target_mask]
    parts = [log_probs(head(teacher, rows[i:i + ROWS])[:, :width]).half()
             for i in range(0, rows.shape[0], ROWS)]
    return torch.cat(parts)


def reference_batch(tokenizer, prompt_ids: list[list[int]], solutions: list[str]) -> RolloutBatch:
    """Prompt + reference solution + end-of-sequence, right-padded, the solution scored."""
    rows = [p + tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for p, s in zip(prompt_ids, solutions)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, device="cpu")
    att = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    response = torch.zeros((len(rows), width), dtype=torch.bool, device="cpu")
    for i, (row, prompt) in enumerate(zip(rows, prompt_ids)):
        ids[i, :len(row)] = torch.tensor(row, device="cpu")
        att[i, :len(row)] = 1
        response[i, len(prompt):len(row)] = True
    return RolloutBatch(ids, att, response, [len(p) for p in prompt_ids], list(range(len(rows))))


def fixed_set(student, teacher, batch: RolloutBatch, blocks: int, width: int | None) -> FixedSet:
    hidden, kwargs = trunk_features(student, batch, blocks)
    return FixedSet(hidden, kwargs, batch.target_mask, batch.targets[batch.target_mask],
                    None if teacher is None else teacher_log_probs(teacher, batch, width))


@torch.no_grad()
def mean_reverse_kl(student, blocks: int, fixed: FixedSet) -> float:
    rows = tail_rows(student, blocks, fixed)
    total = 0.0
    for i in range(0, rows.shape[0], ROWS):
        logp_t = fixed.teacher_logp[i:i + ROWS].float()
        logp_s = log_probs(head(student, rows[i:i + ROWS])[:, :logp_t.shape[1]])
        total += float(divergence(logp_s, logp_t, "reverse_kl").sum())
    return total / rows.shape[0]


@torch.no_grad()
def mean_nll(student, blocks: int, fixed: FixedSet) -> float:
    rows = tail_rows(student, blocks, fixed)
    total = 0.0
    for i in range(0, rows.shape[0], ROWS):
        logp = log_probs(head(student, rows[i:i + ROWS]))
        total -= float(logp.gather(1, fixed.targets[i:i + ROWS, None]).sum())
    return total / rows.shape[0]


def tail_step(student, blocks: int, fixed: FixedSet, params, keep: float, generator,
              kind: str, beta: float) -> torch.Tensor:
    """One step's loss, as a run takes it: signals of every token (no graph), the rule's
    selection, the divergence summed over the kept tokens over their count (Eq. 9). The output
    layer runs with a graph on the kept rows only."""
    rows = tail_rows(student, blocks, fixed)
    logp_t = fixed.teacher_logp.float()
    width = logp_t.shape[1]
    with torch.no_grad():
        logp_s = log_probs(head(student, rows.detach())[:, :width])
        flat = torch.zeros(len(SIGNAL_ROWS), fixed.mask.numel(), device=rows.device)
        flat[:, fixed.mask.reshape(-1).nonzero(as_tuple=True)[0]] = row_signals(logp_s, logp_t)
        sig = TokenSignals.from_flat(flat, fixed.mask)
        stats = BatchStats.of(sig.entropy[sig.mask], sig.reverse_kl[sig.mask],
                              params.clip_quantile)
        kept_2d = select(params, sig, keep, generator, stats).kept & fixed.mask
        kept = kept_2d[fixed.mask]
    per_token = divergence(log_probs(head(student, rows[kept])[:, :width]), logp_t[kept], kind,
                           beta)
    return normalised_loss(per_token.sum(), loss_denominator(kept_2d, fixed.mask, "kept"))


@dataclass(frozen=True)
class BatchSets:
    train: FixedSet
    half_a: FixedSet
    half_b: FixedSet
    references_b: FixedSet


def train_cell(student, blocks: int, start: list[torch.Tensor], sets: BatchSets, params,
               keep: float, lr: float, steps: int, seed: int, kind: str, beta: float) -> None:
    """``steps`` AdamW steps of the tail from the untrained student's tail (``start``)."""
    from tip.engine import OPTIMIZERS

    tail = tail_parameters(student, blocks)
    with torch.no_grad():
        for p, p0 in zip(tail, start):
            p.copy_(p0)
    opt = OPTIMIZERS["adamw"](tail, max_norm=1.0, lr=lr)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(steps):
        loss = tail_step(student, blocks, sets.train, params, keep, generator, kind, beta)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


CLAIMS = [
    Claim("q3@0.1 keeps at least 0.8 of all-token's reduction", "greater", "reverse_kl",
          ("q3", 0.1), ("all", 1.0), margin=0.8, primary=True, name="C1"),
    Claim("q3@0.1 reduces more than random@0.1", "greater", "reverse_kl", ("q3", 0.1),
          ("random", 0.1), margin=1.0, primary=True, name="C2"),
    Claim("soft_or@0.5 keeps at least 0.95 of all-token's reduction", "greater", "reverse_kl",
          ("soft_or", 0.5), ("all", 1.0), margin=0.95, primary=True, name="C3"),
]
"""Pre-registered (docs/probe.md): "A keeps at least m of B" is read on d_b = R_A,b - m * R_B,b,
R the half-B reverse-KL reduction of batch b at each cell's own lr (``margin`` holds m)."""


def decide(chosen: dict[str, dict], grid: list[float]) -> list[dict]:
    """Each claim's verdict from the cells' half-B reductions per batch (``chosen[cell]["b"]``),
    by the report's rule (``tip.sweep_claims.verdict_words``): the three claims are primary, so
    their one-sided tests for and against form one Holm family at 0.05; a difference equal on every
    batch is decided by its sign. A claim is untestable when all-token's lr sits at an end of the
    grid (the grid did not bracket its optimum) or a cell is missing."""
    readings = []
    edge = chosen.get("all@1", {}).get("lr") in (grid[0], grid[-1])
    for claim in CLAIMS:
        a, b = (f"{r}@{k:g}" for r, k in (claim.a, claim.b))
        if a not in chosen or b not in chosen or edge:
            why = "all-token's lr at the grid's edge" if edge else "a cell is missing"
            readings.append((claim, None, why))
            continue
        d = {i: ra - claim.margin * rb
             for i, (ra, rb) in enumerate(zip(chosen[a]["b"], chosen[b]["b"]))}
        readings.append((claim, difference(d, dict.fromkeys(d, 0.0)), ""))
    verdicts = verdict_words([Reading("greater", diff, primary=True) for _, diff, _ in readings])
    out = []
    for (claim, diff, why), verdict in zip(readings, verdicts):
        out.append({"claim": claim.name, "statement": claim.statement, "verdict": verdict,
                    "why": why, "d": None if diff is None else diff.d,
                    "se": None if diff is None else diff.se})
    return out


def choose(results: list[dict], grid: list[float]) -> dict[str, dict]:
    """Each cell's lr (the largest mean half-A reduction over batches; ties: the smaller lr) and
    its half-B numbers per batch at that lr."""
    out = {}
    for cell in dict.fromkeys(r["cell"] for r in results):
        by_lr = {lr: [r for r in results if r["cell"] == cell and r["lr"] == lr] for lr in grid}
        mean_a = {lr: statistics.fmean(r["a"] for r in rs) for lr, rs in by_lr.items() if rs}
        lr = dev_best(mean_a)
        rows = sorted(by_lr[lr], key=lambda r: r["batch"])
        out[cell] = {"lr": lr, "a_by_lr": mean_a, "b": [r["b"] for r in rows],
                     "nll_b": [r["nll_b"] for r in rows]}
    return out


def check_settings(t) -> None:
    for key in ("batches", "train_prompts", "heldout_prompts", "steps"):
        if not isinstance(t[key], int) or isinstance(t[key], bool) or t[key] < 1:
            raise ConfigError(f"probe.tail_opd.{key}={t[key]!r} is not allowed: expected an "
                              "integer >= 1")
    lrs = list(t.lrs)
    if len(lrs) < 2 or any(not isinstance(x, (int, float)) or x <= 0 for x in lrs):
        raise ConfigError(f"probe.tail_opd.lrs={lrs!r} is not allowed: expected 2 or more "
                          "positive learning rates")
    for cell in t.cells:
        parse_cell(str(cell))


def run_tail_opd(cfg: DictConfig, run_dir: Path) -> dict:
    from tip.data import load_examples
    from tip.parts import training_prompt_ids

    check_config(cfg)
    t = cfg.probe.tail_opd
    check_settings(t)
    if (run_dir / "tail_opd.json").exists():
        raise ConfigError(f"{run_dir / 'tail_opd.json'} exists: a finished experiment is never "
                          "overwritten; choose another hydra.run.dir")
    grid = sorted(float(x) for x in t.lrs)
    cells = [parse_cell(str(c)) for c in t.cells]
    per_batch = t.train_prompts + 2 * t.heldout_prompts
    examples = load_examples(cfg.data.source, "train")
    if len(examples) < per_batch * t.batches:
        raise ConfigError(f"tail_opd needs {per_batch * t.batches} training problems, the data "
                          f"has {len(examples)}")
    torch.manual_seed(cfg.seed)
    order = torch.randperm(len(examples), device="cpu",
                           generator=torch.Generator(device="cpu").manual_seed(cfg.seed))
    chosen_examples = [examples[i] for i in order[:per_batch * t.batches].tolist()]
    half_b = [e for b in range(t.batches)
              for e in chosen_examples[b * per_batch + t.train_prompts + t.heldout_prompts:
                                       (b + 1) * per_batch]]
    missing = next((e for e in half_b if not e.solution), None)
    if missing is not None:  # every half-B problem's reference is scored (the secondary metric)
        raise ConfigError(f"{cfg.data.name!r} example {missing.id!r} has no reference solution: "
                          "tail_opd scores half B's references; use data with solutions (gsm8k)")
    tokenizer = load_tokenizer(cfg.pair.tokenizer or cfg.pair.student)
    prompts = training_prompt_ids(cfg, tokenizer, chosen_examples)
    student = load_model(cfg.pair.student, torch.float32, "student", "sdpa").eval()
    teacher = load_model(cfg.pair.teacher, torch.float32, "teacher", "sdpa").eval()
    teacher.requires_grad_(False)
    blocks = cfg.probe.blocks
    width = min(student.get_output_embeddings().weight.shape[0],
                teacher.get_output_embeddings().weight.shape[0])
    t0 = time.time()
    sets = []
    for b in range(t.batches):
        torch.manual_seed(cfg.seed + b)
        base = b * per_batch
        parts = [range(base, base + t.train_prompts),
                 range(base + t.train_prompts, base + t.train_prompts + t.heldout_prompts),
                 range(base + t.train_prompts + t.heldout_prompts, base + per_batch)]
        rolled = [student_rollouts(student, tokenizer, [prompts[i] for i in part], cfg)
                  for part in parts]
        refs = reference_batch(tokenizer, [prompts[i] for i in parts[2]],
                               [chosen_examples[i].solution for i in parts[2]])
        sets.append(BatchSets(*(fixed_set(student, teacher, r, blocks, width) for r in rolled),
                              fixed_set(student, None, refs, blocks, None)))
        print(f"batch {b + 1}/{t.batches} cached: "
              f"{int(sets[-1].train.mask.sum())} training tokens, {time.time() - t0:.0f} s",
              flush=True)
    del teacher
    train_tail_only(student, blocks)
    start = [p.detach().clone() for p in tail_parameters(student, blocks)]
    before = [{"a": mean_reverse_kl(student, blocks, s.half_a),
               "b": mean_reverse_kl(student, blocks, s.half_b),
               "nll_b": mean_nll(student, blocks, s.references_b)} for s in sets]
    selections = rule_params(OmegaConf.merge(cfg, {"probe": {"rules": sorted({r for r, _ in
                                                                              cells})}}))
    results = []
    for rule, keep in cells:
        for lr in grid:
            for b, s in enumerate(sets):
                train_cell(student, blocks, start, s, selections[rule], keep, lr, t.steps,
                           cfg.seed + b, cfg.divergence.name, cfg.divergence.beta)
                row = {"cell": f"{rule}@{keep:g}", "lr": lr, "batch": b,
                       "a": before[b]["a"] - mean_reverse_kl(student, blocks, s.half_a),
                       "b": before[b]["b"] - mean_reverse_kl(student, blocks, s.half_b),
                       "nll_b": before[b]["nll_b"] - mean_nll(student, blocks, s.references_b)}
                if not all(math.isfinite(row[k]) for k in ("a", "b", "nll_b")):
                    raise FloatingPointError(f"tail_opd {row} is not finite")
                results.append(row)
            print(f"{rule}@{keep:g} lr {lr:g} done, {time.time() - t0:.0f} s", flush=True)
    chosen = choose(results, grid)
    result = {"pair": {"student": cfg.pair.student, "teacher": cfg.pair.teacher},
              "settings": OmegaConf.to_container(t, resolve=True), "blocks": blocks,
              "samples": cfg.probe.samples, "max_new_tokens": cfg.probe.max_new_tokens,
              "before": before, "results": results, "chosen": chosen,
              "claims": decide(chosen, grid), "seconds": round(time.time() - t0)}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "tail_opd.json").write_text(json.dumps(result, indent=2) + "\n")
    (run_dir / "tail_opd.md").write_text(render(result) + "\n")
    print(render(result), flush=True)
    return result


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} [{min(values):.4f}, {max(values):.4f}]"


def render(result: dict) -> str:
    lines = [f"# Tail-only OPD: {result['pair']['teacher']} -> {result['pair']['student']}", "",
             f"{len(result['before'])} batches; {result['settings']['steps']} steps of the last "
             f"{result['blocks']} block(s) and the output layer; each cell at its own lr (chosen "
             "on half A), reported on half B: mean over batches [min, max]. Reverse-KL and NLL "
             "reductions in nats per token.", "",
             "| cell | lr | half-A reduction per lr | half-B reverse-KL reduction | "
             "half-B reference NLL reduction |", "|---|---|---|---|---|"]
    for cell, c in result["chosen"].items():
        per_lr = ", ".join(f"{float(lr):g}: {v:.4f}" for lr, v in c["a_by_lr"].items())
        lines.append(f"| {cell} | {c['lr']:g} | {per_lr} | {_spread(c['b'])} | "
                     f"{_spread(c['nll_b'])} |")
    lines += ["", "| claim | d (mean over batches) | SE | verdict |", "|---|---|---|---|"]
    for c in result["claims"]:
        d = "—" if c["d"] is None else f"{c['d']:+.4f}"
        se = "—" if c["se"] is None else f"{c['se']:.4f}"
        why = f" ({c['why']})" if c["why"] else ""
        lines.append(f"| {c['claim']} {c['statement']} | {d} | {se} | {c['verdict']}{why} |")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    with one_line_errors(multirun=False):
        run_tail_opd(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    require_conf_dir()
    hydra_main()


if __name__ == "__main__":
    main()
