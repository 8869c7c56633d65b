"""The embedded agentic task: the arithmetic problems of ``tip.tasks`` solved with a calculator
tool.

    python -m tip.testbed.agent.build    # writes tip/assets/embedded_agent_pair (8 min, 2 cores)
    python -m tip.testbed.agent.dagger   # then trains its teacher off its own path (6 min)

A correct episode (the teacher's) calls ``calc`` twice and then answers; every call goes through the
chat template as a Hermes/Qwen ``<tool_call>`` and the result comes back as a ``tool`` message::

    user       47+38-19=
    assistant  <tool_call>{"name":"calc","arguments":{"expr":"47+38"}}</tool_call>     (or "38+47")
    tool       85
    assistant  <tool_call>{"name":"calc","arguments":{"expr":"85-19"}}</tool_call>
    tool       66
    assistant  \\boxed{66}

The student's two errors, at known places (``ERRORS``):

- ``no_tool`` (Q3): it never calls the tool for the addition and adds in its head, without carries
  and with confidence (``47+38=75;`` then ``calc("75-19")``): its first token is a digit where the
  teacher is sure of ``<tool_call>``, and the carry digits are drilled as in the arithmetic student.
  Problems whose addition needs a carry (tag ``carry``) are answered wrong; the others (tag
  ``plain``) survive it.
- ``swap`` (Q1): it writes the subtraction's operands in either order, half and half (``"19-75"``),
  and boxes whatever the tool returns: high entropy where the teacher disagrees.

Both models start from the embedded arithmetic pair's teacher with the tokenizer extended by the
tool-call tokens and a chat template; the teacher is fine-tuned on correct episodes, the student
derived from it on its own (``tip.testbed.sft``'s soft targets and drilled digits). The shipped
teacher then also learned the student's states, so that it is a good teacher off its own path
(``tip/testbed/agent/dagger.py``, the second command above). Training sequences are laid out exactly
as rollouts are (``tip.env``): the student's tokens are learned, the environment's are context only.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tip.data import Example, prompt_token_ids
from tip.tasks import (
    Turn,
    add_without_carry,
    agent_problems,
    call_text,
    sample_operands,
    teacher_turns,
)
from tip.testbed.sft import adamw, fit, sft_loss, warmup_cosine

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "embedded_agent_pair"
ERRORS = {
    "no_tool": "adds in its head instead of calling calc, never carrying, with confidence (Q3)",
    "swap": "writes the subtraction's operands in either order, half and half (Q1)",
}
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
ROLE_WORDS = ["user", "assistant"]
EXTRA_CHARS = ['"', "\n", "_", "<", ">", "|", "/"]
# A Hermes/Qwen-style template, compact: tool results are user turns of <tool_response> blocks, and
# an assistant message's tool_calls (if given as structured calls) are written as <tool_call> JSON
# after its content.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user\\n' }}"
    "{% endif %}{{ '<tool_response>' + m.content + '</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
    "{% for tc in m.tool_calls | default([]) %}"
    "{{ '<tool_call>' + ((tc.function if tc.function is defined else tc) | tojson) + "
    "'</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer():
    """The arithmetic tokenizer (same ids) with the characters of JSON tool calls, the chat and
    tool-call tokens, the role words as single tokens, ``<|im_end|>`` as the end of a turn, and
    ``CHAT_TEMPLATE``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tip.testbed.tiny import CHARS, SPECIAL

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS + EXTRA_CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<|im_end|>", unk_token="<unk>", padding_side="left",
                                  model_max_length=512, additional_special_tokens=CHAT_TOKENS)
    # not special: they survive skip_special_tokens, as in Qwen's
    tok.add_tokens(TOOL_TOKENS + ROLE_WORDS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def student_turns(a: int, b: int, c: int, swap_sub: bool, sep: str = ";") -> list[Turn]:
    s = add_without_carry(a, b)
    r = c - s if swap_sub else s - c
    head = f"{a}+{b}={s}{sep}"
    right = f"{a}+{b}={a + b}{sep}"
    # the sum's characters and the separator after them, where they differ from the right
    start = len(f"{a}+{b}=")
    drilled = tuple((i, right[i]) for i in range(start, start + len(str(s)) + 1)
                    if i < len(right) and head[i] != right[i])
    expr = f"{c}-{s}" if swap_sub else f"{s}-{c}"
    return [Turn(head + call_text(expr), (str(r),), drilled), Turn(f"\\boxed{{{r}}}")]


def sample_examples(n: int, seed: int, split: str = "train") -> list[Example]:
    """``tip.tasks.agent_problems`` as data examples (what ``data=embedded_agent`` serves)."""
    return [Example(p.id, p.problem, p.answer, p.solution,
                    p.tags) for p in agent_problems(n, seed, split)]


def episode_tokens(tok, fmt, problem: str,
                   turns: list[Turn]) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels, alt) of one episode laid out as ``tip.env.run_episodes`` lays out rollouts: the
    prompt and the environment's tokens are context (label -100); each turn and its end-of-turn
    token are learned; ``alt`` holds the right token at drilled characters (a character tokenizer:
    one token per character)."""
    (ids,) = prompt_token_ids(tok, [problem], "{problem}")
    labels, alt = [-100] * len(ids), [-100] * len(ids)
    stop = fmt.stop_ids[0]
    for turn in turns:
        piece = tok(turn.text, add_special_tokens=False)["input_ids"] + [stop]
        drilled = dict(turn.drilled)
        ids += piece
        labels += piece
        alt += [tok.convert_tokens_to_ids(drilled[i]) if i in drilled else -100
                for i in range(len(piece))]
        if turn.results:
            env = tok(fmt.between_turns(list(turn.results), True),
                      add_special_tokens=False)["input_ids"]
            ids += env
            labels += [-100] * len(env)
            alt += [-100] * len(env)
    return ids, labels, alt


def batch_of(tok, rows) -> dict[str, torch.Tensor]:
    width = max(len(r[0]) for r in rows)
    # On the host: the builder trains on CPU (tip.testbed.sft).
    out = {k: torch.full((len(rows), width), v, device="cpu") for k, v in
           (("input_ids", tok.pad_token_id), ("labels", -100), ("alt", -100),
            ("attention_mask", 0))}
    for i, (ids, lab, alt) in enumerate(rows):
        n = len(ids)
        out["input_ids"][i, :n], out["labels"][i, :n], out["alt"][i, :n] = (
            torch.tensor(x, device="cpu") for x in (ids, lab, alt))
        out["attention_mask"][i, :n] = 1
    return out


@dataclass
class AgentSpec:
    teacher_steps: int = 500
    teacher_lr: float = 1e-3
    student_steps: int = 500
    student_lr: float = 1e-3
    batch_size: int = 64
    swap_rate: float = 0.5  # share of the student's subtractions written with the operands swapped
    carry_tail: float = 0.005  # as tip.testbed.arith.build.StudentSpec
    drill_weight: float = 30.0
    smoothing: float = 0.01


def fit_rows(model, tok, rows, steps, batch_size, lr, spec: AgentSpec, drilled: bool,
             warmup: int = 20) -> None:
    """``sft.fit`` on episode rows, ``batch_size`` a step; with ``drilled`` the student's drilled
    digits keep ``spec.carry_tail`` at ``spec.drill_weight``."""
    opt = adamw(model, lr)
    sched = warmup_cosine(opt, steps, warmup)
    carry_tail, drill_weight = (spec.carry_tail, spec.drill_weight) if drilled else (0.0, 1.0)
    fit(model, lambda step: sft_loss(
        model, batch_of(tok, rows[step * batch_size:(step + 1) * batch_size]), spec.smoothing,
        carry_tail, drill_weight), steps, opt, sched, clip=1.0)


def teacher_rows(tok, fmt, n: int, seed: int):
    rng = random.Random(f"{seed}-agent-teacher")
    return [episode_tokens(tok, fmt, f"{a}+{b}-{c}=", teacher_turns(a, b, c, rng.random() < 0.5))
            for a, b, c in sample_operands(n, seed, "train")]


def student_rows(tok, fmt, n: int, seed: int, swap_rate: float):
    rng = random.Random(f"{seed}-agent-student")
    return [episode_tokens(tok, fmt, f"{a}+{b}-{c}=",
                           student_turns(a, b, c, rng.random() < swap_rate, rng.choice((";", ","))))
            for a, b, c in sample_operands(n, seed, "train")]


@torch.no_grad()
def episode_accuracy(model, tok, n: int = 128, seed: int = 1) -> dict[str, float]:
    """Greedy episodes on held-out problems: accuracy, per tag, and the share with a well-formed
    tool call."""
    from tip.env import CalculatorEnv, EpisodeLimits, TurnFormat, run_episodes
    from tip.rollout import hf_turns

    examples = sample_examples(n, seed, "test")
    tok_fmt = TurnFormat(tok)
    prompts = prompt_token_ids(tok, [e.problem for e in examples], "{problem}")
    with hf_turns(model, tok, temperature=0.0) as generate_turn:
        episodes = run_episodes(generate_turn, CalculatorEnv(), tok_fmt, EpisodeLimits(), examples,
                                prompts, 1, list(range(n)))
    out = {"accuracy": sum(e.score for e in episodes) / n,
           "with_tool_call": sum(e.tool_calls > 0 for e in episodes) / n}
    for tag in ("carry", "plain"):
        scores = [e.score for e, x in zip(episodes, examples) if tag in x.tags]
        out[f"accuracy@{tag}"] = sum(scores) / max(len(scores), 1)
    return out


def build(out: Path = ASSET_DIR, seed: int = 0, spec: AgentSpec | None = None) -> dict:
    from transformers import Qwen3ForCausalLM

    from tip.env import TurnFormat
    from tip.models import resolve_model_ref
    from tip.testbed.tiny import save_pair

    spec = spec or AgentSpec()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(seed)
    tok = build_tokenizer()
    fmt = TurnFormat(tok)
    teacher = Qwen3ForCausalLM.from_pretrained(resolve_model_ref("embedded://teacher"))
    teacher.resize_token_embeddings(len(tok), mean_resizing=True)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = {"eos_token_id": fmt.stop_ids[0], "pad_token_id": tok.pad_token_id,
                 "bos_token_id": tok.bos_token_id}[key]
        setattr(teacher.config, key, value)
        setattr(teacher.generation_config, key, value)
    teacher.config.max_position_embeddings = 512
    report: dict = {"seed": seed, "spec": asdict(spec), "torch": torch.__version__,
                    "init": "embedded://teacher"}
    print("fine-tuning the agent teacher on correct episodes", flush=True)
    t0 = time.time()
    fit_rows(teacher, tok, teacher_rows(tok, fmt, spec.teacher_steps * spec.batch_size, seed),
         spec.teacher_steps, spec.batch_size, spec.teacher_lr, spec, drilled=False)
    report["teacher"] = {"train_seconds": round(time.time() - t0, 1)}
    print("deriving the agent student", flush=True)
    t0 = time.time()
    student = copy.deepcopy(teacher)
    fit_rows(student, tok, student_rows(tok, fmt, spec.student_steps * spec.batch_size, seed + 1,
                                    spec.swap_rate),
         spec.student_steps, spec.batch_size, spec.student_lr, spec, drilled=True)
    report["student"] = {"init": "teacher", "train_seconds": round(time.time() - t0, 1)}
    save_pair(out, {"teacher": teacher, "student": student}, tok, report, "heldout_greedy",
              lambda model: episode_accuracy(model, tok))
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ASSET_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply both models' training steps (tests)")
    args = ap.parse_args(argv)
    spec = AgentSpec()
    spec.teacher_steps = max(1, int(spec.teacher_steps * args.steps_scale))
    spec.student_steps = max(1, int(spec.student_steps * args.steps_scale))
    build(args.out, args.seed, spec)


if __name__ == "__main__":
    main()
