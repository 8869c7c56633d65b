"""Where is the learning signal? A first-order probe of one teacher/student pair, before any sweep.

    python -m tip.probe [pair=...] [data=...] [probe.prompts=8 probe.blocks=1 ...]

From the student's own rollouts on training prompts (a probed batch A and a disjoint held-out
batch B, ``probe.batches`` independent times), with gradients restricted to the last
``probe.blocks`` decoder blocks, the final norm and the output layer (so a real pair fits on a CPU),
it measures:

- per quadrant (median thresholds, as training labels them, and absolute ones:
  ``probe.absolute``): the tokens' share, mean h, delta, delta_fwd, the logit-space signal
  ||p_S - p_T||^2 (the squared gradient of the forward KL in the student's logits) and the
  curvature 1 - sum_v p_S(v)^2 (the trace of the softmax Jacobian, the Hessian of the loss in logit
  space up to its p_T-dependent part), and phi = <g_Q, g_ho> / |Q|: the mean alignment of a
  token's gradient with the all-token gradient of the held-out batch (the paper's phi-bar of Prop.
  1), also relative to the mean over all tokens;
- per rule and keep fraction (``probe.rules`` x ``probe.keeps``, the selection code training
  runs): the share of the all-token first-order descent it keeps, <g_S, g_ho> / <g_all, g_ho>, its
  cosine with the all-token gradient, and the share of Q3's own descent it keeps,
  <g_{S and Q3}, g_ho> / <g_Q3, g_ho>.

Here g_S is the gradient of the sum of the per-token losses (the run's divergence) over the token
set S: sums make the shares additive over a partition (the four quadrants' shares add up to 1).
Writes ``probe.json`` and ``probe.md`` (and ``probe.png``) into the run directory.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tip.claims import by_batches
from tip.config import CONF_DIR, ConfigError, check_config, require_conf_dir, selection_of
from tip.errors import one_line_errors
from tip.models import (
    final_logit_softcap,
    hidden_states,
    load_model,
    load_tokenizer,
    resolve_attention,
)
from tip.rollout import RolloutBatch, hf_generate
from tip.selection import RULES, SelectionParams, select
from tip.signals import (
    SIGNAL_ROWS,
    TokenSignals,
    common_vocab,
    divergence,
    log_probs,
    row_signals,
    softcap,
)
from tip.taxonomy import BatchStats, quadrant_labels

QUADRANTS = ("Q1", "Q2", "Q3", "Q4")
TOKEN_STATS = ("entropy", "reverse_kl", "forward_kl", "logit_signal", "curvature")
"""Per-token numbers the probe averages per quadrant (``ProbedTokens``)."""


def tail_parameters(model, blocks: int) -> list[torch.nn.Parameter]:
    """The last ``blocks`` decoder layers, the final norm and the output layer (a tied output layer
    is the input embedding: its gradient is then the output layer's part only, because
    ``cut_before_tail`` detaches the tail's input)."""
    decoder = model.get_decoder()
    layers = list(decoder.layers)
    if not 1 <= blocks <= len(layers):
        raise ConfigError(f"probe.blocks={blocks} is not allowed: expected 1 to {len(layers)} "
                          "(the student's decoder layers)")
    modules = [*layers[-blocks:], decoder.norm, model.get_output_embeddings()]
    params, seen = [], set()
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def train_tail_only(model, blocks: int) -> list[torch.nn.Parameter]:
    """``tail_parameters``, the only parameters of ``model`` that require gradients from now on."""
    params = tail_parameters(model, blocks)
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


@contextmanager
def cut_before_tail(model, blocks: int):
    """While inside, the first tail block's input hidden states are detached: backward runs through
    the tail and the output layer only (with a tied embedding, the input lookup would otherwise pull
    the gradient through every frozen block)."""
    def detach(module, args, kwargs):
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    handle = list(model.get_decoder().layers)[-blocks].register_forward_pre_hook(
        detach, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class ProbedTokens:
    """A batch's valid response tokens, flat (N,) in the order of ``RolloutBatch.target_mask``."""

    losses: torch.Tensor  # (N,) the run's divergence per token, with graph to the tail parameters
    stats: dict[str, torch.Tensor]  # TOKEN_STATS, (N,) each, without graph
    signals: TokenSignals  # (B, T-1) for the selection rules


def probe_tokens(student, teacher, batch: RolloutBatch, kind: str, beta: float,
                 blocks: int) -> ProbedTokens:
    """Score ``batch``: the student's forward keeps a graph from its last ``blocks`` blocks on (its
    other parameters must not require gradients), the teacher's none."""
    mask = batch.target_mask
    valid = mask.reshape(-1).nonzero(as_tuple=True)[0]

    def response_logits(model):
        hidden = hidden_states(model, batch.input_ids, batch.attention_mask)[:, :-1]
        logits = model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[valid])
        return softcap(logits, final_logit_softcap(model))

    with torch.no_grad():
        t_logits = response_logits(teacher)
    with cut_before_tail(student, blocks):
        s_logits = response_logits(student)
    s_logits, t_logits = common_vocab(s_logits, t_logits)
    logp_s, logp_t = log_probs(s_logits), log_probs(t_logits)
    losses = divergence(logp_s, logp_t, kind, beta)
    with torch.no_grad():
        rows = row_signals(logp_s, logp_t)
        p_s, p_t = logp_s.exp(), logp_t.exp()
        stats = {"entropy": rows[0], "reverse_kl": rows[1].clamp_min(0),
                 "forward_kl": rows[2].clamp_min(0),
                 "logit_signal": (p_s - p_t).square().sum(-1),
                 "curvature": 1 - p_s.square().sum(-1)}
        flat = torch.zeros(len(SIGNAL_ROWS), mask.numel(), device=mask.device)
        flat[:, valid] = rows
        signals = TokenSignals.from_flat(flat, mask)
    return ProbedTokens(losses, stats, signals)


def summed_gradient(losses: torch.Tensor, params: list, weights: torch.Tensor) -> torch.Tensor:
    """The flat gradient of sum_t weights_t * losses_t over ``params`` (zeros for an empty set; the
    graph is kept for the next set)."""
    grads = torch.autograd.grad(losses, params, grad_outputs=weights.to(losses.dtype),
                                retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                      for p, g in zip(params, grads)])


def quadrant_masks(tokens: ProbedTokens, absolute: dict | None = None) -> dict[str, torch.Tensor]:
    """(N,) bool per quadrant: median thresholds of the batch's own valid tokens (as a run labels
    them), or ``absolute`` ones (``entropy``: h, ``divergence``: delta in nats)."""
    sig = tokens.signals
    stats = BatchStats.of(sig.entropy[sig.mask], sig.reverse_kl[sig.mask])
    h_cut = "median" if absolute is None else float(absolute["entropy"])
    d_cut = "median" if absolute is None else float(absolute["divergence"])
    labels = quadrant_labels(sig.entropy, sig.reverse_kl, sig.mask, h_cut, d_cut, stats)[sig.mask]
    return {q: labels == i + 1 for i, q in enumerate(QUADRANTS)}


def rule_params(cfg: DictConfig) -> dict[str, SelectionParams]:
    """Each of ``probe.rules`` as a run of it would select: the run's shared selection settings, the
    rule's own parameters (the configured selector's as configured, every other rule's from its
    own file)."""
    run = SelectionParams.of(cfg.selector, cfg.selection)
    return {rule: selection_of(run, rule) for rule in cfg.probe.rules}


def rule_mask(tokens: ProbedTokens, params: SelectionParams, keep: float,
              seed: int) -> torch.Tensor:
    """(N,) bool: the tokens the rule keeps at ``keep``, by the selection code training runs."""
    sig = tokens.signals
    generator = torch.Generator(device=sig.mask.device).manual_seed(seed)
    stats = BatchStats.of(sig.entropy[sig.mask], sig.reverse_kl[sig.mask], params.clip_quantile)
    return select(params, sig, keep, generator, stats).kept[sig.mask]


def token_alignments(losses: torch.Tensor, params: list, direction: torch.Tensor) -> torch.Tensor:
    """(N,) <grad of losses_t, direction> for every token t at once: the gradient of sum_t u_t
    losses_t is built with its graph (u = 0), its inner product with ``direction`` differentiated
    in u (the double-backward form of a Jacobian-vector product). Needs attention kernels with a
    double backward (eager: torch's SDPA kernels on CPU have none)."""
    u = torch.zeros_like(losses, requires_grad=True)
    grads = torch.autograd.grad(losses, params, grad_outputs=u, create_graph=True,
                                retain_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    (alignment,) = torch.autograd.grad(flat.double() @ direction, u)
    return alignment.double()


def probe_batch(student, teacher, probed: RolloutBatch, held_out: RolloutBatch, cfg,
                seed: int) -> dict:
    """Every measurement of one (probed, held-out) pair of batches (module docstring). Sums over
    token sets come from the per-token alignments (linear in the set); a rule's cosine needs its
    own gradient's norm, one backward per rule and keep."""
    params = train_tail_only(student, cfg.probe.blocks)
    kind, beta = cfg.divergence.name, cfg.divergence.beta
    held = probe_tokens(student, teacher, held_out, kind, beta, cfg.probe.blocks)
    g_ho = summed_gradient(held.losses, params, torch.ones_like(held.losses))
    del held
    tokens = probe_tokens(student, teacher, probed, kind, beta, cfg.probe.blocks)
    n = tokens.losses.numel()
    g_all = summed_gradient(tokens.losses, params, torch.ones_like(tokens.losses))
    phi = token_alignments(tokens.losses, params, g_ho)  # <g_t, g_ho>
    psi = token_alignments(tokens.losses, params, g_all)  # <g_t, g_all>
    descent = float(phi.sum())
    out = {"tokens": n, "held_out_tokens": int(held_out.target_mask.sum()),
           "tail_parameters": sum(p.numel() for p in params), "all_descent": descent,
           "all_descent_direct": float(g_all @ g_ho), "quadrants": {}, "rules": []}
    masks = {scheme: quadrant_masks(tokens, absolute)
             for scheme, absolute in (("median", None), ("absolute", cfg.probe.absolute))}
    for scheme, by_quadrant in masks.items():
        rows = {}
        for q, m in by_quadrant.items():
            count = int(m.sum())
            aligned = float(phi[m].sum())
            rows[q] = {"share": count / n, "descent_share": aligned / descent,
                       "phi": aligned / count if count else None,
                       "phi_relative": (aligned / count) / (descent / n) if count else None,
                       **{s: float(tokens.stats[s][m].mean()) if count else None
                          for s in TOKEN_STATS}}
        out["quadrants"][scheme] = rows
    q3 = masks["median"]["Q3"]
    q3_descent = float(phi[q3].sum())
    all_norm = float(g_all.norm())
    for rule, rule_selection in rule_params(cfg).items():
        for keep in cfg.probe.keeps:
            kept = rule_mask(tokens, rule_selection, float(keep), seed)
            norm = float(summed_gradient(tokens.losses, params, kept.float()).norm())
            out["rules"].append({
                "rule": rule, "keep": float(keep), "kept_frac": float(kept.float().mean()),
                "descent_share": float(phi[kept].sum()) / descent,
                "cosine_with_all": float(psi[kept].sum()) / max(norm * all_norm, 1e-300),
                "q3_descent_share": float(phi[kept & q3].sum()) / q3_descent
                if q3_descent else None})
    return out


def student_rollouts(student, tokenizer, prompt_ids: list[list[int]], cfg) -> RolloutBatch:
    return hf_generate(student, tokenizer, prompt_ids, n=cfg.probe.samples, temperature=1.0,
                       max_new_tokens=cfg.probe.max_new_tokens)


def check_probe(cfg) -> None:
    pr = cfg.probe
    for key in ("prompts", "samples", "max_new_tokens", "blocks", "batches"):
        if not isinstance(pr[key], int) or isinstance(pr[key], bool) or pr[key] < 1:
            raise ConfigError(f"probe.{key}={pr[key]!r} is not allowed: expected an integer >= 1")
    for rule in pr.rules:
        if rule not in RULES:
            raise ConfigError(f"probe.rules: {rule!r} is not a rule; known: {', '.join(RULES)}")
    for key in ("entropy", "divergence"):
        value = pr.absolute.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"probe.absolute.{key}={value!r} is not allowed: expected a number "
                              ">= 0 (h normalised, delta in nats)")
    for keep in pr.keeps:
        if not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ConfigError(f"probe.keeps: {keep!r} is not allowed: expected numbers in (0, 1]")


def run_probe(cfg: DictConfig, run_dir: Path) -> dict:
    """``probe.batches`` independent (probed, held-out) pairs of batches from disjoint prompts."""
    from tip.data import load_examples
    from tip.parts import training_prompt_ids

    check_config(cfg)
    check_probe(cfg)
    if (run_dir / "probe.json").exists():
        raise ConfigError(f"{run_dir / 'probe.json'} exists: a finished probe is never "
                          "overwritten; choose another hydra.run.dir")
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from tip.engine import resolve_precision

    dtype = resolve_precision(cfg.precision, device)
    tokenizer = load_tokenizer(cfg.pair.tokenizer or cfg.pair.student)
    examples = load_examples(cfg.data.source, "train")
    need = 2 * cfg.probe.prompts * cfg.probe.batches
    if len(examples) < need:
        raise ConfigError(f"probe needs {need} training prompts (2 x probe.prompts x "
                          f"probe.batches), the data has {len(examples)}")
    order = torch.randperm(len(examples), device="cpu",
                           generator=torch.Generator(device="cpu").manual_seed(cfg.seed))
    prompts = training_prompt_ids(cfg, tokenizer, [examples[i] for i in order[:need].tolist()])
    attention = resolve_attention(cfg.model.attn_implementation, device.type)
    # the student's tail is differentiated twice (token_alignments): eager attention has a double
    # backward, torch's fused SDPA kernels do not
    student = load_model(cfg.pair.student, dtype, "student", "eager").to(device).eval()
    teacher = load_model(cfg.pair.teacher, dtype, "teacher", attention).to(device).eval()
    teacher.requires_grad_(False)
    batches, p = [], cfg.probe.prompts
    for b in range(cfg.probe.batches):
        t0 = time.time()
        torch.manual_seed(cfg.seed + b)
        chunk = prompts[2 * p * b: 2 * p * (b + 1)]
        probed = student_rollouts(student, tokenizer, chunk[:p], cfg).to(device)
        held_out = student_rollouts(student, tokenizer, chunk[p:], cfg).to(device)
        batches.append(probe_batch(student, teacher, probed, held_out, cfg, cfg.seed + b))
        batches[-1]["seconds"] = round(time.time() - t0, 1)
        print(f"batch {b + 1}/{cfg.probe.batches}: {batches[-1]['tokens']} tokens, "
              f"{batches[-1]['seconds']} s", flush=True)
    result = {"pair": {"student": cfg.pair.student, "teacher": cfg.pair.teacher},
              "divergence": cfg.divergence.name,
              "probe": OmegaConf.to_container(cfg.probe, resolve=True), "batches": batches}
    result["verdicts"] = verdicts(result)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    (run_dir / "probe.md").write_text(render(result) + "\n")
    plot(result, run_dir / "probe.png")
    print(render(result), flush=True)
    print(f"wrote probe.json, probe.md and probe.png to {run_dir}", flush=True)
    return result


def _phi(batch: dict, q: str) -> float | None:
    return batch["quadrants"]["median"][q]["phi"]


def _rule(batch: dict, rule: str, keep: float) -> dict | None:
    return next((r for r in batch["rules"] if r["rule"] == rule and r["keep"] == keep), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


PREDICTIONS = {
    # name: (what the paper predicts, the value per batch, when it holds) — docs/probe.md,
    # pre-registered in commit aa0fab7
    "P1": ("Q3's per-token phi far above Q4's",
           lambda b: _ratio(_phi(b, "Q3"), _phi(b, "Q4")),
           lambda b, v: None not in (_phi(b, "Q3"), _phi(b, "Q4")) and _phi(b, "Q3") > 0
           and _phi(b, "Q3") >= 3 * _phi(b, "Q4")),
    "P2": ("Q3's per-token phi near Q1's",
           lambda b: _ratio(_phi(b, "Q3"), _phi(b, "Q1")),
           lambda b, v: v is not None and _phi(b, "Q1") > 0 and 0.5 <= v <= 2),
    "P3": ("q3 at keep 0.1 captures most of the all-token descent",
           lambda b: (_rule(b, "q3", 0.1) or {}).get("descent_share"),
           lambda b, v: v is not None and v >= 0.5),
    "P4": ("entropy sampling at 10% captures little of Q3's part",
           lambda b: (_rule(b, "entropy_sample", 0.1) or {}).get("q3_descent_share"),
           lambda b, v: v is not None and v <= 0.2),
}
"""The paper's predictions the probe decides (docs/probe.md): each holds or not on each batch; over
the batches a prediction is reproduced (holds on all), not reproduced (on none) or inconclusive
(on some; the pre-registration called it "mixed"), by ``tip.claims.by_batches``."""


def verdicts(result: dict) -> dict[str, dict]:
    out = {}
    for name, (claim, value, holds) in PREDICTIONS.items():
        values = [value(b) for b in result["batches"]]
        held = [bool(holds(b, v)) for b, v in zip(result["batches"], values)]
        out[name] = {"claim": claim, "values": values, "holds": held,
                     "verdict": by_batches(held)}
    return out


def _mean_spread(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "–"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} [{min(vals):.3f}, {max(vals):.3f}]"


def render(result: dict) -> str:
    """Markdown tables: mean over batches, [min, max] across them."""
    batches = result["batches"]
    lines = [f"# tip.probe: {result['pair']['teacher']} -> {result['pair']['student']}",
             "", f"{len(batches)} batches, {batches[0]['tokens']} probed tokens in the first; "
             f"divergence {result['divergence']}; gradients over the last "
             f"{result['probe']['blocks']} block(s) and the output layer "
             f"({batches[0]['tail_parameters']:,} parameters). Each cell: mean over batches [min, "
             "max].", ""]
    for scheme in ("median", "absolute"):
        lines += [f"## Quadrants, {scheme} thresholds", "",
                  "| quadrant | share | descent share | phi / mean phi | h | delta | delta_fwd | "
                  "||p_S-p_T||^2 | curvature |", "|---|---|---|---|---|---|---|---|---|"]
        for q in QUADRANTS:
            cells = [_mean_spread([b["quadrants"][scheme][q][k] for b in batches])
                     for k in ("share", "descent_share", "phi_relative", *TOKEN_STATS)]
            lines.append(f"| {q} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## The paper's predictions (pre-registered: docs/probe.md)", "",
              "| # | prediction | value per batch | holds per batch | verdict |",
              "|---|---|---|---|---|"]
    for name, v in verdicts(result).items():
        values = ", ".join("–" if x is None else f"{x:.3f}" for x in v["values"])
        lines.append(f"| {name} | {v['claim']} | {values} | "
                     f"{', '.join('yes' if h else 'no' for h in v['holds'])} | {v['verdict']} |")
    lines += ["", "## Rules", "", "| rule | keep | kept | descent share | cosine with all | "
              "share of Q3's descent |", "|---|---|---|---|---|---|"]
    for i, row in enumerate(batches[0]["rules"]):
        cells = [_mean_spread([b["rules"][i][k] for b in batches])
                 for k in ("kept_frac", "descent_share", "cosine_with_all", "q3_descent_share")]
        lines.append(f"| {row['rule']} | {row['keep']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Per-quadrant phi relative to the mean token's (median thresholds), and each rule's share of
    the all-token descent against keep."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is an extra; the tables hold the numbers
        return
    batches = result["batches"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for b in batches:
        ax1.plot(QUADRANTS, [b["quadrants"]["median"][q]["phi_relative"] or 0 for q in QUADRANTS],
                 "o", color="tab:blue", alpha=0.7)
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_ylabel("phi / mean token's phi")
    ax1.set_title("per-token alignment by quadrant")
    rules = list(dict.fromkeys(r["rule"] for r in batches[0]["rules"]))
    for rule in rules:
        rows = [i for i, r in enumerate(batches[0]["rules"]) if r["rule"] == rule]
        keeps = [batches[0]["rules"][i]["keep"] for i in rows]
        shares = [sum(b["rules"][i]["descent_share"] for b in batches) / len(batches)
                  for i in rows]
        ax2.plot(keeps, shares, "o-", label=rule)
    ax2.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax2.set_xlabel("keep")
    ax2.set_ylabel("share of all-token descent")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    with one_line_errors(multirun=False):
        run_probe(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    require_conf_dir()
    hydra_main()


if __name__ == "__main__":
    main()
