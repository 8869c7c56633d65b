"""Accuracy of a policy on benchmarks, sharded over data-parallel ranks (used before, during and after training).

Metric: mean@n, the average over problems of the fraction of n samples graded correct (the paper's mean@16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from tip.data import Example, format_prompt
from tip.grading import boxed_answer, simple_equal
from tip.rollout import encode_prompts, hf_generate


@dataclass
class Benchmark:
    name: str
    examples: list[Example]
    prompt_template: str


@torch.no_grad()
def evaluate(model, tokenizer, benchmarks: list[Benchmark], *, samples: int, temperature: float, top_p: float,
             top_k: int, max_new_tokens: int, batch_size: int, chat_template="auto", rank: int = 0,
             world_size: int = 1, synced_gpus: bool = False,
             grade: Callable[[str | None, str], bool] = simple_equal) -> dict[str, float]:
    """``{name}/accuracy`` (mean@n) and ``{name}/n`` per benchmark. Every rank must call this (generation is
    collective under ZeRO-3); each grades its shard and the counts are summed."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for bench in benchmarks:
        shard = bench.examples[rank::world_size]
        per_rank = math.ceil(len(bench.examples) / world_size)
        correct = torch.zeros(1, dtype=torch.float64)
        for start in range(0, per_rank, batch_size):
            part = shard[start:start + batch_size]
            # Every rank runs the same number of generate calls; a rank out of problems generates for a
            # placeholder and scores nothing.
            placeholder = not part
            part = part or bench.examples[:1]
            prompts = [format_prompt(tokenizer, e.problem, bench.prompt_template, chat_template) for e in part]
            used_chat = prompts[0] != bench.prompt_template.replace("{problem}", part[0].problem)
            batch = hf_generate(model, tokenizer, encode_prompts(tokenizer, prompts, used_chat), n=samples,
                                temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                synced_gpus=synced_gpus)
            if placeholder:
                continue
            texts = tokenizer.batch_decode(batch.responses(), skip_special_tokens=True)
            for text, idx in zip(texts, batch.example_index):
                correct += float(grade(boxed_answer(text), part[idx].answer)) / samples
        if world_size > 1:
            torch.distributed.all_reduce(correct)
        out[f"{bench.name}/accuracy"] = float(correct) / len(bench.examples)
        out[f"{bench.name}/n"] = len(bench.examples)
    model.train(was_training)
    return out
