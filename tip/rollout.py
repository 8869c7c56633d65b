"""Student rollouts: sample responses to prompts and lay them out for scoring.

Rollouts come back **right-padded** as ``prompt + response``: every sequence starts at position 0
whatever the batch's other prompt lengths, so teacher and student see natural position ids and a
rollout scores the same in any batch composition (one process or several). ``response_mask`` marks
the generated tokens up to and including the first end-of-sequence token; in a multi-turn episode
(``tip.env``) the response holds the environment's tokens too, and ``response_mask`` marks only the
student's.
"""

from __future__ import annotations

import contextlib
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch

ROLLOUT_BACKENDS = ("hf", "vllm")
WEIGHT_TRANSFERS = ("socket", "ipc")
"""rollout.weight_transfer (auto: ipc on CUDA, socket elsewhere): how the student's weights reach
the vLLM engine (``tip.vllm_worker.VllmWorker.load_weights``)."""


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # (B, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, L)
    response_mask: torch.Tensor  # (B, L) bool, True at response tokens
    prompt_lengths: list[int]
    example_index: list[int]  # which prompt each rollout answers
    # multi-turn rollouts: tip.env.EPISODE_SUMS of this batch's episodes
    info: list[float] | None = None
    # (B, L) fp32: the rollout engine's log-probability of each response token it sampled (0
    # elsewhere), when the engine reports them (rollout=vllm, single-turn); checks its weights
    sampler_logp: torch.Tensor | None = None

    # The response shift: position t predicts token t+1, so a batch's L positions give L-1
    # predictions. These two and ``tip.step.response_rows`` (the hidden states) are its only places.
    @property
    def target_mask(self) -> torch.Tensor:
        """(B, L-1) bool: the positions whose next-token distribution predicts a response token
        (where signals and loss are computed)."""
        return self.response_mask[:, 1:]

    @property
    def targets(self) -> torch.Tensor:
        """(B, L-1): the token each position predicts."""
        return self.input_ids[:, 1:]

    @property
    def sampler_target_logp(self) -> torch.Tensor | None:
        """(B, L-1): the engine's log-probability of the token each position predicts."""
        return None if self.sampler_logp is None else self.sampler_logp[:, 1:]

    def responses(self) -> list[list[int]]:
        """The student's tokens of each rollout (without any environment tokens between its
        turns)."""
        return [row[m].tolist() for row, m in zip(self.input_ids, self.response_mask)]

    def trajectories(self) -> tuple[list[list[int]], list[list[bool]]]:
        """Everything after each prompt (the student's and the environment's tokens) and which are
        the student's."""
        # One host copy of each tensor (not a transfer per row: this runs every step on
        # the trainer's device).
        rows, ends, student = (t.tolist() for t in (self.input_ids, self.attention_mask.sum(-1),
                                                    self.response_mask))
        return ([r[p:e] for r, p, e in zip(rows, self.prompt_lengths, ends)],
                [m[p:e] for m, p, e in zip(student, self.prompt_lengths, ends)])

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(self.input_ids.to(device), self.attention_mask.to(device),
                            self.response_mask.to(device), self.prompt_lengths, self.example_index,
                            self.info, _to(self.sampler_logp, device))

    def split(self, size: int) -> list[RolloutBatch]:
        """Micro-batches of ``size`` rollouts."""
        out = []
        for i in range(0, self.input_ids.shape[0], size):
            sl = slice(i, i + size)
            # trim right padding no row of this slice needs
            width = int(self.attention_mask[sl].sum(-1).max())
            out.append(RolloutBatch(self.input_ids[sl, :width], self.attention_mask[sl, :width],
                                    self.response_mask[sl, :width], self.prompt_lengths[sl],
                                    self.example_index[sl], self.info,
                                    None if self.sampler_logp is None
                                    else self.sampler_logp[sl, :width]))
        return out


def _to(tensor: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def with_prompts(batch: RolloutBatch, prompt_ids: list[list[int]], pad_id: int) -> RolloutBatch:
    """The same responses after other prompts (one per rollout): the privileged teacher's view of a
    batch (of a multi-turn batch too: the environment's tokens stay where they were, unmasked)."""
    trajectories, masks = batch.trajectories()
    return pack(prompt_ids, trajectories, batch.example_index, pad_id, masks)


def aligned_targets(student: RolloutBatch, teacher: RolloutBatch) -> torch.Tensor:
    """Map every flat target position of the student batch, over B x (L_s - 1), to the flat target
    position of the teacher batch, over B x (L_t - 1), whose next-token distribution predicts the
    same response token; -1 where the student position is no target. Both batches hold the same
    responses after prompts of any lengths."""
    s_mask, t_mask = student.target_mask, teacher.target_mask
    if not torch.equal(s_mask.sum(-1), t_mask.sum(-1)):
        raise ValueError("student and teacher batches do not hold the same number of response "
                         "tokens per row")
    index = torch.full((s_mask.numel(),), -1, dtype=torch.long, device=s_mask.device)
    # nonzero() walks rows in order and positions in order within a row, on both sides alike.
    index[s_mask.reshape(-1).nonzero(as_tuple=True)[0]] = \
        t_mask.reshape(-1).nonzero(as_tuple=True)[0]
    return index


class OffPolicyRollouts(RuntimeError):
    """The rollout engine does not sample from the weights being trained."""


def check_logp_gap(metrics: dict, limit: float | None, step: int) -> None:
    """Stop the run when the engine's log-probabilities of its own samples differ from the trainer's
    log P_S of the same tokens by more than ``limit`` nats per token on average
    (``rollout/logp_gap``; ``rollout.max_logp_gap``, None: no check)."""
    gap = metrics.get("rollout/logp_gap")
    if limit is None or gap is None or gap <= limit:
        return
    raise OffPolicyRollouts(
        f"step {step}: the rollout engine's log-probabilities of the tokens it sampled differ from "
        f"the student's by {gap:.4g} nats per token on average (rollout.max_logp_gap={limit}): "
        "the engine is not sampling from the weights being trained (a weight sync skipped or "
        "loaded under wrong names, a sleep level that dropped the weights, a tied output layer "
        "loaded twice) and every later step would train on off-policy samples; stopping (this "
        "step was applied; checkpoints saved before it are intact)")


def eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


@dataclass(frozen=True)
class StepSeeds:
    """Every random stream of one training step on one rank, from (run seed, step, rank): the one
    seed scheme of a run (docs/concepts.md, "Seeds"). A resumed run draws what it would have."""

    run_seed: int
    step: int  # 0-based
    rank: int

    @property
    def engine(self) -> int:
        """The rollout backend's step seed (HF generate's torch stream on this rank)."""
        return self.run_seed * 1_000_003 + self.step * 101 + self.rank

    @property
    def selection(self) -> int:
        """The selection's draws (random, entropy sampling), apart from the engine's."""
        return self.engine + 2**40

    def selection_generator(self, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.selection)


def prompt_seeds(run_seed: int, step: int, prompt_indices: list[int]) -> list[int]:
    """One sampling seed per prompt, from (run seed, step, the prompt's index in the step's global
    batch): draws are independent across prompts, steps and ranks, and a prompt's seed does not
    depend on the number of ranks. Hashed to 62 bits, so the seed + j that vLLM gives a prompt's
    j-th sample never meets another's."""
    return [seed_of(run_seed, step, i) for i in prompt_indices]


def seed_of(*parts) -> int:
    """A 62-bit seed hashed from ``parts`` (independent streams for different parts)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def pack(prompt_ids: list[list[int]], responses: list[list[int]], example_index: list[int],
         pad_id: int, student_masks: list[list[bool]] | None = None,
         info: list[float] | None = None,
         sampler_logps: list[list[float]] | None = None) -> RolloutBatch:
    """Right-padded prompt+response rows with their masks. ``student_masks`` (one per response):
    which response tokens are the student's (default: all). ``sampler_logps`` (one per response):
    the engine's log-probability of each response token."""
    rows = [p + r for p, r in zip(prompt_ids, responses)]
    width = max(map(len, rows))
    # Built on the host from Python lists; the trainer moves the batch to its device in one copy.
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")
    att = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    resp = torch.zeros((len(rows), width), dtype=torch.bool, device="cpu")
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long, device="cpu")
        att[i, : len(p) + len(r)] = 1
        resp[i, len(p): len(p) + len(r)] = True if student_masks is None else \
            torch.tensor(student_masks[i], dtype=torch.bool, device="cpu")
    logp = None
    if sampler_logps is not None:
        logp = torch.zeros((len(rows), width), dtype=torch.float32, device="cpu")
        for i, (p, lp) in enumerate(zip(prompt_ids, sampler_logps)):
            logp[i, len(p): len(p) + len(lp)] = torch.tensor(lp, dtype=torch.float32, device="cpu")
    return RolloutBatch(ids, att, resp, [len(p) for p in prompt_ids], example_index, info, logp)


@contextmanager
def plain_sampling(model):
    """Generation from P_S itself: while inside, ``model.generation_config`` holds only the
    special-token ids and the model is in eval mode.

    transformers fills every generation option left unset from the model's ``generation_config``
    (Instruct models ship repetition penalties, top-k/top-p and temperatures there) and then from
    its global defaults (top-k 50). Rollouts must be samples of the student's distribution, which
    the signals and the loss describe, so no processor but the temperature / top-p / top-k passed
    explicitly may act."""
    from transformers import GenerationConfig

    saved, was_training = model.generation_config, model.training
    ids = {k: getattr(saved, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                "decoder_start_token_id")}
    model.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    # Eval mode: in training mode a model with activation checkpointing generates without its KV
    # cache, and transformers then feeds it only the newest token (garbage rollouts).
    model.eval()
    try:
        yield
    finally:
        model.generation_config = saved
        model.train(was_training)


def sampling_kwargs(temperature: float, top_p: float, top_k: int) -> dict:
    """``generate``'s sampling options: temperature 0 is greedy. top_k=0 and top_p=1.0 switch those
    warpers off (None would let transformers fill in its top-k of 50)."""
    if temperature > 0:
        return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    return dict(do_sample=False)


def generate_calls(prompt_ids: list[list[int]], n: int, cap: int | None):
    """The ``generate`` calls that ``n`` samples of each prompt take under a cap of ``cap``
    sequences per call: (prompts, samples of each) in order, prompt by prompt, a prompt's samples
    split over calls when ``n`` is above the cap."""
    if cap is None or cap >= n:
        per_call = len(prompt_ids) if cap is None else cap // n
        return [(prompt_ids[i:i + per_call], n) for i in range(0, len(prompt_ids), per_call)]
    return [([p], min(cap, n - start)) for p in prompt_ids for start in range(0, n, cap)]


@torch.no_grad()
def hf_generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 64,
    synced_gpus: bool = False,
    max_seqs_per_call: int | None = None,
) -> RolloutBatch:
    """``n`` rollouts per prompt with transformers' ``generate`` (temperature 0 = greedy), sampled
    from the model's distribution with only these options (see ``plain_sampling``).

    ``max_seqs_per_call`` caps the sequences (prompts x n) of one ``generate`` call, whose KV cache
    grows with sequences x tokens: prompts are split over as many calls as needed, and a prompt's
    own samples too when n is above the cap. Under ``synced_gpus`` every rank must make the same
    number of calls: give every rank the same number of prompts."""
    stops = eos_ids(model, tokenizer)
    sampling = sampling_kwargs(temperature, top_p, top_k)
    responses = []
    with plain_sampling(model):
        for prompts, k in generate_calls(prompt_ids, n, max_seqs_per_call):
            responses += _generate_once(model, tokenizer, prompts, k, max_new_tokens, stops,
                                        synced_gpus, sampling)
    repeated = [p for p in prompt_ids for _ in range(n)]
    return pack(repeated, responses, [i for i in range(len(prompt_ids)) for _ in range(n)],
                tokenizer.pad_token_id)


class HFRollout:
    """rollout=hf: transformers ``generate`` on the student itself. Nothing to keep in sync; each
    step samples from one stream per rank, seeded by the step's seed."""

    def __init__(self, student, tokenizer, rollout_cfg, synced_gpus: bool,
                 generating=contextlib.nullcontext):
        self.student, self.tokenizer, self.cfg = student, tokenizer, rollout_cfg
        self.synced_gpus = synced_gpus
        # entered around each generate (tip.engine.whole_for_generation)
        self.generating = generating

    def generate(self, prompt_ids: list[list[int]], step_seed: int, prompt_seeds: list[int],
                 examples=None, n: int | None = None) -> RolloutBatch:
        """``n`` (default ``rollout.n``) samples of each prompt from the rank's stream."""
        ro = self.cfg
        torch.manual_seed(step_seed)
        with self.generating():
            return hf_generate(self.student, self.tokenizer, prompt_ids, n=n or ro.n,
                               temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                               max_new_tokens=ro.max_new_tokens, synced_gpus=self.synced_gpus,
                               max_seqs_per_call=ro.max_seqs_per_generate)

    @contextmanager
    def turns(self):
        """A turn generator for multi-turn episodes (``tip.env.TurnGenerator``), the student made
        whole once."""
        ro = self.cfg
        with self.generating(), hf_turns(self.student, self.tokenizer, ro.temperature, ro.top_p,
                                         ro.top_k, self.synced_gpus,
                                         ro.max_seqs_per_generate) as generate_turn:
            yield generate_turn


    def sync(self) -> dict:
        """The student is the model: nothing to send, nothing measured."""
        return {}

    def eval_sampler(self) -> None:
        """Evaluation generates with the student itself (``tip.benchmarks.HFSampler``)."""
        return None

    def close(self) -> None:
        pass


@contextmanager
def hf_turns(model, tokenizer, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             synced_gpus: bool = False, max_seqs_per_call: int | None = None):
    """A turn generator (``tip.env.TurnGenerator``) over transformers' ``generate``: one call per
    round over every running episode (in pieces of ``max_seqs_per_call``), sampling as
    ``hf_generate`` does from the global stream the caller seeds (per-context seeds are vLLM's)."""
    sampling = sampling_kwargs(temperature, top_p, top_k)
    stops = eos_ids(model, tokenizer)

    def generate_turn(contexts, seeds, max_new_tokens):
        step = max_seqs_per_call or len(contexts)
        return [r for i in range(0, len(contexts), step)
                for r in _generate_once(model, tokenizer, contexts[i:i + step], 1, max_new_tokens,
                                        stops, synced_gpus, sampling)]

    with torch.no_grad(), plain_sampling(model):
        yield generate_turn


def _generate_once(model, tokenizer, prompt_ids, n, max_new_tokens, stops, synced_gpus,
                   sampling) -> list[list[int]]:
    device = next(iter(model.parameters())).device
    pad_id = tokenizer.pad_token_id
    width = max(map(len, prompt_ids))
    repeated = [p for p in prompt_ids for _ in range(n)]
    ids = torch.full((len(repeated), width), pad_id, dtype=torch.long, device="cpu")
    att = torch.zeros_like(ids)
    for i, p in enumerate(repeated):  # left-pad for generation
        ids[i, width - len(p):], att[i, width - len(p):] = torch.tensor(p, device="cpu"), 1
    out = model.generate(
        input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
        pad_token_id=pad_id, eos_token_id=sorted(stops), synced_gpus=synced_gpus, **sampling,
    )
    responses = []
    for row in out[:, width:].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        responses.append(row[:cut])
    return responses
