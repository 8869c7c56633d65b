"""Testbed v2 (issue 31): the cipher task, the build's targets, each measured quantity against a direct
computation, the pre-registered decision rule on rows whose answer is known, and a small sweep end to end."""

import json
import math
import statistics
from dataclasses import replace

import pytest
import torch

from tip.signals import TokenSignals, log_probs
from tip.stats import t_quantile
from tip.testbed.cipher import build as v2
from tip.testbed.cipher import decide as v2_decide
from tip.testbed.cipher.build import ERROR_KINDS, LENGTH, PARTS, Cipher, target_distributions
from tip.testbed.cipher.opd import BUDGET, Pair, cell_loss, heldout, kind_masks, train_cell
from tip.testbed.cipher.sweep import absolute_labels, check_grid, precision_recall, run
from tip.testbed.tiny import build_tokenizer


def test_the_cipher_plants_each_part_and_splits_train_from_held_out():
    cipher = Cipher.of_seed(0)
    assert {p: len(cipher.letters_of(p)) for p in PARTS} == {p: n for p, (n, _) in PARTS.items()}
    assert len(set(cipher.code.values())) == 16  # one code per letter
    for letter, wrong in cipher.wrong.items():
        assert cipher.part[letter] in ERROR_KINDS and wrong != cipher.code[letter]
    for letter, alt in cipher.alternative.items():
        assert cipher.part[letter] == "choice" and alt not in cipher.code.values()
    train, test = cipher.prompts(2000, 0, "train"), cipher.prompts(300, 0, "test")
    assert not set(train) & set(test) and all(len(p) == LENGTH + 1 and p.endswith("=") for p in train)
    assert cipher.prompts(5, 3, "train") == cipher.prompts(5, 3, "train")
    assert Cipher.of_seed(1) != cipher  # an independent build draws its own map and parts
    letters = "".join(p[:-1] for p in train)
    for part, (_, share) in PARTS.items():  # the prompt letters' shares of each part
        assert abs(sum(letters.count(x) for x in cipher.letters_of(part)) / len(letters) - share) < 0.02
    prompt = train[0]
    assert cipher.answer(prompt) == "".join(cipher.code[x] for x in prompt[:-1])
    assert cipher.kinds(prompt) == [cipher.part[x] for x in prompt[:-1]] + ["ordinary"]
    with pytest.raises(ValueError, match="unknown split 'dev'; known: train, test"):
        cipher.prompts(1, 0, "dev")


def test_target_distributions_are_the_documented_ones():
    cipher, tok = Cipher.of_seed(0), build_tokenizer()
    prompt = "".join(cipher.letters_of(p)[0] for p in ("confident", "inconsistent", "choice", "ordinary")) * 3 + "="
    tid = lambda ch: tok.convert_tokens_to_ids(ch)
    ids, teacher = target_distributions(cipher, tok, [prompt], student=False)
    _, student = target_distributions(cipher, tok, [prompt], student=True)
    assert ids.shape == (1, 2 * LENGTH + 2) and ids[0, -1] == tok.eos_token_id
    for dist in (teacher, student):
        assert torch.allclose(dist.sum(-1), torch.ones(1, LENGTH + 1))
    conf, inc, choice, plain = prompt[:4]
    u = 0.08 / len(tok)
    assert teacher[0, 0, tid(cipher.code[conf])] == pytest.approx(0.92 + u)
    assert student[0, 0, tid(cipher.wrong[conf])] == pytest.approx(0.98)
    assert student[0, 0, tid(cipher.code[conf])] == pytest.approx(0.02)
    assert student[0, 1, tid(cipher.wrong[inc])] == pytest.approx(0.60 + u)
    assert student[0, 1, tid(cipher.code[inc])] == pytest.approx(0.32 + u)
    for dist in (teacher, student):
        assert dist[0, 2, tid(cipher.code[choice])] == pytest.approx(0.46 + u)
        assert dist[0, 2, tid(cipher.alternative[choice])] == pytest.approx(0.46 + u)
        assert dist[0, 3, tid(cipher.code[plain])] == pytest.approx(0.92 + u)
        assert dist[0, LENGTH, tok.eos_token_id] == pytest.approx(0.92 + u)


def test_kind_masks_mark_each_planted_position_and_stop_at_a_narrower_batch():
    cipher = Cipher.of_seed(0)
    conf, inc = cipher.letters_of("confident")[0], cipher.letters_of("inconsistent")[0]
    plain = cipher.letters_of("ordinary")[0]
    prompts = [conf + inc + plain * 10 + "=", plain * 11 + conf + "="]
    masks = kind_masks(cipher, prompts, [0, 1, 1], width=LENGTH + 13, start=LENGTH)
    assert masks["confident"].nonzero().tolist() == [[0, LENGTH], [1, 2 * LENGTH - 1], [2, 2 * LENGTH - 1]]
    assert masks["inconsistent"].nonzero().tolist() == [[0, LENGTH + 1]]
    narrow = kind_masks(cipher, prompts, [1], width=LENGTH + 5, start=LENGTH)
    assert not narrow["confident"].any()


def test_absolute_labels_and_their_precision_and_recall_against_a_hand_count():
    h = torch.tensor([[0.01, 0.02, 0.5, 0.6, 0.03, 0.9]])
    rkl = torch.tensor([[2.0, 0.1, 3.0, 0.2, 0.5, 0.0]])
    mask = torch.tensor([[True] * 5 + [False]])
    sig = TokenSignals(entropy=h, reverse_kl=rkl, forward_kl=rkl, mask=mask)
    differs = torch.tensor([[False, False, False, False, True, True]])
    # h's 33rd percentile of the five valid values is 0.02: positions 0, 1 are confident
    labels = absolute_labels(sig, differs)
    assert labels.tolist() == [[3, 4, 1, 2, 1, 0]]  # position 4: the argmaxes differ at 0.5 nats
    planted = torch.tensor([True, False, True, False, False])
    assert precision_recall(labels[mask] == 3, planted) == {"precision": 1.0, "recall": 0.5}
    assert precision_recall(labels[mask] == 1, planted) == {"precision": 0.5, "recall": 0.5}


def test_the_optimizer_arms_losses():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, True, True, False]])
    kept = torch.tensor([[True, False, True, True]])
    assert cell_loss(per_token, kept, mask, "adamw") == pytest.approx((1 + 3) / 2)  # the kept tokens' mean
    assert cell_loss(per_token, kept, mask, "sgd") == pytest.approx((1 + 3) / 3)  # over every valid token
    every = mask.clone()
    assert cell_loss(per_token, every, mask, "adamw") == cell_loss(per_token, every, mask, "sgd")


def test_t_quantile_matches_the_table():
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (10, 2.228)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-3)
    with pytest.raises(ValueError, match="0.5 < p < 1"):
        t_quantile(0.2, 3)


def rows_with(effect: dict, builds=(0, 1, 2, 3), seeds=(0, 1, 2), noise=0.01) -> list[dict]:
    """Cells.jsonl rows where each cell's logp at each kind is effect[(cell, kind)] plus a small build/seed offset."""
    cells = {c for c, _ in effect}
    rows = []
    for b in builds:
        for s in seeds:
            for opt in ("adamw", "sgd"):
                for cell in cells:
                    row = {"build": b, "cell": cell, "optimizer": opt, "seed": s}
                    for kind in ERROR_KINDS:
                        base = effect.get((cell, kind), 0.0)
                        row[f"logp@{kind}"] = base + noise * ((b * 7 + s * 3) % 5)
                        row[f"greedy@{kind}"] = row[f"logp@{kind}"]
                    rows.append(row)
    return rows


def test_the_decision_rule_reproduces_refutes_and_abstains_as_registered():
    effect = {("untrained", "confident"): -4.0, ("untrained", "inconsistent"): -1.0,
              ("all@1.0", "confident"): -1.0, ("all@1.0", "inconsistent"): -0.4,
              ("q3@0.1", "confident"): -1.5, ("q3@0.1", "inconsistent"): -0.9,
              ("entropy_sample@0.1", "confident"): -3.5, ("entropy_sample@0.1", "inconsistent"): -0.5,
              ("div_topk@0.1", "confident"): -1.52, ("div_topk@0.1", "inconsistent"): -0.9,
              ("soft_or@0.2", "confident"): -2.0, ("soft_or@0.2", "inconsistent"): -0.95}
    rows = rows_with(effect)
    for r in rows:  # div_topk differs from q3 by a build effect around 0, well inside +-0.1 nats
        if r["cell"] == "div_topk@0.1":
            shift = [0.02, -0.02, 0.01, -0.01][r["build"]]
            r["logp@confident"] = -1.5 + 0.01 * ((r["build"] * 7 + r["seed"] * 3) % 5) + shift
    decided = {(d["prediction"], d["optimizer"]): d for d in v2_decide.decide(rows)}
    assert decided[("P1", "adamw")]["verdict"] == "reproduced"
    assert decided[("P2", "sgd")]["verdict"] == "reproduced"
    # soft_or recovers 2/3 of all-token's gain at the confident error, 1/12 at the inconsistent one
    p3 = decided[("P3", "adamw")]
    assert [c["verdict"] for c in p3["comparisons"]] == ["reproduced", "not reproduced"]
    assert p3["verdict"] == "not reproduced"
    assert p3["comparisons"][0]["mean"] == pytest.approx((-2.0 + 4.0) - 0.5 * (-1.0 + 4.0))
    assert decided[("P4", "adamw")]["verdict"] == "not reproduced"  # within +-0.1 nats: equivalent
    assert decided[("P5", "adamw")]["verdict"] == "untestable"  # its cells were not run
    reverse = {k: (-v if k[0] in ("q3@0.1",) else v) for k, v in effect.items()}
    assert {d["verdict"] for d in v2_decide.decide(rows_with(reverse)) if d["prediction"] == "P1"} == {"reproduced"}


def test_a_prediction_whose_premise_never_holds_is_untestable():
    """P4 asks whether div-only and the Q3 score part on the confident error; where reverse and
    forward KL rank the planted kinds the same on every build (as on the sweep of 2026-12-03), its
    premise never holds and it is untestable, whatever its interval says (issue 39)."""
    effect = {("q3@0.1", "confident"): -1.5, ("div_topk@0.1", "confident"): -1.0}
    rows = rows_with(effect)  # div_topk clearly above: "differ" would be reproduced

    def build(rkl, fkl):
        return {"signals": {"kinds": {"confident": {"mean_rkl": rkl[0], "mean_fkl": fkl[0]},
                                      "inconsistent": {"mean_rkl": rkl[1], "mean_fkl": fkl[1]}}}}

    agree = {str(b): build((6.1, 3.2), (3.8, 1.0)) for b in range(4)}
    one_disagrees = {**agree, "3": build((6.1, 3.2), (0.9, 1.0))}
    p4 = lambda builds: next(d for d in v2_decide.decide(rows, "logp", builds)
                             if d["prediction"] == "P4" and d["optimizer"] == "adamw")
    assert p4(None)["verdict"] == "reproduced"
    assert p4(agree)["verdict"] == "untestable" and p4(agree)["premise"] == "never holds"
    assert p4(one_disagrees)["verdict"] == "reproduced"
    assert "**untestable** (its premise never holds)" in v2_decide.markdown(rows, agree)


def test_the_interval_is_the_t_interval_over_build_means():
    effect = {("q3@0.1", "confident"): 0.0, ("entropy_sample@0.1", "confident"): 0.0}
    rows = rows_with(effect, noise=0.0)
    for r in rows:  # a per-build effect the interval must carry
        if r["cell"] == "q3@0.1":
            r["logp@confident"] = [0.1, 0.3, 0.2, 0.6][r["build"]] + 0.01 * r["seed"]
    per_build = v2_decide.paired(rows, "adamw", "logp@confident", "q3@0.1", "entropy_sample@0.1")
    assert per_build == pytest.approx([0.11, 0.31, 0.21, 0.61])
    mean, lo, hi = v2_decide.interval(per_build)
    half = 3.182 * statistics.stdev(per_build) / 2
    assert (mean, lo, hi) == pytest.approx((0.31, 0.31 - half, 0.31 + half), abs=1e-3)
    assert v2_decide.verdict("greater", lo, hi) == ("reproduced" if lo > 0 else "inconclusive")
    assert v2_decide.verdict("differ", 0.05, 0.2) == v2_decide.verdict("differ", -0.3, -0.01) == "reproduced"
    assert v2_decide.verdict("differ", -0.05, 0.3) == "inconclusive"
    assert v2_decide.verdict("differ", -0.05, 0.09) == "not reproduced"


def test_a_bad_cell_or_optimizer_is_refused_before_any_model_loads():
    with pytest.raises(ValueError, match="unknown selector 'q9'; known: all"):
        check_grid(["q9@0.1"], ["adamw"])
    with pytest.raises(ValueError, match="cell 'q3': expected rule@keep"):
        check_grid(["q3"], ["adamw"])
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; known: adamw, sgd"):
        check_grid(["q3@0.1"], ["adam"])


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """A build at 1/20 of the steps (seconds): the loop's arithmetic, not the testbed's results."""
    cache = tmp_path_factory.mktemp("v2cache")
    torch.set_num_threads(2)
    v2.build(7, cache / "build_7", steps_scale=0.05)
    return cache


@torch.no_grad()
def test_heldout_metrics_against_a_direct_computation(small_pair):
    pair = Pair.load(small_pair / "build_7")
    prompts = pair.cipher.prompts(6, 5, "test")
    student, tok = pair.fresh_student(), pair.tok
    got = heldout(pair, student, prompts)
    # every planted kind, and (issue 39) every answer position: the whole task
    logps = {k: [] for k in (*ERROR_KINDS, "all")}
    hits = {k: [] for k in (*ERROR_KINDS, "all")}
    for prompt in prompts:  # one prompt at a time, one position at a time
        answer = pair.cipher.answer(prompt)
        for j, kind in enumerate(pair.cipher.kinds(prompt)[:LENGTH]):
            ids = torch.tensor([tok.convert_tokens_to_ids(list(prompt + answer[:j]))])
            logp = float(log_probs(student(input_ids=ids).logits[0, -1])[
                tok.convert_tokens_to_ids(answer[j])])
            logps["all"].append(logp)
            if kind in ERROR_KINDS:
                logps[kind].append(logp)
        greedy = student.generate(input_ids=torch.tensor([tok.convert_tokens_to_ids(list(prompt))]),
                                  max_new_tokens=LENGTH, min_new_tokens=LENGTH, do_sample=False,
                                  pad_token_id=tok.pad_token_id)[0, LENGTH + 1:]
        for j, kind in enumerate(pair.cipher.kinds(prompt)[:LENGTH]):
            hit = tok.convert_ids_to_tokens(int(greedy[j])) == answer[j]
            hits["all"].append(hit)
            if kind in ERROR_KINDS:
                hits[kind].append(hit)
    for kind in (*ERROR_KINDS, "all"):
        assert got[f"logp@{kind}"] == pytest.approx(statistics.fmean(logps[kind]), abs=1e-4)
        assert got[f"greedy@{kind}"] == pytest.approx(statistics.fmean(hits[kind]))


def test_a_cell_trains_and_reports_its_recall_and_kept_share(small_pair):
    pair = Pair.load(small_pair / "build_7")
    budget = replace(BUDGET, steps=2, prompts=2, samples=2)
    evals = pair.cipher.prompts(8, 5, "test")
    before = heldout(pair, pair.fresh_student(), evals)
    every = train_cell(pair, "all", 1.0, "sgd", 0, evals, budget)
    assert every["kept_share"] == 1.0 and all(every[f"recall@{k}"] == 1.0 for k in ERROR_KINDS)
    assert every["logp@confident"] != before["logp@confident"]  # it trained
    q3 = train_cell(pair, "q3", 0.1, "adamw", 0, evals, budget)
    assert 0 < q3["kept_share"] < 0.2 and len(q3["recall_per_step"]["confident"]) == 2
    assert all(0 <= r <= 1 for k in ERROR_KINDS for r in q3["recall_per_step"][k])
    assert pair.fresh_student().state_dict()["lm_head.weight"].equal(pair.student_state["lm_head.weight"])


def test_a_small_sweep_writes_cells_criteria_and_decisions_and_resumes(small_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("TIP_TESTBED_CACHE", str(small_pair))
    budget = replace(BUDGET, steps=1, prompts=2, samples=2)
    cells = ["untrained", "all@1.0", "q3@0.1", "entropy_sample@0.1"]
    out = run(tmp_path / "sweep", [7], [0], ["adamw"], cells, 8, budget)
    rows = [json.loads(x) for x in (out / "cells.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in rows] == cells
    info = json.loads((out / "builds.json").read_text())["7"]
    assert {c["name"] for c in info["criteria"]} >= {"all-token OPD (AdamW) lifts greedy@confident by >= 20 points"}
    for scheme in ("median", "absolute"):
        assert math.isclose(sum(info["signals"]["labels"][scheme]["shares"]), 1.0, abs_tol=1e-5)
    assert "P1 Q3 score fixes the confident error" in (out / "decisions.md").read_text()
    run(tmp_path / "sweep", [7], [0], ["adamw"], cells, 8, budget)  # finished cells are not run again
    assert len((out / "cells.jsonl").read_text().splitlines()) == len(cells)
