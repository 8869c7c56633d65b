"""Benchmarks: load them, generate n samples per problem, grade them, and summarise.

The evaluation library, used inside training (before, during and after) and by the command line
``python -m tip.eval`` (tip/eval.py). Generation goes through the same
rollout code the trainer uses, sharded over data-parallel ranks.

Metrics per benchmark (``{name}/...``):
- ``accuracy``: mean@n, the mean over problems of the fraction of the n samples graded correct (the
  paper's "mean@16"), with ``accuracy_std`` the standard deviation of that per-problem fraction over
  problems;
- ``pass@k``: the unbiased estimator 1 - C(n-c, k)/C(n, k) averaged over problems (Chen et al.,
  2021);
- ``maj@k``: the most frequent extracted answer among the first k samples (ties: the earliest) is
  correct;
- ``n`` problems and ``samples`` per problem;
- ``accuracy@<tag>`` and ``n@<tag>``: accuracy (mean@n) and count over the problems carrying a tag,
  where the data tags its problems (the embedded task tags each problem with the student error types
  it exercises, so a sweep shows which error a rule fixes).

A benchmark with an environment (its ``env`` node, e.g. eval=embedded_agent) runs each sample as a
multi-turn episode (``tip.env``); it is graded on the student's own text (every turn, no tool
results), and adds ``with_tool_call`` (share of episodes with a well-formed tool call),
``tool_calls``, ``malformed_calls`` and ``turns`` (means per episode).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tip.data import Example, prompt_token_ids
from tip.env import (
    EpisodeLimits,
    TurnFormat,
    engine_context_tokens,
    get_environment,
    run_episodes,
)
from tip.grading import Grade, grade_many, normalise_answer
from tip.rollout import RolloutBatch, hf_generate, hf_turns, seed_of


@dataclass
class Benchmark:
    name: str
    examples: list[Example]
    prompt_template: str
    grader: str = "math_verify"
    # an ``env`` config node (name, limits): samples are multi-turn episodes; None:
    # single-turn
    env: Any = None


@dataclass(frozen=True)
class Sampling:
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    batch_size: int = 16
    max_seqs_per_generate: int | None = None
    # transformers' generate draws from the global stream seeded by the run; a vLLM engine takes no
    # per-problem seed in evaluation (its batched sampler, seeded at its start: EngineSampler)
    seed: int = 0


class Sampler(Protocol):
    """Where a benchmark's completions come from: ``HFSampler`` (transformers' generate) or
    ``tip.vllm_rollout.EngineSampler`` (the rollout engine)."""

    lockstep: bool  # every rank must make the same calls (ZeRO-3 generate is collective)

    def samples(self, prompt_ids: list[list[int]], n: int, sampling: Sampling,
                seeds: list[int]) -> RolloutBatch: ...

    def turns(self, sampling: Sampling): ...  # a context yielding a tip.env turn generator

    def done(self) -> None: ...


class HFSampler:
    """Completions from transformers' ``generate`` on the model itself, in eval mode, batch by
    batch (``Sampling.batch_size`` problems); with ``lockstep`` (ZeRO-3 over several ranks) every
    rank makes the same calls."""

    def __init__(self, model, tokenizer, lockstep: bool = False):
        self.model, self.tokenizer, self.lockstep = model, tokenizer, lockstep

    def samples(self, prompt_ids, n, sampling, seeds) -> RolloutBatch:
        return hf_generate(self.model, self.tokenizer, prompt_ids, n=n,
                           temperature=sampling.temperature, top_p=sampling.top_p,
                           top_k=sampling.top_k, max_new_tokens=sampling.max_new_tokens,
                           synced_gpus=self.lockstep,
                           max_seqs_per_call=sampling.max_seqs_per_generate)

    def turns(self, sampling):
        return hf_turns(self.model, self.tokenizer, sampling.temperature, sampling.top_p,
                        sampling.top_k, self.lockstep, sampling.max_seqs_per_generate)

    def done(self) -> None:
        pass


def load_benchmarks(eval_cfg, limit: int | None = None) -> list[Benchmark]:
    """Benchmarks of an ``eval`` config node (``limit``, else the node's own ``limit``: only the
    first N problems of each)."""
    from tip.data import load_examples

    limit = limit or eval_cfg.get("limit")
    out = []
    for name, b in eval_cfg.benchmarks.items():
        examples = load_examples(b.source, "test")
        env = b.get("env")
        env = env if env is not None and env.get("name", "none") != "none" else None
        if env is None and b.source.get("kind") == "embedded_agent":
            from tip.config import ConfigError

            raise ConfigError(f"eval.benchmarks.{name} is the embedded agentic task, whose samples "
                              "are tool-use episodes: it needs an environment (python -m tip.train "
                              "env=embedded_agent; python -m tip.eval ... env.name=calc)")
        out.append(Benchmark(name, examples[:limit] if limit else examples, b.prompt_template,
                             b.get("grader", "math_verify"), env))
    return out


def longest_request(bench: Benchmark, tokenizer, max_new_tokens: int, chat_template="auto",
                    chat_template_kwargs=None) -> tuple[int, int]:
    """What a generation engine's context must hold for the benchmark: its longest prompt in tokens,
    and the tokens after it (``max_new_tokens``, or an episode's budget and one more turn)."""
    prompts = prompt_token_ids(tokenizer, [e.problem for e in bench.examples],
                               bench.prompt_template, chat_template, chat_template_kwargs)
    return max(map(len, prompts)), engine_context_tokens(bench.env, max_new_tokens)


def sampling_of(eval_cfg, seed: int = 0) -> Sampling:
    return Sampling(samples=eval_cfg.samples, temperature=eval_cfg.temperature,
                    top_p=eval_cfg.top_p, top_k=eval_cfg.top_k,
                    max_new_tokens=eval_cfg.max_new_tokens, batch_size=eval_cfg.batch_size,
                    max_seqs_per_generate=eval_cfg.max_seqs_per_generate, seed=seed)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is
    correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_correct(grades: list[Grade], k: int) -> bool:
    """Whether the most common extracted answer among the first k samples is a correct one."""
    votes = [(normalise_answer(g.extracted),
              g.correct) for g in grades[:k] if g.extracted is not None]
    if not votes:
        return False
    counts = Counter(v for v, _ in votes)
    top = max(counts.values())
    winner = next(v for v, _ in votes if counts[v] == top)  # earliest among the tied
    return any(ok for v, ok in votes if v == winner)


def summarise(name: str, grades: list[list[Grade]], ks: list[int] | None = None,
              tags: list[tuple[str, ...]] | None = None) -> dict[str, float]:
    """Benchmark metrics from per-problem lists of grades (all of the same length n); ``tags``, one
    tuple per problem, adds the accuracy over the problems of each tag."""
    n = len(grades[0]) if grades else 0
    per_problem = [sum(g.correct for g in gs) / n for gs in grades]
    mean = sum(per_problem) / len(per_problem)
    var = sum((x - mean) ** 2 for x in per_problem) / max(1, len(per_problem) - 1)
    out = {f"{name}/accuracy": mean, f"{name}/accuracy_std": math.sqrt(var),
           f"{name}/n": len(grades), f"{name}/samples": n}
    for tag in sorted({t for ts in tags or [] for t in ts}):
        scores = [x for x, ts in zip(per_problem, tags) if tag in ts]
        out[f"{name}/accuracy@{tag}"] = sum(scores) / len(scores)
        out[f"{name}/n@{tag}"] = len(scores)
    for k in ks if ks is not None else sorted({1, n} | ({4, 8, 16} & set(range(1, n + 1)))):
        out[f"{name}/pass@{k}"] = sum(pass_at_k(n, sum(g.correct for g in gs), k)
                                      for gs in grades) / len(grades)
        out[f"{name}/maj@{k}"] = sum(majority_correct(gs, k) for gs in grades) / len(grades)
    return out


@torch.no_grad()
def generate_completions(sampler: Sampler, tokenizer, bench: Benchmark, sampling: Sampling,
                         chat_template="auto", rank: int = 0, world_size: int = 1,
                         progress: bool = False, chat_template_kwargs=None,
                         episodes: dict[int, list[dict]] | None = None) -> dict[int, list[str]]:
    """``{problem index: [n completions]}`` for this rank's shard (every rank must call this: in
    lockstep, under ZeRO-3, generation is collective, so every rank runs the same number of
    generate calls). A benchmark with an environment runs episodes; ``episodes`` then receives
    ``{problem index: [what each episode did]}``."""
    from tqdm.auto import tqdm

    indices = list(range(rank, len(bench.examples), world_size))
    per_rank = math.ceil(len(bench.examples) / world_size)
    # the rollout engine schedules the rank's whole share itself; generate goes batch by batch
    size = sampling.batch_size if isinstance(sampler, HFSampler) else max(1, per_rank)
    out: dict[int, list[str]] = {}
    for start in tqdm(range(0, per_rank, size), desc=f"generating {bench.name}",
                      disable=not progress):
        part = indices[start:start + size]
        # In lockstep every rank makes the same calls, so a rank out of problems (or with fewer in
        # its last batch) pads with repeats of a problem and drops their completions.
        real = len(part)
        if sampler.lockstep:
            target = min(size, per_rank - start)  # the same on every rank
            part = ((part or [0]) * target)[:target]
        if not part:
            continue
        examples = [bench.examples[i] for i in part]
        prompts = prompt_token_ids(tokenizer, [e.problem for e in examples], bench.prompt_template,
                                   chat_template, chat_template_kwargs)
        seeds = [seed_of(sampling.seed, bench.name, i) for i in part]
        if bench.env is not None:
            with sampler.turns(sampling) as generate_turn:
                done = run_episodes(generate_turn, get_environment(bench.env.name),
                                    TurnFormat(tokenizer, chat_template_kwargs),
                                    EpisodeLimits.of(bench.env), examples, prompts,
                                    sampling.samples, seeds, lockstep=sampler.lockstep)
            texts = [tokenizer.decode(e.student_ids(), skip_special_tokens=True) for e in done]
            index = [e.example_index for e in done]
            for e in done:
                if episodes is not None and e.example_index < real:
                    episodes.setdefault(part[e.example_index], []).append(
                        {"trajectory": tokenizer.decode(e.tokens, skip_special_tokens=False),
                         "turns": e.turns, "tool_calls": e.tool_calls,
                         "malformed_calls": e.malformed_calls, "end": e.end})
        else:
            batch = sampler.samples(prompts, sampling.samples, sampling, seeds)
            texts, index = tokenizer.batch_decode(batch.responses(),
                                                  skip_special_tokens=True), batch.example_index
        for text, j in zip(texts, index):
            if j < real:
                out.setdefault(part[j], []).append(text)
    return out


def grade_completions(bench: Benchmark, completions: dict[int, list[str]], workers: int = 2,
                      timeout_s: float = 10.0, progress: bool = False) -> dict[int, list[Grade]]:
    flat = [(i, c) for i in sorted(completions) for c in completions[i]]
    grades = grade_many([(c, bench.examples[i].answer) for i, c in flat], bench.grader, workers,
                        timeout_s, progress)
    out: dict[int, list[Grade]] = {}
    for (i, _), g in zip(flat, grades):
        out.setdefault(i, []).append(g)
    return out


def problem_records(bench: Benchmark, completions: dict[int, list[str]],
                    grades: dict[int, list[Grade]], episodes: dict[int, list[dict]] | None = None):
    """One JSON-able record per problem: id, answer, completions, extracted answers, verdicts and
    reasons (and what each episode did, for a benchmark with an environment)."""
    for i in sorted(completions):
        ex = bench.examples[i]
        yield {"id": ex.id, "answer": ex.answer, "tags": list(ex.tags),
               "completions": completions[i], "extracted": [g.extracted for g in grades[i]],
               "correct": [g.correct for g in grades[i]], "reasons": [g.reason for g in grades[i]],
               **({"episodes": episodes[i]} if episodes else {})}


def problem_scores(records: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """``{benchmark: {problem id: share of its samples graded correct}}`` from ``evaluate``'s
    records: what a report needs to split a benchmark's problems (``tip.sweep_tuning``)."""
    out: dict[str, dict[str, float]] = {}
    for name, rows in records.items():
        scores = out.setdefault(name, {})
        for r in rows:
            key = str(r["id"])
            while key in scores:  # a data file that repeats an id: each problem still counts
                key += "'"
            scores[key] = sum(r["correct"]) / max(len(r["correct"]), 1)
    return out


EPISODE_METRICS = ("with_tool_call", "tool_calls", "malformed_calls", "turns")
"""What a benchmark with an environment adds (``{name}/<metric>``): the share of episodes with a
well-formed tool call, then well-formed calls, malformed calls and assistant turns per episode."""


def episode_summary(name: str, records: list[dict]) -> dict[str, float]:
    """``EPISODE_METRICS`` over the episodes of a benchmark's records."""
    eps = [e for rec in records for e in rec.get("episodes", [])]
    if not eps:
        return {}
    n = len(eps)
    values = (sum(e["tool_calls"] > 0 for e in eps), sum(e["tool_calls"] for e in eps),
              sum(e["malformed_calls"] for e in eps), sum(e["turns"] for e in eps))
    return {f"{name}/{metric}": v / n for metric, v in zip(EPISODE_METRICS, values)}


def evaluate(model, tokenizer, benchmarks: list[Benchmark], sampling: Sampling,
             chat_template="auto", rank: int = 0, world_size: int = 1, synced_gpus: bool = False,
             workers: int = 2, timeout_s: float = 10.0, progress: bool = False,
             records: dict[str, list[dict]] | None = None,
             chat_template_kwargs=None, sampler: Sampler | None = None) -> dict[str, Any]:
    """Metrics of every benchmark, gathered over ranks. ``records``, if given, receives the
    per-problem records (on every rank, for the problems of all ranks). Completions come from
    ``sampler`` (the rollout engine), else from ``model`` itself in eval mode (``HFSampler``; in
    lockstep with ``synced_gpus``)."""
    sampler = sampler or HFSampler(model, tokenizer, synced_gpus)
    try:
        return _evaluate(sampler, tokenizer, benchmarks, sampling, chat_template, rank, world_size,
                         workers, timeout_s, progress, records, chat_template_kwargs)
    finally:
        sampler.done()


def _evaluate(sampler: Sampler, tokenizer, benchmarks, sampling, chat_template, rank, world_size,
              workers, timeout_s, progress, records, chat_template_kwargs) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for bench in benchmarks:
        episodes: dict[int, list[dict]] = {}
        completions = generate_completions(sampler, tokenizer, bench, sampling, chat_template,
                                           rank, world_size, progress, chat_template_kwargs,
                                           episodes)
        grades = grade_completions(bench, completions, workers, timeout_s, progress)
        local = list(problem_records(bench, completions, grades, episodes))
        if world_size > 1:
            gathered: list = [None] * world_size
            torch.distributed.all_gather_object(gathered, local)
            local = [r for part in gathered for r in part]
        all_grades = [[Grade(c, e, r) for c, e, r in zip(rec["correct"], rec["extracted"],
                                                         rec["reasons"])]
                      for rec in local]
        metrics.update(summarise(bench.name, all_grades,
                                 tags=[tuple(rec["tags"]) for rec in local]))
        metrics.update(episode_summary(bench.name, local))
        if records is not None:
            records[bench.name] = local
    return metrics
