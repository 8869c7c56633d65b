"""The paper's predictions the probe decides, pre-registered (docs/probe.md), and their verdicts."""

from __future__ import annotations

from tip.claims import SANITY_CHECK, by_batches


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


SANITY_CHECKS = {"P4": "entropy sampling draws by entropy and Q3 is the low-entropy half"}
"""Predictions true by construction (issue 39): reported, with whether they held, as a sanity
check, never as evidence."""


def verdicts(result: dict) -> dict[str, dict]:
    out = {}
    for name, (claim, value, holds) in PREDICTIONS.items():
        values = [value(b) for b in result["batches"]]
        held = [bool(holds(b, v)) for b, v in zip(result["batches"], values)]
        out[name] = {"claim": claim, "values": values, "holds": held,
                     "verdict": SANITY_CHECK if name in SANITY_CHECKS else by_batches(held)}
    return out
