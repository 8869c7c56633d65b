"""The agentic student's first decision on carry problems, teacher-forced (issue 39, part 2).

    python -m tip.testbed.agent.decision <sweep dir>   # every finished cell with a saved student

On a carry problem the untrained student adds in its head (and answers wrong) where the teacher
calls the tool: greedy accuracy there is 0% in every cell of the Table 7 sweep, so that comparison
cannot move. The continuous metric is the student's log-probability of the teacher's first
decision, ``<tool_call>`` as the first token of its first turn, after the prompt as evaluation
lays it out. Each cell's ``decision.json`` holds it per held-out carry problem (ids as in the
cell's evaluation), from the cell's saved student (``checkpoints/final``: run with
``train.save_final=true``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import yaml

from tip.signals import log_probs

CALL = "<tool_call>"


@torch.no_grad()
def first_decision_logp(model, tokenizer, prompts: list[list[int]]) -> list[float]:
    """log P(``<tool_call>`` | prompt) for each prompt (token ids, as evaluation builds them)."""
    call = tokenizer.convert_tokens_to_ids(CALL)
    out = []
    for ids in prompts:
        logits = model(input_ids=torch.tensor([ids], device="cpu")).logits[0, -1]
        out.append(float(log_probs(logits)[call]))
    return out


def carry_prompts(cfg: dict, tokenizer) -> tuple[list[str], list[list[int]]]:
    """The held-out carry problems of the cell's evaluation: their ids and prompts."""
    from omegaconf import OmegaConf

    from tip.benchmarks import load_benchmarks
    from tip.data import prompt_token_ids

    conf = OmegaConf.create(cfg)
    (bench,) = [b for b in load_benchmarks(conf.eval) if b.env is not None]
    carry = [e for e in bench.examples if "carry" in e.tags]
    prompts = prompt_token_ids(tokenizer, [e.problem for e in carry], bench.prompt_template,
                               conf.pair.chat_template, conf.pair.chat_template_kwargs)
    return [e.id for e in carry], prompts


def cell_decision(cell_dir: Path) -> dict | None:
    """Write ``<cell>/decision.json`` ({problem id: log P}) from the cell's saved student; None
    when the cell has no saved student or did not finish."""
    from tip.models import load_model, load_tokenizer

    final = cell_dir / "checkpoints" / "final"
    status = cell_dir / "status.json"
    if not final.is_dir() or not status.is_file() \
            or json.loads(status.read_text()).get("status") != "completed":
        return None
    cfg = yaml.safe_load((cell_dir / "config.yaml").read_text())
    tokenizer = load_tokenizer(str(final))
    model = load_model(str(final), torch.float32, "student").eval()
    ids, prompts = carry_prompts(cfg, tokenizer)
    scores = dict(zip(ids, first_decision_logp(model, tokenizer, prompts)))
    (cell_dir / "decision.json").write_text(json.dumps(scores, indent=1) + "\n")
    return scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    args = ap.parse_args(argv)
    cells = sorted(d for d in args.sweep_dir.iterdir() if (d / "config.yaml").is_file())
    for d in cells:
        scores = cell_decision(d)
        if scores is not None:
            print(f"{d.name}: mean log P({CALL}) on {len(scores)} carry problems "
                  f"{statistics.fmean(scores.values()):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
