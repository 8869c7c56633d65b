"""Multi-turn tool-use rollouts (tip/env.py) and the embedded agentic task (tip/testbed/agent/build.py): tool-call
parsing, the environment's turns, masks that keep every environment token out of signals, selection, quadrants and
loss, teacher/student alignment across turns, both rollout backends, evaluation, and training from the command
line."""

import json
import subprocess
import sys

import pytest
import torch

from tip.benchmarks import Sampling, evaluate, load_benchmarks
from tip.config import ConfigError
from tip.data import prompt_token_ids
from tip.env import (
    CalculatorEnv,
    EpisodeLimits,
    MultiTurnRollout,
    TurnFormat,
    episode_batch,
    parse_tool_calls,
    run_episodes,
)
from tip.models import load_model, load_tokenizer
from tip.rollout import HFRollout, aligned_targets, hf_turns, with_prompts
from tip.selection import select
from tip.signals import logits_rows, token_signals
from tip.taxonomy import quadrant_labels
from tip.testbed.agent.build import (
    call_text,
    episode_tokens,
    sample_examples,
    student_turns,
    teacher_turns,
)
from tip.token_records import read_token_records
from tip.train import train

from support import ROOT, compose_config, read_metrics

STUDENT, TEACHER = "embedded://agent_student", "embedded://agent_teacher"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(STUDENT)


@pytest.fixture(scope="module")
def fmt(tok):
    return TurnFormat(tok)


def prompt_ids(tok, examples):
    return prompt_token_ids(tok, [e.problem for e in examples], "{problem}")


def scripted(tok, fmt, turns_by_call):
    """A turn generator that writes given texts (round r gives every context the r-th text): the episode loop's
    input made by hand, as a test writes tensors by hand for a pure function."""
    stop = fmt.stop_ids[0]
    calls = []

    def generate_turn(contexts, seeds, max_new_tokens):
        text = turns_by_call[len(calls)]
        calls.append(len(contexts))
        return [(tok(text, add_special_tokens=False)["input_ids"] + [stop])[:max_new_tokens] for _ in contexts]

    return generate_turn, calls


def test_tool_calls_are_parsed_in_the_hermes_convention_and_bad_ones_name_their_fault():
    assert parse_tool_calls("\\boxed{3}") == []
    (call,) = parse_tool_calls(call_text("47+38"))
    assert call.name == "calc" and call.arguments == {"expr": "47+38"} and call.error is None
    two = parse_tool_calls('<tool_call>{"name": "calc", "arguments": "{\\"expr\\": \\"1+2\\"}"}</tool_call>'
                           + call_text("3-4"))
    assert [c.arguments for c in two] == [{"expr": "1+2"}, {"expr": "3-4"}]  # arguments as a JSON string too
    assert "not json" in parse_tool_calls("<tool_call>{calc 47+38}</tool_call>")[0].error
    assert "expected {" in parse_tool_calls('<tool_call>["calc"]</tool_call>')[0].error
    bad_args = parse_tool_calls('<tool_call>{"name":"calc","arguments":[1]}</tool_call>')
    assert "must be a JSON object" in bad_args[0].error
    assert "never closed" in parse_tool_calls('<tool_call>{"name":"calc"')[0].error
    env = CalculatorEnv()
    assert env.call(None, "calc", {"expr": "19-75"}) == "-56" and env.call(None, "calc", {"expr": "1+2-3+40"}) == "40"
    assert env.call(None, "calc", {"expr": "__import__('os')"}).startswith("error: calc needs expr")
    assert env.call(None, "search", {}) == "error: unknown tool; known: calc"


def test_the_chat_template_lays_out_tool_turns_and_the_task_episodes(tok, fmt):
    assert fmt.between_turns(["85"], ended_with_stop=True) == \
        "\n<|im_start|>user\n<tool_response>85</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert fmt.between_turns(["1", "2"], ended_with_stop=False).startswith("<|im_end|>\n<|im_start|>user\n"
                                                                            "<tool_response>1</tool_response>"
                                                                            "<tool_response>2</tool_response>")
    ids, labels, alt = episode_tokens(tok, fmt, "47+38-19=", teacher_turns(47, 38, 19, swap=False))
    text = tok.decode(ids)
    assert text.count("<tool_call>") == 2 and text.endswith("\\boxed{66}<|im_end|>")
    learned = tok.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert "tool_response" not in learned and "<|im_start|>" not in learned  # the environment's text is context
    # The student's errors at their documented places: no tool for the addition, carry-less sum drilled.
    head = student_turns(47, 38, 19, swap_sub=True)[0]
    assert head.text.startswith("47+38=75;<tool_call>") and '"expr":"19-75"' in head.text
    assert head.drilled == ((6, "8"),)
    examples = sample_examples(200, 0)
    assert {e.tags for e in examples} == {("carry",), ("plain",)} and all(e.solution for e in examples)


def test_a_tokenizer_without_tool_call_tokens_or_chat_template_is_refused_before_models_load(tmp_path):
    with pytest.raises(ValueError, match="needs? a tokenizer with a chat template"):
        TurnFormat(load_tokenizer("embedded://student"))
    plain_tok = load_tokenizer("embedded://student")  # the arithmetic tokenizer has no '<'
    plain_tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot write '<tool_call>'"):
        TurnFormat(plain_tok)
    with pytest.raises(ConfigError, match=r"env=calc with pair=embedded: .*chat template"):
        train(compose_config("env=embedded_agent", "pair=embedded", "logger=none"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"env='shell' is not allowed: expected one of none, calc"):
        train(compose_config("env=embedded_agent", "env.name=shell", "logger=none"), tmp_path / "run2")


def test_environment_tokens_are_masked_and_episodes_end_cleanly_on_garbage_and_limits(tok, fmt):
    examples = sample_examples(2, 0)
    prompts = prompt_ids(tok, examples)
    garbage = '<tool_call>{"name": calc}</tool_call>'
    gen, calls = scripted(tok, fmt, [garbage, "<tool_call>" + "9" * 80, call_text("1+1"), "x"])
    limits = EpisodeLimits(max_turns=3, max_turn_tokens=64, max_tool_response_tokens=120, max_episode_tokens=600)
    episodes = run_episodes(gen, CalculatorEnv(), fmt, limits, examples, prompts, 2, [0, 1])
    assert calls == [4, 4, 4]  # three rounds over the four episodes; the turn limit ends them
    for ep in episodes:
        assert ep.turns == 3 and ep.end == "max_turns" and ep.malformed_calls == 2 and ep.tool_calls == 1
        student = tok.decode(ep.student_ids(), skip_special_tokens=False)
        env_text = tok.decode([t for t, m in zip(ep.tokens, ep.mask) if not m], skip_special_tokens=False)
        assert "<tool_response>error: malformed tool call: not json (expecting" in env_text
        assert "never closed" in env_text  # the cut turn: its call was never closed, answered as an error
        assert "tool_response" not in student and student.count("<|im_end|>") == 2  # turn 2 was cut: no stop
    batch = episode_batch(episodes, tok.pad_token_id)
    assert batch.responses() == [ep.student_ids() for ep in episodes]
    assert batch.info[0] == 4 and batch.info[3] == 8  # EPISODE_SUMS: episodes, ..., malformed calls
    # An answer ends the episode; the score reads the boxed answer of the student's own text.
    right = f"\\boxed{{{examples[0].answer}}}"
    gen, calls = scripted(tok, fmt, [right])
    (ep,) = run_episodes(gen, CalculatorEnv(), fmt, limits, examples[:1], prompts[:1], 1, [0])
    assert ep.end == "answered" and ep.score == 1.0 and all(ep.mask) and calls == [1]
    # Lockstep (ZeRO-3 ranks): every round over every episode, ended or not, and the same episodes come out.
    gen, calls = scripted(tok, fmt, [right] * 3)
    locked = run_episodes(gen, CalculatorEnv(), fmt, limits, examples, prompts, 2, [0, 1], lockstep=True)
    assert calls == [4, 4, 4] and all(e.end == "answered" and e.turns == 1 for e in locked)
    # The episode budget: a tool result that would pass it ends the episode instead of being cut in.
    gen, _ = scripted(tok, fmt, [call_text("1+1")] * 3)
    (ep,) = run_episodes(gen, CalculatorEnv(), fmt, EpisodeLimits(3, 64, 16, 60), examples[:1], prompts[:1], 1, [0])
    assert ep.end == "max_episode_tokens" and len(ep.tokens) <= 60


def test_an_engines_log_probabilities_follow_the_student_tokens_of_an_episode(tok, fmt):
    """Issue 40: multi-turn rollouts carried no sampler log-probabilities, so rollout/logp_gap (the check that the
    engine samples from the trained weights) never ran for them. A turn with the engine's log-probabilities
    (SampledTurn) puts them at the student's tokens of the batch, 0 at the environment's; a generator without them
    (transformers' generate) leaves the batch without any."""
    from tip.env import SampledTurn

    examples = sample_examples(2, 0)
    prompts = prompt_ids(tok, examples)
    plain, _ = scripted(tok, fmt, [call_text("1+1"), "\\boxed{2}"])

    def with_logps(contexts, seeds, max_new_tokens):
        return [SampledTurn(t, [-0.5 - 0.01 * j for j in range(len(t))])
                for t in plain(contexts, seeds, max_new_tokens)]

    limits = EpisodeLimits(max_turns=2, max_turn_tokens=64, max_tool_response_tokens=16, max_episode_tokens=400)
    episodes = run_episodes(with_logps, CalculatorEnv(), fmt, limits, examples, prompts, 1, [0, 1])
    batch = episode_batch(episodes, tok.pad_token_id)
    assert batch.sampler_logp is not None
    for i, ep in enumerate(episodes):
        start = batch.prompt_lengths[i]
        row = batch.sampler_logp[i, start:start + len(ep.tokens)]
        student = torch.tensor(ep.mask)
        assert (row[student] < 0).all() and (row[~student] == 0).all()
        assert row[student][0].item() == pytest.approx(-0.5)  # each turn's first token
    plain, _ = scripted(tok, fmt, [call_text("1+1"), "\\boxed{2}"])
    without = run_episodes(plain, CalculatorEnv(), fmt, limits, examples, prompts, 1, [0, 1])
    assert episode_batch(without, tok.pad_token_id).sampler_logp is None


def test_masks_keep_every_tool_token_out_of_signals_selection_quadrants_and_loss(tok, fmt):
    """Real episodes of the shipped student, scored against the teacher: every masked position is a token the
    environment wrote, and no such position has a signal, is selected, gets a quadrant or enters the loss."""
    student, teacher = load_model(STUDENT, torch.float32, "s"), load_model(TEACHER, torch.float32, "t")
    examples = sample_examples(6, 3)
    torch.manual_seed(0)
    with hf_turns(student, tok, temperature=1.0) as gen:
        episodes = run_episodes(gen, CalculatorEnv(), fmt, EpisodeLimits(), examples, prompt_ids(tok, examples), 2,
                                list(range(6)))
    batch = episode_batch(episodes, tok.pad_token_id)
    env_positions = batch.attention_mask.bool() & ~batch.response_mask
    for b, p in enumerate(batch.prompt_lengths):
        env_positions[b, :p] = False
    assert int(env_positions.sum()) > 0  # the episodes did get tool results
    env_text = tok.decode(batch.input_ids[env_positions].tolist(), skip_special_tokens=False)
    assert "<tool_response>" in env_text and "<tool_call>" not in env_text
    with torch.no_grad():
        s_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        t_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    sig = token_signals(logits_rows(s_logits), logits_rows(t_logits), batch.target_mask, chunk_size=64)
    env_targets = env_positions[:, 1:]
    assert not (sig.mask & env_targets).any()
    assert (sig.entropy[env_targets] == 0).all() and (sig.reverse_kl[env_targets] == 0).all()
    for rule in ("all", "q3", "soft_or", "entropy_sample"):
        kept = select(rule, sig, 0.2, generator=torch.Generator().manual_seed(0)).kept
        assert not (kept & env_targets).any(), rule
    labels = quadrant_labels(sig.entropy, sig.reverse_kl, sig.mask)
    assert (labels[env_targets] == 0).all() and (labels[sig.mask] > 0).all()


def test_teacher_and_student_positions_stay_aligned_across_turns_of_different_lengths(tok, fmt):
    """The privileged teacher reads the same episode after a longer prompt: each student position maps to the
    teacher position that predicts the same token from the same episode prefix, turn after turn."""
    examples = sample_examples(3, 4)
    prompts = prompt_ids(tok, examples)
    turns = [call_text("1+2"), "1+1=2;" + call_text("22-3"), "\\boxed{5}"]  # turns of different lengths
    gen, _ = scripted(tok, fmt, turns)
    episodes = run_episodes(gen, CalculatorEnv(), fmt, EpisodeLimits(), examples, prompts, 1, [0, 1, 2])
    student = episode_batch(episodes, tok.pad_token_id)
    privileged = [p[:-3] + tok(f"solution: {e.solution}", add_special_tokens=False)["input_ids"] + p[-3:]
                  for p, e in zip(prompts, examples)]
    teacher = with_prompts(student, privileged, tok.pad_token_id)
    index = aligned_targets(student, teacher)
    s_len, t_len = student.input_ids.shape[1] - 1, teacher.input_ids.shape[1] - 1
    checked = 0
    for flat in student.target_mask.reshape(-1).nonzero(as_tuple=True)[0].tolist():
        b, p = divmod(flat, s_len)
        tb, q = divmod(int(index[flat]), t_len)
        assert tb == b
        s_ids, t_ids = student.input_ids[b], teacher.input_ids[b]
        assert int(s_ids[p + 1]) == int(t_ids[q + 1])
        assert s_ids[student.prompt_lengths[b]:p + 2].tolist() == t_ids[teacher.prompt_lengths[b]:q + 2].tolist()
        checked += 1
    assert checked == sum(len(e.student_ids()) for e in episodes)
    assert torch.equal(teacher.response_mask.sum(-1), student.response_mask.sum(-1))


def test_hf_multi_turn_rollouts_batch_episodes_and_reproduce_from_the_step_seed(tok, fmt):
    policy = load_model(STUDENT, torch.float32, "student")
    cfg = compose_config("env=embedded_agent").rollout
    rollout = MultiTurnRollout(HFRollout(policy, tok, cfg, synced_gpus=False), CalculatorEnv(), fmt,
                               EpisodeLimits(), n=2)
    examples = sample_examples(4, 2)
    a = rollout.generate(prompt_ids(tok, examples), 7, [1, 2, 3, 4], examples)
    b = rollout.generate(prompt_ids(tok, examples), 7, [1, 2, 3, 4], examples)
    assert torch.equal(a.input_ids, b.input_ids) and a.example_index == [0, 0, 1, 1, 2, 2, 3, 3]
    assert a.info[1] >= 8  # at least one turn per episode, several for most
    with pytest.raises(ValueError, match="need the examples"):
        rollout.generate(prompt_ids(tok, examples), 7, [1, 2, 3, 4])


def test_evaluation_runs_episodes_and_reports_tool_use(tok):
    cfg = compose_config("env=embedded_agent", "eval.benchmarks.embedded_agent.source.size=24")
    (bench,) = load_benchmarks(cfg.eval)
    records = {}
    for name, ref in (("student", STUDENT), ("teacher", TEACHER)):
        model = load_model(ref, torch.float32, name)
        m = evaluate(model, tok, [bench], Sampling(max_new_tokens=64), records=records)
        if name == "teacher":  # two calls, then the answer, every time
            assert m["embedded_agent/accuracy"] == 1.0 and m["embedded_agent/tool_calls"] == 2.0
            assert m["embedded_agent/turns"] == 3.0
        else:  # it adds in its head: one call, and every carry problem wrong
            assert m["embedded_agent/tool_calls"] == 1.0 and m["embedded_agent/accuracy@carry"] == 0.0
            assert m["embedded_agent/accuracy"] < 0.7
        assert m["embedded_agent/with_tool_call"] == 1.0
    rec = records["embedded_agent"][0]
    assert "<tool_response>" in rec["episodes"][0]["trajectory"] and "<tool_response>" not in rec["completions"][0]
    no_env = compose_config("env=embedded_agent", "env.name=none")
    with pytest.raises(ConfigError, match="needs an environment"):
        load_benchmarks(no_env.eval)


@pytest.mark.slow
def test_the_agentic_task_trains_from_the_command_line(tmp_path):
    """``python -m tip.train env=embedded_agent selector=q3 keep=0.2`` (shortened): episodes are logged, and the
    token records hold the student's tokens only, every one of them."""
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "tip.train", "env=embedded_agent", "selector=q3", "keep=0.2",
                          "experiment=smoke", "engine=zero0", "train.save_final=false", f"hydra.run.dir={run_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = read_metrics(run_dir, "train")
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["episode/turns"] >= 1 and 0 < r["episode/env_token_frac"] < 1
        assert 0.15 < r["kept_frac"] <= 0.2 + 1e-9
    cols, _ = read_token_records(run_dir, 1)
    assert len(cols["token"]) == steps[0]["valid_tokens"]
    assert not any(t in ("<tool_response>", "</tool_response>", "<|im_start|>") for t in cols["token"])
    evals = read_metrics(run_dir, "eval")
    assert "embedded_agent/with_tool_call" in evals[-1] and json.loads((run_dir / "eval.json").read_text())
    assert "episodes: score" in out.stdout and "tool calls" in out.stdout


@pytest.mark.slow
def test_the_privileged_self_teacher_reads_the_episodes_after_its_own_prompt(tmp_path):
    train(compose_config("env=embedded_agent", "experiment=smoke", "teacher=self_privileged", "engine=zero0",
                         "selector=soft_or", "keep=0.5", "logger=none", "train.save_final=false",
                         "train.eval_before=false"), tmp_path / "run")
    steps = read_metrics(tmp_path / "run", "train")
    assert len(steps) == 2 and all(r["valid_tokens"] > 0 and r["loss"] >= 0 for r in steps)


def test_the_students_errors_sit_where_the_task_says(tok, fmt):
    """On its greedy episodes the shipped student's first token (a digit where the teacher calls the tool) is
    confident (p >= 0.95: its entropy sits at the label-smoothing floor of its ordinary tokens) and among the
    largest divergences (the Q3 error), and the first character of its subtraction (either operand) is among its
    most uncertain tokens and disagreeing (the Q1 error)."""
    student, teacher = load_model(STUDENT, torch.float32, "s"), load_model(TEACHER, torch.float32, "t")
    examples = sample_examples(32, 1, "test")
    with hf_turns(student, tok, temperature=0.0) as gen:
        episodes = run_episodes(gen, CalculatorEnv(), fmt, EpisodeLimits(), examples, prompt_ids(tok, examples), 1,
                                list(range(32)))
    batch = episode_batch(episodes, tok.pad_token_id)
    with torch.no_grad():
        s_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        t_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    sig = token_signals(logits_rows(s_logits), logits_rows(t_logits), batch.target_mask, chunk_size=64)
    h, d = sig.entropy[sig.mask], sig.reverse_kl[sig.mask]
    h_90, d_median, d_85 = h.quantile(0.9), d.median(), d.quantile(0.85)
    marker = tok('"expr":"', add_special_tokens=False)["input_ids"]
    uncertain_operands = 0
    for b in range(len(episodes)):
        p = batch.prompt_lengths[b]  # position p - 1 predicts the first response token
        assert s_logits[b, p - 1].softmax(-1).max() >= 0.95 and sig.reverse_kl[b, p - 1] > d_85
        ids = batch.input_ids[b].tolist()
        at = next(i for i in range(p, len(ids)) if ids[i:i + len(marker)] == marker) + len(marker)
        assert sig.reverse_kl[b, at - 1] > d_median
        uncertain_operands += bool(sig.entropy[b, at - 1] > h_90)
    assert uncertain_operands >= 0.8 * len(episodes)
    build = json.loads((ROOT / "tip" / "assets" / "embedded_agent_pair" / "build.json").read_text())
    assert build["teacher"]["heldout_greedy"]["accuracy"] == 1.0
    assert build["student"]["heldout_greedy"]["accuracy@carry"] == 0.0


@pytest.mark.slow
def test_the_build_command_writes_a_loadable_agentic_pair(tmp_path):
    """``python -m tip.testbed.agent.build`` (a few steps here): both models load with the tool-call tokenizer and its
    chat template, and build.json records what was measured."""
    out = tmp_path / "pair"
    done = subprocess.run([sys.executable, "-m", "tip.testbed.agent.build", "--out", str(out),
                           "--steps-scale", "0.004"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "build.json").read_text())
    assert report["init"] == "embedded://teacher" and report["spec"]["teacher_steps"] == 2
    # then the teacher learns the student's states (tip.testbed.agent.dagger), the student kept as it is
    student_weights = (out / "student" / "model.safetensors").read_bytes()
    done = subprocess.run([sys.executable, "-m", "tip.testbed.agent.dagger", "--pair", str(out), "--steps-scale",
                           "0.004"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    off_path = json.loads((out / "build.json").read_text())["teacher_off_path"]
    assert off_path["spec"]["steps"] == 2 and off_path["state_rows"] == 2 * 64  # two rounds of 64 states
    assert 0.0 <= off_path["after"]["off_path"]["well_formed"] <= 1.0
    assert (out / "student" / "model.safetensors").read_bytes() == student_weights
    for name in ("teacher", "student"):
        tok = load_tokenizer(str(out / name))
        TurnFormat(tok)  # it can write tool calls and has the chat template
        model = load_model(str(out / name), torch.float32, name)
        assert model.get_output_embeddings().weight.shape[0] == len(tok)
        assert 0.0 <= report[name]["heldout_greedy"]["accuracy"] <= 1.0 and report[name]["params"] > 0
