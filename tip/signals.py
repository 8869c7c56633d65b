"""Per-token signals for on-policy distillation: student entropy and teacher-student divergences.

Everything here is a pure tensor function. Math is done in fp32 whatever the input dtype, over the
full vocabulary, and positions are processed in chunks so that at most ``chunk_size x V`` fp32
values exist at once.

Logits are reached through *row sources*: a callable that maps flat position indices (over ``B*T``)
to the logits of those positions. ``logits_rows`` wraps materialised logits; ``projected_rows``
computes them from hidden states and the output projection on demand, so the full ``N x V`` logits
never exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RowSource = Callable[[torch.Tensor], torch.Tensor]
"""Maps a 1-D LongTensor of flat positions (indices into B*T) to logits of shape (len(idx), V)."""

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


def logits_rows(logits: torch.Tensor) -> RowSource:
    """Row source over materialised logits of shape (B, T, V)."""
    flat = logits.reshape(-1, logits.shape[-1])
    return lambda idx: flat[idx]


def projected_rows(hidden: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> RowSource:
    """Row source that projects hidden states (B, T, H) through an output layer (V, H) only for
    asked rows."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return lambda idx: F.linear(flat[idx], weight, bias)


def common_vocab(student_logits: torch.Tensor,
                 teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut both logit sets to the narrower vocabulary.

    Paired models can have output layers of different widths while sharing a tokenizer (Qwen2.5-14B
    has 152,064 rows, Qwen2.5-1.5B 151,936; the extra rows are padding ids no tokenizer emits). The
    shared leading ids are the same tokens, so the divergence is taken over them. Callers check that
    the tokenizer fits inside.
    """
    width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :width], teacher_logits[..., :width]


def _xlogy_diff(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Sum_i p_i (log p_i - log q_i), with 0 log 0 = 0 (so -inf logits at zero-mass ids are
    safe)."""
    term = p * (logp - logq)
    return torch.where(p > 0, term, torch.zeros_like(term)).sum(-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each row of log-probabilities (last dim)."""
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return -plogp.sum(-1)


def reverse_kl(logp_student: torch.Tensor, logp_teacher: torch.Tensor) -> torch.Tensor:
    """KL(P_S || P_T) per row: the paper's default OPD loss and its divergence axis delta."""
    return _xlogy_diff(logp_student.exp(), logp_student, logp_teacher)


def forward_kl(logp_student: torch.Tensor, logp_teacher: torch.Tensor) -> torch.Tensor:
    """KL(P_T || P_S) per row: used by the Q3 score and as an alternative loss."""
    return _xlogy_diff(logp_teacher.exp(), logp_teacher, logp_student)


def jsd(logp_student: torch.Tensor, logp_teacher: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence per row.

    Convention (as in TRL's GKD and the OPSD release): M = beta*P_T + (1-beta)*P_S and
    JSD_beta = beta*KL(P_T || M) + (1-beta)*KL(P_S || M). At beta = 0.5 it is the symmetric JSD,
    bounded by log 2. The endpoints return the limits of the rescaled divergence: beta = 0 gives
    KL(P_T || P_S) (the limit of JSD_beta/beta) and beta = 1 gives KL(P_S || P_T) (the limit of
    JSD_beta/(1-beta)).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(logp_student, logp_teacher)
    if beta == 1.0:
        return reverse_kl(logp_student, logp_teacher)
    log_m = torch.logsumexp(
        torch.stack([logp_teacher + math.log(beta), logp_student + math.log1p(-beta)]), dim=0
    )
    kl_teacher_m = _xlogy_diff(logp_teacher.exp(), logp_teacher, log_m)
    kl_student_m = _xlogy_diff(logp_student.exp(), logp_student, log_m)
    return beta * kl_teacher_m + (1.0 - beta) * kl_student_m


def divergence(logp_student: torch.Tensor, logp_teacher: torch.Tensor, kind: str,
               beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence by name: ``reverse_kl``, ``forward_kl`` or ``jsd`` (with ``beta``)."""
    if kind == "reverse_kl":
        return reverse_kl(logp_student, logp_teacher)
    if kind == "forward_kl":
        return forward_kl(logp_student, logp_teacher)
    if kind == "jsd":
        return jsd(logp_student, logp_teacher, beta)
    raise ValueError(f"unknown divergence {kind!r}; known: {', '.join(DIVERGENCES)}")


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-style final-logit soft-capping, cap * tanh(logits / cap); identity when ``cap`` is None
    or 0."""
    return cap * torch.tanh(logits / cap) if cap else logits


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary (the last dim) in at least fp32: bf16/fp16 are upcast, fp64
    is kept."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


@dataclass(frozen=True)
class TokenSignals:
    """Signals of every position of a (B, T) batch; values at invalid positions are 0.

    entropy:     h = H(P_S) / log|V|, in [0, 1]
    reverse_kl:  delta = KL(P_S || P_T), nats
    forward_kl:  delta_fwd = KL(P_T || P_S), nats
    mask:        bool, the valid (response) positions
    teacher_entropy: H(P_T) / log|V| (the paper's App. B.1), when computed
    jsd:         symmetric JSD(P_S, P_T) / log 2, in [0, 1] (the release helper's axis), when
                 asked for
    top1:        optional (4, B, T): ``TOP1_FIELDS``, each model's most likely next token and its
                 probability
    sampled_logp: log P_S of the token the rollout holds at each position (the check of the
                 rollout engine's weights), when asked
    """

    entropy: torch.Tensor
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor
    mask: torch.Tensor
    teacher_entropy: torch.Tensor | None = None
    jsd: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    sampled_logp: torch.Tensor | None = None

    @property
    def num_valid(self) -> int:
        return int(self.mask.sum())

    @classmethod
    def from_flat(cls, values: torch.Tensor, mask: torch.Tensor, with_jsd: bool = False,
                  with_sampled: bool = False) -> TokenSignals:
        """From ``values`` (len(SIGNAL_ROWS), B*T) in ``row_signals`` order, zero at invalid
        positions, and the (B, T) mask; then the ``jsd_rows`` row (``with_jsd``), the sampled
        tokens' log P_S (``with_sampled``) and ``top1_rows`` when there are more rows."""
        mask = mask.bool()
        n = len(SIGNAL_ROWS)
        h, rkl, fkl, h_teacher = (x.view(mask.shape) for x in values[:n])
        jsd_row = values[n].view(mask.shape).clamp(0, 1) if with_jsd else None
        n += int(with_jsd)
        sampled = values[n].view(mask.shape) if with_sampled else None
        n += int(with_sampled)
        top1 = values[n:].view(-1, *mask.shape) if values.shape[0] > n else None
        # Rounding can make a KL a hair below 0 for identical rows; KL >= 0 by definition.
        return cls(entropy=h, reverse_kl=rkl.clamp_min(0), forward_kl=fkl.clamp_min(0), mask=mask,
                   teacher_entropy=h_teacher, jsd=jsd_row, top1=top1, sampled_logp=sampled)


SIGNAL_ROWS = ("entropy", "reverse_kl", "forward_kl", "teacher_entropy")
"""What ``row_signals`` returns per row, in this order (``TokenSignals`` fields of the same
names)."""


def row_signals(logp_student: torch.Tensor, logp_teacher: torch.Tensor,
                reverse: torch.Tensor | None = None,
                forward: torch.Tensor | None = None) -> torch.Tensor:
    """(4, n) fp32 in ``SIGNAL_ROWS`` order: h = H(P_S) / log|V|, KL(P_S || P_T), KL(P_T || P_S) and
    the teacher's H(P_T) / log|V|, of n rows of log-probabilities. A KL direction the caller has
    already computed for these rows (the loss's divergence) may be passed in."""
    log_v = math.log(logp_student.shape[-1])
    h = entropy(logp_student) / log_v
    rkl = reverse_kl(logp_student, logp_teacher) if reverse is None else reverse
    fkl = forward_kl(logp_student, logp_teacher) if forward is None else forward
    h_teacher = entropy(logp_teacher) / log_v
    return torch.stack([h.float(), rkl.float(), fkl.float(), h_teacher.float()])


def jsd_rows(logp_student: torch.Tensor, logp_teacher: torch.Tensor,
             signals: torch.Tensor) -> torch.Tensor:
    """(n,) fp32: the symmetric JSD(P_S, P_T) / log 2 of n rows, in [0, 1] (the release helper's
    ``_compute_per_token_entropy_and_jsd`` axis, over the full vocabulary). ``signals`` are the
    rows' ``row_signals``, whose two entropies give JSD = H(M) - (H(P_S) + H(P_T)) / 2 with M the
    even mixture: one entropy more per row instead of two KLs against M (half the cost of ``jsd(..,
    beta=0.5)``, the same value)."""
    log_v = math.log(logp_student.shape[-1])
    m = 0.5 * (logp_student.exp() + logp_teacher.exp())
    h_mixture = -torch.special.xlogy(m, m).sum(-1)
    h_student, h_teacher = (signals[SIGNAL_ROWS.index("entropy")],
                            signals[SIGNAL_ROWS.index("teacher_entropy")])
    return ((h_mixture.float() - 0.5 * log_v * (h_student + h_teacher))
            / math.log(2.0)).clamp_min(0)


def token_log_probs(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(n,) fp32: each row's log-probability of its token."""
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1).float()


TOP1_FIELDS = ("student_top_id", "student_top_p", "teacher_top_id", "teacher_top_p")


def top1_rows(logp_student: torch.Tensor, logp_teacher: torch.Tensor) -> torch.Tensor:
    """(4, n) fp32 in ``TOP1_FIELDS`` order: each model's most likely token id (exact in fp32 below
    2^24 ids) and its probability."""
    s_p, s_id = logp_student.max(-1)
    t_p, t_id = logp_teacher.max(-1)
    return torch.stack([s_id.float(), s_p.float().exp(), t_id.float(), t_p.float().exp()])


CHUNK_BUDGET_MIB = {"cpu": 28, "cuda": 320}
"""``chunk_size=auto``: MiB of one chunk x V fp32 tensor (a chunk's loop holds about six). CPU: 28
MiB, 48 rows at Qwen's 151,936 ids (why: docs/results/measurements.md, chunk size). CUDA: 320
MiB, 552 rows at that vocabulary (the paper's chunk is 512)."""


def resolve_chunk_size(setting: int | str, vocab: int, device: torch.device) -> int:
    """Rows per chunk: an integer as given, or ``auto``: as many rows as fit ``CHUNK_BUDGET_MIB`` of
    the device type in one chunk x ``vocab`` fp32 tensor (at least 1)."""
    if setting != "auto":
        return int(setting)
    budget = CHUNK_BUDGET_MIB.get(torch.device(device).type, CHUNK_BUDGET_MIB["cuda"]) * 2**20
    return max(1, budget // (4 * vocab))


def chunks(idx: torch.Tensor, chunk_size: int):
    """Split a 1-D index tensor into consecutive pieces of at most chunk_size."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return idx.split(chunk_size)


@torch.no_grad()
def token_signals(
    student: RowSource,
    teacher: RowSource,
    mask: torch.Tensor,
    chunk_size: int = 512,
    with_top1: bool = False,
    with_jsd: bool = False,
    targets: torch.Tensor | None = None,
) -> TokenSignals:
    """Entropy and both KL directions at every valid position, computed chunk by chunk without
    gradient.

    ``student``/``teacher`` are row sources (see ``logits_rows``, ``projected_rows``) over the same
    B*T flat positions as ``mask`` (bool, shape (B, T)). Only valid positions are ever projected or
    soft-maxed. ``with_top1``: also each model's most likely token and its probability
    (``TokenSignals.top1``). ``with_jsd``: also the normalised symmetric JSD (``TokenSignals.jsd``;
    only the rules that read it pay for it). ``targets`` (B, T): also log P_S of these tokens
    (``TokenSignals.sampled_logp``).
    """
    mask = mask.bool()
    flat_valid = mask.reshape(-1).nonzero(as_tuple=True)[0]
    n, with_sampled = len(SIGNAL_ROWS), targets is not None
    extra = int(with_jsd) + int(with_sampled)
    out = torch.zeros(n + extra + (len(TOP1_FIELDS) if with_top1 else 0), mask.numel(),
                      dtype=torch.float32, device=mask.device)
    flat_targets = None if targets is None else targets.reshape(-1)
    for idx in chunks(flat_valid, chunk_size):
        s_logits, t_logits = common_vocab(student(idx), teacher(idx))
        logp_s, logp_t = log_probs(s_logits), log_probs(t_logits)
        out[:n, idx] = row_signals(logp_s, logp_t)
        if with_jsd:
            out[n, idx] = jsd_rows(logp_s, logp_t, out[:n, idx])
        if with_sampled:
            out[n + int(with_jsd), idx] = token_log_probs(logp_s, flat_targets[idx])
        if with_top1:
            out[n + extra:, idx] = top1_rows(logp_s, logp_t)
    return TokenSignals.from_flat(out, mask, with_jsd, with_sampled)


def signals_from_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                        chunk_size: int = 512
) -> TokenSignals:
    """``token_signals`` over materialised (B, T, V) logits."""
    return token_signals(logits_rows(student_logits), logits_rows(teacher_logits), mask, chunk_size)
