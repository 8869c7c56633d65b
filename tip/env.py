"""Multi-turn tool-use rollouts: the student writes assistant turns, an environment answers its tool
calls.

An episode is one token sequence, ``prompt + turn_1 + env_1 + turn_2 + env_2 + ...``: the student's
turns are sampled (``mask`` True: signals, selection, quadrants and loss cover them) and the
environment's tokens (tool results and the chat template's turn markers, ``mask`` False) are
appended between them. The teacher scores the same sequence, so every student token keeps its
context on both sides.

Tool calls follow the Hermes / Qwen convention that chat templates understand: ``<tool_call>{"name":
..., "arguments": {...}}</tool_call>`` in the assistant's text (several per turn allowed); results
go back as ``tool`` messages through the tokenizer's chat template (``TurnFormat``). A malformed
call is answered with an error message as its result; an episode ends when a turn has no tool call
(the answer), or at ``max_turns`` or ``max_episode_tokens``.

Adding an environment is one class with ``respond`` and ``score``, registered in ``ENVIRONMENTS``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tip.grading import grade_one
from tip.rollout import RolloutBatch, pack, seed_of

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
UNCLOSED_CALL = "<tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One parsed call, or ``error`` (what the tool result says) when the call could not be read."""

    name: str | None
    arguments: dict
    error: str | None = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The tool calls of an assistant turn, in order. A call whose JSON does not parse, is not an
    object, lacks a string ``name`` or has non-object ``arguments`` comes back with ``error`` set;
    an opening tag never closed is one erroneous call. No call at all: an empty list (the turn is an
    answer)."""
    calls = []
    for body in TOOL_CALL.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as err:
            # lower case: what the tool answers is read by small character-level students too
            calls.append(ToolCall(None, {},
                                  f"malformed tool call: not json ({err.msg.lower()} at column "
                                  f"{err.colno})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall(None, {},
                                  "malformed tool call: expected {\"name\": <string>, "
                                  "\"arguments\": {...}}"))
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], {},
                                  "malformed tool call: arguments must be a JSON object"))
            continue
        calls.append(ToolCall(obj["name"], args))
    if text.count(UNCLOSED_CALL) > len(calls):
        calls.append(ToolCall(None, {}, "malformed tool call: <tool_call> was never closed with "
                                        "</tool_call>"))
    return calls


class Environment(Protocol):
    """What a rollout needs from a task: tool results for a turn's calls, and the episode's score at
    its end."""

    tools: tuple[str, ...]

    def call(self, example, name: str, arguments: dict) -> str:
        """The result text of one well-formed call (an error message for a bad tool or bad
        arguments)."""

    def score(self, example, student_text: str) -> float:
        """The finished episode's score in [0, 1] from the student's own text (every turn, no tool
        results)."""


class CalculatorEnv:
    """``calc(expr)``: integer arithmetic with + and - (e.g. ``"47+38"``); the score is the exact
    match of the last ``\\boxed{}`` with the example's answer (``tip.grading``, grader
    ``exact``)."""

    tools = ("calc",)
    EXPRESSION = re.compile(r"\s*-?\d{1,12}(\s*[-+]\s*\d{1,12}){0,8}\s*")

    def call(self, example, name: str, arguments: dict) -> str:
        if name != "calc":
            return f"error: unknown tool; known: {', '.join(self.tools)}"
        expr = arguments.get("expr")
        if not isinstance(expr, str) or not self.EXPRESSION.fullmatch(expr):
            return "error: calc needs expr, a string of integers joined by + and -"
        total, sign = 0, 1
        for token in re.findall(r"\d+|[-+]", expr.replace(" ", "")):
            if token in "+-":
                sign = 1 if token == "+" else -1
            else:
                total, sign = total + sign * int(token), 1
        return str(total)

    def score(self, example, student_text: str) -> float:
        return float(grade_one(student_text, example.answer, "exact").correct)


ENVIRONMENTS: dict[str, Callable[[], Environment]] = {"calc": CalculatorEnv}
"""``env.name`` -> the environment (``none``: single-turn rollouts, no environment)."""


def get_environment(name: str) -> Environment:
    try:
        return ENVIRONMENTS[name]()
    except KeyError:
        raise ValueError(f"unknown env {name!r}; known: none, "
                         f"{', '.join(sorted(ENVIRONMENTS))}") from None


@dataclass(frozen=True)
class EpisodeLimits:
    """``env.*``: at most ``max_turns`` assistant turns of at most ``max_turn_tokens`` tokens each,
    a tool result cut to ``max_tool_response_tokens``, and at most ``max_episode_tokens`` tokens
    after the prompt in all. The defaults are the embedded agentic task's
    (conf/env/embedded_agent.yaml sets the same)."""

    max_turns: int = 4
    max_turn_tokens: int = 64
    max_tool_response_tokens: int = 16
    max_episode_tokens: int = 224

    @classmethod
    def of(cls, env_cfg: Mapping[str, Any]) -> EpisodeLimits:
        """From an ``env`` config node; a limit it does not set keeps its default here."""
        return cls(**{f: int(env_cfg[f]) for f in cls.__dataclass_fields__
                      if env_cfg.get(f) is not None})


def engine_context_tokens(env_cfg: Mapping[str, Any] | None, single_turn_tokens: int) -> int:
    """The most tokens a generation engine must hold after a prompt: ``rollout_tokens``, and with an
    environment one more turn (a turn may start at the episode's budget)."""
    if env_cfg is None or env_cfg.get("name", "none") == "none":
        return int(single_turn_tokens)
    return rollout_tokens(env_cfg, single_turn_tokens) + EpisodeLimits.of(env_cfg).max_turn_tokens


def rollout_tokens(env_cfg: Mapping[str, Any], single_turn_tokens: int) -> int:
    """The most tokens a rollout holds after its prompt: ``single_turn_tokens``
    (rollout.max_new_tokens or eval.max_new_tokens) without an environment, else the episode's
    budget (the student's and the environment's tokens, all of which the models read)."""
    if env_cfg is None or env_cfg.get("name", "none") == "none":
        return int(single_turn_tokens)
    return EpisodeLimits.of(env_cfg).max_episode_tokens


class TurnFormat:
    """The text the chat template puts between two assistant turns: the end of the assistant's
    message, the tool messages holding the results, and the next assistant header. Taken from the
    tokenizer's own template by rendering a conversation around a marker, so any Hermes/Qwen-style
    template gives its own layout; only the student's tokens are never re-tokenized."""

    MARK = "\x00TIP_TURN\x00"

    def __init__(self, tokenizer, chat_template_kwargs: Mapping[str, Any] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("multi-turn rollouts need a tokenizer with a chat template (tool "
                             "messages go through it); this pair's tokenizer has none")
        self.tokenizer, self.kwargs = tokenizer, dict(chat_template_kwargs or {})
        has_im_end = "<|im_end|>" in tokenizer.get_vocab()
        im_end = [tokenizer.convert_tokens_to_ids("<|im_end|>")] if has_im_end else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        # an assistant turn ends at the first of these
        self.stop_ids = im_end + [i for i in eos if i not in im_end]
        self.eos_text = tokenizer.decode(self.stop_ids[:1]) if self.stop_ids else ""
        for piece in ("<tool_call>", "</tool_call>"):
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
                raise ValueError(f"this pair's tokenizer cannot write {piece!r} (it becomes the "
                                 "unknown token), so its student cannot call tools; use a pair "
                                 "whose tokenizer has the tool-call tokens (e.g. "
                                 "pair=embedded_agent, or a Qwen/Hermes-style chat model)")

    def between_turns(self, results: Sequence[str], ended_with_stop: bool) -> str:
        """Text after an assistant turn with tool ``results``, up to the next assistant header. When
        the turn ended with the end-of-turn token the student wrote it, so it is left out here."""
        messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": self.MARK},
                    *({"role": "tool", "content": r} for r in results)]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True, **self.kwargs)
        after = text[text.index(self.MARK) + len(self.MARK):]
        if ended_with_stop and self.eos_text and after.startswith(self.eos_text):
            after = after[len(self.eos_text):]
        return after


@dataclass
class Episode:
    """One rollout: the trajectory after the prompt, which of its tokens are the student's, and what
    happened."""

    example_index: int
    prompt: list[int]
    seed: int
    tokens: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0  # well-formed calls
    malformed_calls: int = 0
    end: str = ""  # answered | max_turns | max_episode_tokens
    score: float = 0.0
    # the engine's log-probability of each token of ``tokens`` (0 at the environment's); None
    # where the turn generator gives none (transformers' generate)
    logps: list[float] | None = field(default_factory=list)

    def student_ids(self) -> list[int]:
        return [t for t, m in zip(self.tokens, self.mask) if m]


TurnGenerator = Callable[[list[list[int]], list[int], int], list[list[int]]]
"""(contexts, one seed per context, max_new_tokens) -> each context's sampled turn, cut after its
first stop token; a ``SampledTurn`` where the engine also gives each token's log-probability."""


class SampledTurn(list):
    """A turn's token ids with the engine's log-probability of each (``logps``)."""

    def __init__(self, tokens: list[int], logps: list[float]):
        super().__init__(tokens)
        self.logps = list(logps)


def run_episodes(generate_turn: TurnGenerator, env: Environment, fmt: TurnFormat,
                 limits: EpisodeLimits, examples: Sequence, prompt_ids: Sequence[list[int]], n: int,
                 seeds: Sequence[int], lockstep: bool = False) -> list[Episode]:
    """``n`` episodes per prompt, their turns batched across episodes: each round samples one turn
    of every running episode, then the environment answers. ``seeds``: one per prompt (episode j of
    a prompt uses seed + j, each turn its own stream). ``lockstep``: ``max_turns`` rounds over every
    episode, finished ones included (their turns dropped): under ZeRO-3 generation is collective,
    and every rank must make the same calls with the same number of sequences whichever of its
    episodes have ended."""
    tok = fmt.tokenizer
    stops = set(fmt.stop_ids)
    episodes = [Episode(i, list(p), s + j) for i, (p, s) in enumerate(zip(prompt_ids, seeds))
                for j in range(n)]
    running = list(episodes)
    for turn in range(limits.max_turns):
        if not running and not lockstep:
            break
        batch = episodes if lockstep else running
        outs = generate_turn([e.prompt + e.tokens for e in batch],
                             [seed_of(e.seed, turn) for e in batch], limits.max_turn_tokens)
        by_episode = {id(e): out for e, out in zip(batch, outs)}
        still = []
        for ep in running:
            sampled = by_episode[id(ep)]
            out = list(sampled)[:limits.max_episode_tokens - len(ep.tokens)]
            ep.tokens += out
            ep.mask += [True] * len(out)
            logps = getattr(sampled, "logps", None)
            ep.logps = None if logps is None or ep.logps is None else ep.logps + logps[:len(out)]
            ep.turns += 1
            calls = parse_tool_calls(tok.decode(out, skip_special_tokens=False))
            if not calls:
                ep.end = "answered"
                continue
            ep.tool_calls += sum(c.error is None for c in calls)
            ep.malformed_calls += sum(c.error is not None for c in calls)
            if len(ep.tokens) >= limits.max_episode_tokens:
                ep.end = "max_episode_tokens"
                continue
            if turn + 1 == limits.max_turns:
                ep.end = "max_turns"
                continue
            results = [_cut(tok,
                            f"error: {c.error}" if c.error
                            else env.call(examples[ep.example_index], c.name,
                                                                             c.arguments),
                            limits.max_tool_response_tokens) for c in calls]
            ended = bool(out) and out[-1] in stops
            env_ids = tok(fmt.between_turns(results, ended), add_special_tokens=False)["input_ids"]
            if len(ep.tokens) + len(env_ids) >= limits.max_episode_tokens:
                ep.end = "max_episode_tokens"
                continue
            ep.tokens += env_ids
            ep.mask += [False] * len(env_ids)
            if ep.logps is not None:
                ep.logps += [0.0] * len(env_ids)
            still.append(ep)
        running = still
    for ep in episodes:
        ep.score = env.score(examples[ep.example_index],
                             tok.decode(ep.student_ids(), skip_special_tokens=True))
    return episodes


def _cut(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens],
                                                                skip_special_tokens=True)


EPISODE_SUMS = ("episodes", "turns", "tool_calls", "malformed_calls", "with_tool_call", "score",
                "student_tokens", "env_tokens", "hit_turn_limit")
"""What a step's episodes add up to (summed over ranks, then logged as shares and means:
``episode_metrics``)."""


def episode_sums(episodes: Sequence[Episode]) -> list[float]:
    return [len(episodes), sum(e.turns for e in episodes), sum(e.tool_calls for e in episodes),
            sum(e.malformed_calls for e in episodes), sum(e.tool_calls > 0 for e in episodes),
            sum(e.score for e in episodes), sum(sum(e.mask) for e in episodes),
            sum(len(e.mask) - sum(e.mask) for e in episodes),
            sum(e.end == "max_turns" for e in episodes)]


def episode_metrics(sums: Sequence[float], prefix: str = "episode/") -> dict[str, float]:
    """Means per episode from ``EPISODE_SUMS`` (over every rank's episodes)."""
    s = dict(zip(EPISODE_SUMS, sums))
    n = max(s["episodes"], 1.0)
    return {f"{prefix}score": s["score"] / n, f"{prefix}turns": s["turns"] / n,
            f"{prefix}tool_calls": s["tool_calls"] / n,
            f"{prefix}with_tool_call": s["with_tool_call"] / n,
            f"{prefix}malformed_calls": s["malformed_calls"] / n,
            f"{prefix}hit_turn_limit": s["hit_turn_limit"] / n,
            f"{prefix}env_token_frac": s["env_tokens"] / max(s["env_tokens"] + s["student_tokens"],
                                                             1.0)}


class MultiTurnRollout:
    """A rollout backend (``HFRollout`` or ``VllmRollout``) run as multi-turn episodes in ``env``:
    the same ``generate`` / ``sync`` / ``close`` as single-turn rollouts, so the training loop does
    not tell them apart. The batch's ``response_mask`` marks the student's tokens only, and ``info``
    holds ``episode_sums``."""

    def __init__(self, backend, env: Environment, fmt: TurnFormat, limits: EpisodeLimits, n: int,
                 lockstep: bool = False):
        self.backend, self.env, self.fmt, self.limits = backend, env, fmt, limits
        self.n, self.lockstep = n, lockstep

    def generate(self, prompt_ids: list[list[int]], step_seed: int, prompt_seeds: list[int],
                 examples=None, n: int | None = None) -> RolloutBatch:
        if examples is None or len(examples) != len(prompt_ids):
            raise ValueError("multi-turn rollouts need the examples their prompts come from (one "
                             "per prompt)")
        torch.manual_seed(step_seed)
        with self.backend.turns() as generate_turn:
            episodes = run_episodes(generate_turn, self.env, self.fmt, self.limits, examples,
                                    prompt_ids, n or self.n, prompt_seeds, self.lockstep)
        return episode_batch(episodes, self.fmt.tokenizer.pad_token_id)

    def sync(self):
        return self.backend.sync()

    def eval_sampler(self):
        return self.backend.eval_sampler()

    def close(self) -> None:
        self.backend.close()


def episode_batch(episodes: Sequence[Episode], pad_id: int) -> RolloutBatch:
    """The episodes as a rollout batch; with the engine's log-probabilities of the student's tokens
    where every episode has them (``rollout/logp_gap`` then covers multi-turn rollouts too)."""
    logps = None if any(e.logps is None for e in episodes) else [e.logps for e in episodes]
    return pack([e.prompt for e in episodes], [e.tokens for e in episodes],
                [e.example_index for e in episodes], pad_id, [e.mask for e in episodes],
                [float(x) for x in episode_sums(episodes)], sampler_logps=logps)
