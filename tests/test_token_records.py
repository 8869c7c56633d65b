"""Token records (train.token_log_every): every column against the step's own numbers, recomputed from the models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tip.data import prompt_token_ids
from tip.keep import keep_count
from tip.microscope import compare_rules
from tip.models import resolve_model_ref
from tip.selection import select_tokens
from tip.signals import TokenSignals, log_probs, row_signals, top1_rows
from tip.taxonomy import quadrant_labels
from tip.token_records import COLUMNS, logged_steps, read_token_records, stats_of
from tip.train import train

from support import compose_config, read_metrics

OVERRIDES = ["experiment=smoke", "logger=none", "train.steps=1", "train.eval_before=false",
             "eval.benchmarks.embedded.source.size=4", "train.save_final=false"]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("records") / "run"
    cfg = compose_config(*OVERRIDES)
    train(cfg, run_dir)
    cols, meta = read_token_records(run_dir, 1)
    return run_dir, cfg, cols, meta


def _rollouts(cols):
    """{(rank, rollout): [record index in position order]}"""
    out = {}
    for i, key in enumerate(zip(cols["rank"], cols["rollout"])):
        out.setdefault(key, []).append(i)
    return {k: sorted(v, key=lambda i: cols["position"][i]) for k, v in out.items()}


def test_the_records_hold_the_steps_signals_recomputed_from_the_models(recorded_run):
    """Step 1's records were taken before its update, so the shipped student and teacher give them again: each
    rollout is rebuilt from its prompt text and its recorded tokens and run through both models alone."""
    run_dir, cfg, cols, meta = recorded_run
    assert list(cols) == list(COLUMNS)
    tok = AutoTokenizer.from_pretrained(resolve_model_ref("embedded://student"))
    student, teacher = (AutoModelForCausalLM.from_pretrained(resolve_model_ref(f"embedded://{m}")).eval()
                        for m in ("student", "teacher"))
    rollouts = _rollouts(cols)
    assert len(rollouts) == cfg.train.prompts_per_step * cfg.rollout.n
    for idx in rollouts.values():
        assert [cols["position"][i] for i in idx] == list(range(len(idx)))
        (prompt,) = prompt_token_ids(tok, [cols["prompt_text"][idx[0]]], cfg.data.prompt_template,
                                     cfg.pair.chat_template, cfg.pair.chat_template_kwargs)
        response = [cols["token_id"][i] for i in idx]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            s, t = (log_probs(m(ids).logits[0, len(prompt) - 1: -1]) for m in (student, teacher))
        h, rkl, fkl, h_teacher = row_signals(s, t)
        top = top1_rows(s, t)
        for name, want in (("h", h), ("delta", rkl), ("delta_fwd", fkl), ("h_teacher", h_teacher),
                           ("student_top_p", top[1]), ("teacher_top_p", top[3])):
            got = torch.tensor([cols[name][i] for i in idx])
            torch.testing.assert_close(got, want.clamp_min(0) if name.startswith("delta") else want,
                                       rtol=1e-3, atol=2e-5, msg=name)
        assert [cols["student_top_id"][i] for i in idx] == top[0].long().tolist()
        assert [cols["teacher_top_id"][i] for i in idx] == top[2].long().tolist()
        assert [cols["token"][i] for i in idx] == [tok.decode([t]) for t in response]
        assert [cols["student_top"][i] for i in idx] == [tok.decode([t]) for t in top[0].long().tolist()]


def test_the_records_hold_what_selection_and_taxonomy_made_of_them(recorded_run):
    run_dir, cfg, cols, meta = recorded_run
    stats = stats_of(meta["batch_stats"])
    assert (meta["selector"], meta["keep"], meta["scope"]) == ("soft_or", 0.5, "sequence")
    h, d = torch.tensor(cols["h"]), torch.tensor(cols["delta"])
    h_hat = (h.clamp(max=stats.entropy_cap) - stats.entropy_min) / (stats.entropy_cap - stats.entropy_min)
    d_hat = (d - stats.divergence_min) / (stats.divergence_max - stats.divergence_min)
    torch.testing.assert_close(torch.tensor(cols["h_hat"]), h_hat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(cols["d_hat"]), d_hat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(cols["score"]), h_hat + d_hat - h_hat * d_hat, rtol=1e-5, atol=1e-6)
    labels = quadrant_labels(h, d, torch.ones_like(h, dtype=torch.bool), stats=stats)
    assert cols["quadrant"] == labels.tolist()
    for idx in _rollouts(cols).values():  # soft_or keeps the top floor(rho m) scores of each rollout
        kept = [cols["kept"][i] for i in idx]
        assert sum(kept) == int(keep_count(torch.tensor(len(idx)), 0.5))
        scores = [cols["score"][i] for i in idx]
        assert min(s for s, k in zip(scores, kept) if k) >= max((s for s, k in zip(scores, kept) if not k), default=-1)
    (row,) = read_metrics(run_dir, "train")
    assert row["valid_tokens"] == len(cols["h"]) and row["kept_tokens"] == sum(cols["kept"])
    assert row["mean_h"] == pytest.approx(float(h.double().mean()), rel=1e-5)
    assert row["q3/frac"] == pytest.approx(cols["quadrant"].count(3) / len(cols["quadrant"]), rel=1e-9)


def test_the_rule_comparison_is_select_tokens_on_the_same_signals(recorded_run):
    """The page's comparison re-runs each rule on the logged signals. For the run's own rule it gives back exactly
    what the run kept; for others it equals select_tokens run rollout by rollout (scope=sequence) with the step's
    statistics."""
    _, _, cols, meta = recorded_run
    comparison = compare_rules(cols, meta, [0.2, 0.5])
    assert comparison["soft_or"]["0.5"] == list(cols["kept"])
    assert "jsd" not in cols and "entropy_jsd_sample" not in comparison  # its signal was not computed
    stats = stats_of(meta["batch_stats"])
    for rule in ("q3", "entropy_topk", "div_topk", "soft_or_bottom", "q1", "all"):
        for keep in (0.2, 0.5):
            want = [False] * len(cols["h"])
            for idx in _rollouts(cols).values():
                sig = TokenSignals(*(torch.tensor([[cols[c][i] for i in idx]]) for c in ("h", "delta", "delta_fwd")),
                                   torch.ones(1, len(idx), dtype=torch.bool))
                kept = select_tokens(rule, sig, keep, None, clip_quantile=meta["clip_quantile"], norm_scope="batch",
                                     entropy_alpha=meta["entropy_alpha"], stats=stats)[0]
                for i, flag in zip(idx, kept.tolist()):
                    want[i] = flag
            assert comparison[rule][f"{keep:g}"] == want, (rule, keep)


def test_records_are_written_at_every_nth_step_only(tmp_path):
    """(With a rule that reads the optional JSD signal, which its records then hold and the comparison re-runs.)"""
    run_dir = tmp_path / "run"
    train(compose_config(*OVERRIDES, "train.steps=3", "train.token_log_every=2", "selector=entropy_jsd_sample",
                         "keep=0.3"), run_dir)
    assert logged_steps(run_dir) == [2]
    assert sorted(p.name for p in (run_dir / "tokens").iterdir()) == ["step_000002.json",
                                                                      "step_000002.rank0.parquet"]
    rows = read_metrics(run_dir, "train")
    assert ["token_log_s" in r for r in rows] == [False, True, False]
    cols, meta = read_token_records(run_dir, 2)
    assert list(cols) == [*COLUMNS, "jsd"] and meta["jsd_gamma"] == 1.0
    assert all(0.0 <= x <= 1.0 for x in cols["jsd"]) and max(cols["jsd"]) > 0
    comparison = compare_rules(cols, meta, [0.3])
    kept = comparison["entropy_jsd_sample"]["0.3"]
    assert 0.15 * len(kept) < sum(kept) <= 0.3 * len(kept)
