"""Token records: one row per response token of a step's rollouts, for ``python -m tip.microscope``
and analysis.

``train.token_log_every=N`` writes, at every N-th step, ``tokens/step_<S>.rank<r>.parquet`` (each
rank its own rollouts) and ``tokens/step_<S>.json`` (rank 0: the rule, keep and the batch statistics
that selection used, so that any rule can be re-run on the logged signals exactly). Parquet (zstd)
rather than compressed JSONL: the columns are typed numbers (smaller and faster to write and read:
docs/performance.md). The columns are ``COLUMNS``.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import torch

from tip.checkpoint import write_atomic
from tip.selection import OPTIONAL_SIGNALS, Selection
from tip.signals import TOP1_FIELDS, TokenSignals
from tip.taxonomy import BatchStats

TOKENS_DIR = "tokens"
COLUMNS = {
    "rank": "the process that rolled the token out",
    "rollout": "the rollout's index among its rank's rollouts of the step",
    "prompt": "the prompt's index in the step's global batch",
    "prompt_text": "the problem as the data gives it (before any chat template)",
    "position": "the token's index in its response (0 = first response token)",
    "token_id": "the response token",
    "token": "its text",
    "h": "student entropy H(P_S) / log|V|",
    "delta": "KL(P_S || P_T), nats",
    "delta_fwd": "KL(P_T || P_S), nats",
    "h_teacher": "teacher entropy H(P_T) / log|V|",
    "h_hat": "h clipped at the batch's quantile, min-max normalised (what rules see)",
    "d_hat": "delta min-max normalised",
    "quadrant": "1..4 (Q1 high h / high delta ... Q4 low h / low delta)",
    "kept": "whether the step's rule kept the token for the loss",
    "score": "the rule's score (NaN for a rule that keeps every token)",
    "weight": "the token's loss weight (1 for a hard-mask rule's kept tokens, 0 for dropped ones)",
    "student_top_id": "the student's most likely token here",
    "student_top": "its text",
    "student_top_p": "its probability under the student",
    "teacher_top_id": "the teacher's most likely token here",
    "teacher_top": "its text",
    "teacher_top_p": "its probability under the teacher",
}
OPTIONAL_COLUMNS = OPTIONAL_SIGNALS
"""Columns after ``COLUMNS``, present when the step computed them: the optional ``TokenSignals``
fields."""


def token_table(signals: TokenSignals, selection: Selection, kept: torch.Tensor,
                labels: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The step's numbers at every valid position, flattened in (rollout, position) order and moved
    to the host (one transfer per column). ``targets`` (B, T) are the tokens each position predicts;
    ``signals.top1`` must be present (``token_signals(..., with_top1=True)``)."""
    mask = signals.mask.bool()
    rows = mask.nonzero(as_tuple=True)[0]
    position = (mask.long().cumsum(1) - 1)[mask]
    score = (selection.score if selection.score is not None
             else torch.full_like(signals.entropy, float("nan")))
    top1 = signals.top1[:, mask]
    columns = {
        "rollout": rows, "position": position, "token_id": targets[mask],
        "h": signals.entropy[mask], "delta": signals.reverse_kl[mask],
               "delta_fwd": signals.forward_kl[mask],
        "h_teacher": signals.teacher_entropy[mask],
        **{name: getattr(signals, name)[mask] for name in OPTIONAL_COLUMNS
           if getattr(signals, name) is not None},
        "h_hat": selection.h_hat[mask], "d_hat": selection.d_hat[mask], "quadrant": labels[mask],
        "kept": kept.bool()[mask], "score": score.float()[mask],
        "weight": (kept.float() if selection.weights is None else selection.weights.float())[mask],
        **{name: (top1[i].long() if name.endswith("_id") else top1[i])
           for i, name in enumerate(TOP1_FIELDS)},
    }
    return {k: v.detach().cpu() for k, v in columns.items()}


def stats_dict(stats: BatchStats) -> dict[str, float]:
    return {k: float(v) for k, v in vars(stats).items()}


def stats_of(values: dict[str, float]) -> BatchStats:
    """The batch statistics of a step's JSON, on the host (where recorded signals are
    re-examined)."""
    names = {f.name for f in fields(BatchStats)}
    return BatchStats(**{k: torch.tensor(v, dtype=torch.float32, device="cpu")
                         for k, v in values.items()
                         if k in names})


def _decode_all(tokenizer, ids) -> dict[int, str]:
    return {i: tokenizer.decode([i]) for i in sorted(set(int(x) for x in ids))}


def step_path(run_dir: Path, step: int, rank: int | None = None) -> Path:
    name = f"step_{step:06d}" + (f".rank{rank}.parquet" if rank is not None else ".json")
    return Path(run_dir) / TOKENS_DIR / name


def write_token_records(run_dir: Path, step: int, rank: int, table: dict[str, torch.Tensor],
                        tokenizer, prompt_index: list[int], prompt_text: list[str],
                        meta: dict | None) -> Path:
    """Write one rank's records of ``step`` (atomically: a reader never sees half a file).
    ``prompt_index`` and ``prompt_text`` are per rollout; ``meta`` (rank 0) goes to the step's
    JSON."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rollout = table["rollout"].numpy()
    texts = _decode_all(tokenizer, [*table["token_id"].tolist(), *table["student_top_id"].tolist(),
                                    *table["teacher_top_id"].tolist()])
    columns = {
        "rank": pa.array([rank] * len(rollout), pa.int16()),
        "rollout": pa.array(rollout, pa.int32()),
        "prompt": pa.array([prompt_index[r] for r in rollout], pa.int32()),
        "prompt_text": pa.array([prompt_text[r] for r in rollout], pa.string()).dictionary_encode(),
        "position": pa.array(table["position"].numpy(), pa.int32()),
        "token_id": pa.array(table["token_id"].numpy(), pa.int32()),
        "token": pa.array([texts[i] for i in table["token_id"].tolist()], pa.string()),
    }
    for name in ("h", "delta", "delta_fwd", "h_teacher", "h_hat", "d_hat"):
        columns[name] = pa.array(table[name].float().numpy(), pa.float32())
    columns["quadrant"] = pa.array(table["quadrant"].numpy(), pa.int8())
    columns["kept"] = pa.array(table["kept"].numpy(), pa.bool_())
    columns["score"] = pa.array(table["score"].float().numpy(), pa.float32())
    columns["weight"] = pa.array(table["weight"].float().numpy(), pa.float32())
    for side in ("student", "teacher"):
        ids = table[f"{side}_top_id"]
        columns[f"{side}_top_id"] = pa.array(ids.numpy(), pa.int32())
        columns[f"{side}_top"] = pa.array([texts[i] for i in ids.tolist()], pa.string())
        columns[f"{side}_top_p"] = pa.array(table[f"{side}_top_p"].float().numpy(), pa.float32())
    for name in OPTIONAL_COLUMNS:
        if name in table:
            columns[name] = pa.array(table[name].float().numpy(), pa.float32())
    assert list(columns) == [*COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in table)]
    path = step_path(run_dir, step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.table(columns), tmp, compression="zstd")
    os.replace(tmp, path)
    if meta is not None:
        write_atomic(step_path(run_dir, step), json.dumps(meta, indent=1) + "\n")
    return path


def logged_steps(run_dir: Path) -> list[int]:
    """Steps with records (their JSON and at least one rank's file), in order."""
    found = []
    for meta in sorted((Path(run_dir) / TOKENS_DIR).glob("step_*.json")):
        step = int(meta.stem.split("_")[1])
        if list(meta.parent.glob(f"step_{step:06d}.rank*.parquet")):
            found.append(step)
    return found


def read_token_records(run_dir: Path, step: int) -> tuple[dict[str, list], dict]:
    """(columns as lists, the step's JSON) of every rank's records of ``step``, ordered by rank,
    rollout and position."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(step_path(run_dir, step, 0).parent.glob(f"step_{step:06d}.rank*.parquet"),
                   key=lambda p: int(p.name.split(".rank")[1].split(".")[0]))
    if not files:
        raise FileNotFoundError(f"no token records of step {step} in {Path(run_dir) / TOKENS_DIR}")
    table = pa.concat_tables([pq.read_table(f) for f in files]).combine_chunks()
    table = table.cast(pa.schema([f.with_type(pa.string()) if f.name == "prompt_text" else f
                                  for f in table.schema]))
    table = table.sort_by([("rank", "ascending"), ("rollout", "ascending"),
                           ("position", "ascending")])
    meta = json.loads(step_path(run_dir, step).read_text())
    return table.to_pydict(), meta
