"""The agentic teacher, made a good teacher off its own path (issue 31, part 2), DAgger-style.

    python -m tip.testbed.agent.dagger   # the shipped pair's teacher learns the student's states
                                         # (a few minutes on 2 cores); the student is kept

The first agentic teacher (``tip.testbed.agent.build``) saw only its own correct episodes. From the
student's states (a head-sum before the call, a call of the head-sum's difference, an answer after
one call) it wrote broken JSON, and all-token OPD taught the student that (docs/running.md,
"Multi-turn tool use"). Here the teacher is trained further on a mix of its own episodes and the
student's states, as DAgger trains a learner on the states its rollouts visit, labelled by an
expert:

- the states: the untrained student's sampled episodes (temperature 1, as OPD samples them) on
  training problems, each turn cut at a random token where the turn is still of the task's form
  (``viable``: a prefix of some well-formed turn);
- the expert's label (``expert_rest``): the rest of that turn as the task's expert would write it
  from there. It writes what the teacher would have written when the student is still on that path;
  otherwise it finishes a head-sum and then makes the correct call, finishes the student's call
  with an expression the context explains (never the subtraction's operands swapped) or closes it,
  or closes its answer. The correct call is the addition until the episode holds the right sum (a
  tool result, or a correct head-sum), then the subtraction; after that, the answer. Only the rest
  and its end-of-turn token are learned; the student's tokens are context.

  A first version re-called the addition after a correct head-sum and finished swapped
  subtractions too; from its labels the student's 50/50 operand order got no preference, and
  all-token OPD did not improve on the untrained student (docs/running.md).

Criteria (``criteria``): from held-out states drawn the same way, the teacher's greedy continuation
is a well-formed turn >= 99% of the time (the first teacher: 26%); its own held-out greedy
episodes stay >= 99% correct; and all-token OPD improves on the untrained student (training runs:
docs/running.md, "Multi-turn tool use").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import regex
import torch

from tip.data import Example, prompt_token_ids
from tip.tasks import call_text

NUMBER = r"-?[0-9]+"
HEAD = r"[0-9]+\+[0-9]+=" + NUMBER + r"[;,]"
CALL = (r'<tool_call>\{"name":"calc","arguments":\{"expr":"' + NUMBER
        + r'(?:[+-][0-9]+)*"\}\}</tool_call>')
BOX = r"\\boxed\{" + NUMBER + r"\}"
TURN = regex.compile(rf"(?:{HEAD})?{CALL}|{BOX}")
"""A well-formed assistant turn of the agentic task: an optional head-sum, then one calc call; or a
boxed integer."""
HEAD_ONLY = regex.compile(HEAD)
# the characters and tokens a completion may add, most structural first: greedy completion takes
# the first that keeps the turn viable, so it closes what is open before it adds digits
COMPLETION_ALPHABET = (['"', "}", "</tool_call>", ";", "=", "+", ":", ",", "{", "<tool_call>",
                        "\\", "-"] + list("abcdefghijklmnopqrstuvwxyz") + list("1234567890"))


def viable(text: str) -> bool:
    """Whether ``text`` is a prefix of some well-formed turn."""
    return TURN.fullmatch(text, partial=True) is not None


def well_formed_turn(text: str) -> bool:
    return TURN.fullmatch(text) is not None


def expert_turn(a: int, b: int, c: int, results: list[str]) -> str:
    """The turn the expert writes next, given the tool results (and a correct head-sum) the episode
    holds so far."""
    if str(a + b) not in results:
        return call_text(f"{a}+{b}")
    if str(a + b - c) not in results:
        return call_text(f"{a + b}-{c}")
    return f"\\boxed{{{a + b - c}}}"


def complete(text: str, limit: int = 80) -> str:
    """The completion that greedy, most-structural-first choices give a viable ``text``: the
    shortest way to close what is open, not a content choice."""
    out = ""
    while not well_formed_turn(text + out):
        piece = next((p for p in COMPLETION_ALPHABET if viable(text + out + p)), None)
        if piece is None or len(out) > limit:
            raise ValueError(f"no completion of {text!r}")
        out += piece
    return out


def expert_rest(prefix: str, a: int, b: int, c: int, results: list[str]) -> str:
    """The rest of the turn from the viable ``prefix`` (module docstring)."""
    head = HEAD_ONLY.match(prefix)
    head_sum = regex.match(r"[0-9]+\+[0-9]+=(-?[0-9]+)", head.group()).group(1) if head else None
    # a correct head-sum is as good as the tool's: the expert goes on to the subtraction
    target = expert_turn(a, b, c, results + [head_sum] * (head_sum == str(a + b)))
    call = target if target.startswith("<tool_call>") else call_text(f"{a + b}-{c}")
    after_head = prefix[head.end():] if head else prefix
    if head:
        target = call  # a head-sum is followed by a call
    for wanted in (target, call):
        if wanted.startswith(after_head):
            return wanted[len(after_head):]
    answer = str(a + b - c)
    if not head and regex.fullmatch(BOX, prefix, partial=True):
        if len(prefix) < len("\\boxed{"):
            return "\\boxed{"[len(prefix):] + answer + "}"
        digits = prefix[len("\\boxed{"):]
        return answer[len(digits):] + "}" if answer.startswith(digits) else complete(prefix)
    if "<tool_call>" in prefix:
        return finish_call(prefix, after_head, head, a, b, c, results)
    return complete_head(prefix, a, b) + call


def finish_call(prefix: str, after_head: str, head, a: int, b: int, c: int,
                results: list[str]) -> str:
    """The rest of a call whose expression was begun: the first expression that the context makes
    sense of (the expert's, the problem's sum, or the difference of a sum the episode wrote, in
    the task's order) continuing what was written, closed; else the shortest closing."""
    written = regex.search(r'"expr":"([^"]*)$', after_head)
    if written is not None:
        sums = [regex.match(r"[0-9]+\+[0-9]+=(-?[0-9]+)", head.group()).group(1)] if head else []
        sums += list(results)
        candidates = [f"{a}+{b}", f"{b}+{a}", f"{a + b}-{c}"]
        candidates += [f"{s}-{c}" for s in sums]
        for expr in candidates:
            if expr.startswith(written.group(1)):
                return expr[len(written.group(1)):] + '"}}</tool_call>'
    return complete(prefix)


def complete_head(prefix: str, a: int, b: int) -> str:
    """The rest of a head-sum begun in ``prefix``: the problem's operands where the prefix can still
    become them, then the correct sum of the operands as written (``4`` -> ``7+38=85;``, ``47+3``
    -> ``8=85;``, ``47+5`` -> ``=52;``, ``47+38=9`` -> ``;``)."""
    m = regex.fullmatch(r"([0-9]+)(?:(\+)([0-9]*)(?:(=)(-?[0-9]*))?)?", prefix)
    x, plus, y, equals, written = m.groups()
    if not plus:
        x_full = str(a) if str(a).startswith(x) else x
        return x_full[len(x):] + f"+{b}={int(x_full) + b};"
    if not equals:
        y_full = str(b) if str(b).startswith(y) else (y or "0")
        return y_full[len(y):] + "=" + str(int(x) + int(y_full)) + ";"
    total = str(int(x) + int(y))
    if total.startswith(written):
        return total[len(written):] + ";"
    return ("0" if written in ("", "-") else "") + ";"


@dataclass(frozen=True)
class State:
    context: list[int]  # prompt, earlier turns and results, and the turn's first tokens
    prefix: str  # the turn's first tokens, as text
    operands: tuple[int, int, int]
    results: tuple[str, ...]  # the tool results the episode held before this turn


def student_states(student, tok, problems: list[tuple[int, int, int]], seed: int) -> list[State]:
    """Each student turn of one sampled episode per problem, cut at a uniformly drawn token, moved
    back to the longest viable prefix (module docstring)."""
    from tip.env import CalculatorEnv, EpisodeLimits, TurnFormat, run_episodes
    from tip.rollout import hf_turns

    fmt, limits = TurnFormat(tok), EpisodeLimits()
    texts = [f"{a}+{b}-{c}=" for a, b, c in problems]
    prompts = prompt_token_ids(tok, texts, "{problem}")
    examples = [Example(f"state-{i}", t, str(a + b - c), "", ())
                for i, ((a, b, c), t) in enumerate(zip(problems, texts))]
    torch.manual_seed(seed)
    with hf_turns(student, tok, temperature=1.0) as generate_turn:
        episodes = run_episodes(generate_turn, CalculatorEnv(), fmt, limits, examples, prompts, 1,
                                [seed * 100_003 + i for i in range(len(problems))])
    rng = random.Random(f"states-{seed}")
    stops = set(fmt.stop_ids)
    states = []
    for ep in episodes:
        results: list[str] = []
        start = 0
        while start < len(ep.tokens):
            end = start
            while end < len(ep.tokens) and ep.mask[end] and ep.tokens[end] not in stops:
                end += 1
            if end > start:
                cut = rng.randrange(start, end + 1)
                while cut > start and not viable(tok.decode(ep.tokens[start:cut],
                                                            skip_special_tokens=False)):
                    cut -= 1
                states.append(State(ep.prompt + ep.tokens[:cut],
                                    tok.decode(ep.tokens[start:cut], skip_special_tokens=False),
                                    problems[ep.example_index], tuple(results)))
            start = end + 1
            env_start = start
            while start < len(ep.tokens) and not ep.mask[start]:
                start += 1
            env_text = tok.decode(ep.tokens[env_start:start], skip_special_tokens=False)
            results += regex.findall(r"<tool_response>(.*?)</tool_response>", env_text)
    return states


def state_rows(tok, fmt, states: list[State]) -> list[tuple[list[int], list[int], list[int]]]:
    """(ids, labels, alt) rows: the state as context, the expert's rest of the turn and the
    end-of-turn token learned."""
    rows = []
    for s in states:
        rest = tok(expert_rest(s.prefix, *s.operands, list(s.results)),
                   add_special_tokens=False)["input_ids"] + [fmt.stop_ids[0]]
        rows.append((s.context + rest, [-100] * len(s.context) + rest,
                     [-100] * (len(s.context) + len(rest))))
    return rows


@torch.no_grad()
def off_path(teacher, student, tok, n: int = 256, seed: int = 3) -> dict[str, float]:
    """The teacher's greedy continuation from held-out student states: the share that finish a
    well-formed turn (and the number of states)."""
    from tip.env import EpisodeLimits, TurnFormat
    from tip.rollout import hf_turns
    from tip.tasks import sample_operands

    fmt = TurnFormat(tok)
    states = student_states(student, tok, sample_operands(n, seed, "test"), seed)
    with hf_turns(teacher, tok, temperature=0.0) as generate_turn:
        outs = generate_turn([s.context for s in states], [0] * len(states),
                             EpisodeLimits().max_turn_tokens)
    stops = set(fmt.stop_ids)
    ok = [bool(out) and out[-1] in stops
          and well_formed_turn(s.prefix + tok.decode(out[:-1], skip_special_tokens=False))
          for s, out in zip(states, outs)]
    return {"well_formed": sum(ok) / max(1, len(ok)), "states": len(ok)}


@dataclass
class DaggerSpec:
    steps: int = 300  # per round
    rounds: int = 2  # each round: fresh student states, then steps of training
    lr: float = 5e-4
    batch_size: int = 64
    state_share: float = 0.5  # share of the rows from the student's states (the rest: own episodes)


def train_off_path(teacher, student, tok, spec: DaggerSpec, seed: int) -> dict:
    """The teacher trained on its own correct episodes and the student's states, mixed, in
    ``spec.rounds`` rounds of fresh states."""
    from tip.env import TurnFormat
    from tip.tasks import sample_operands
    from tip.testbed.agent.build import AgentSpec, fit_rows, teacher_rows

    fmt = TurnFormat(tok)
    total = spec.steps * spec.batch_size
    from_states = round(total * spec.state_share)
    agent_spec = AgentSpec(batch_size=spec.batch_size)
    done = {"state_rows": 0, "sampling_seconds": 0.0, "train_seconds": 0.0}
    for r in range(spec.rounds):
        round_seed = seed + 1000 * r
        t0 = time.time()
        problems = sample_operands(from_states, round_seed + 11, "train")
        states: list[State] = []
        for i in range(0, len(problems), 512):  # about two states per episode
            states += student_states(student, tok, problems[i:i + 512], round_seed + i)
            if len(states) >= from_states:
                break
        rows = state_rows(tok, fmt, states[:from_states])
        t1 = time.time()
        rows += teacher_rows(tok, fmt, total - len(rows), round_seed + 13)
        random.Random(f"dagger-{round_seed}").shuffle(rows)
        fit_rows(teacher, tok, rows, spec.steps, spec.batch_size, spec.lr, agent_spec,
                 drilled=False)
        done["state_rows"] += len(states[:from_states])
        done["sampling_seconds"] += round(t1 - t0, 1)
        done["train_seconds"] += round(time.time() - t1, 1)
    return done


def criteria(teacher, student, tok) -> dict:
    from tip.testbed.agent.build import episode_accuracy

    return {"off_path": off_path(teacher, student, tok),
            "teacher_heldout_greedy": episode_accuracy(teacher, tok)}


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tip.testbed.agent.build import ASSET_DIR
    from tip.testbed.tiny import write_pair

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", type=Path, default=ASSET_DIR, help="the agent pair to rewrite")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-scale", type=float, default=1.0)
    args = ap.parse_args(argv)
    if not (args.pair / "build.json").is_file():
        raise SystemExit(f"--pair {args.pair}: no agent pair there (no build.json); build one with "
                         "python -m tip.testbed.agent.build --out <dir>")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tok = AutoTokenizer.from_pretrained(args.pair / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(args.pair / "teacher")
    student = AutoModelForCausalLM.from_pretrained(args.pair / "student").eval()
    report = json.loads((args.pair / "build.json").read_text())
    spec = DaggerSpec()
    spec.steps = max(1, math.ceil(spec.steps * args.steps_scale))
    before = criteria(teacher.eval(), student, tok)
    print(f"before: {before}", flush=True)
    done = train_off_path(teacher, student, tok, spec, args.seed)
    after = criteria(teacher.eval(), student, tok)
    print(f"after: {after}", flush=True)
    report["teacher_off_path"] = {"spec": asdict(spec), **done, "before": before, "after": after}
    write_pair(args.pair, {"teacher": teacher, "student": student}, tok, report)


if __name__ == "__main__":
    main()
