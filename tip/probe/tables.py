"""The probe's report: probe.md's tables and probe.png."""

from __future__ import annotations

import math
from pathlib import Path

from tip.probe.measure import QUADRANTS, TOKEN_STATS
from tip.probe.predictions import verdicts


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
