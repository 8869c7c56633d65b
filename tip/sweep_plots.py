"""A sweep's plots: accuracy against the fraction of tokens in the loss, and each quadrant's
share of the kept tokens over training."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

from tip.sweep_cells import Cell, rule_rank
from tip.taxonomy import QUADRANT_NAMES, QUADRANTS


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Write ``fig`` to ``path`` (PNG) under a temporary name, rename it into place, and release
    it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)


def plot(rows: list[dict], benchmarks: list[str], title: str, path: Path) -> None:
    """Accuracy against kept-token fraction, one line per rule; baselines as horizontal lines."""
    plt = pyplot()
    fig, axes = plt.subplots(1, max(1, len(benchmarks)),
                             figsize=(5.5 * max(1, len(benchmarks)), 4.2), squeeze=False)
    for ax, bench in zip(axes[0], benchmarks or ["(no finished cell)"]):
        acc, std = f"{bench}/accuracy", f"{bench}/accuracy_std"
        for r in rows:
            if r["rule"] in ("all", "untrained") and not math.isnan(r.get(acc, math.nan)):
                style = ("--", "tab:gray") if r["rule"] == "all" else (":", "black")
                name = "all tokens (baseline)" if r["rule"] == "all" else "untrained student"
                ax.axhline(100 * r[acc], ls=style[0], color=style[1],
                           label=name + (f" {r['variant']}" if r["variant"]
                                                                                      else ""))
                if r["rule"] == "all" and r[std] > 0:
                    ax.axhspan(100 * (r[acc] - r[std]), 100 * (r[acc] + r[std]), color=style[1],
                               alpha=0.12)
        lines: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["rule"] not in ("all", "untrained") and not math.isnan(r.get(acc, math.nan)):
                lines.setdefault((r["rule"], r["variant"]), []).append(r)
        for (rule, variant), pts in lines.items():
            pts.sort(key=lambda r: r["kept_frac"])
            ax.errorbar([r["kept_frac"] for r in pts], [100 * r[acc] for r in pts],
                        yerr=[100 * r[std] for r in pts], marker="o", capsize=3,
                        label=rule + (f" {variant}" if variant else ""))
        ax.set_xlabel("fraction of response tokens in the loss")
        ax.set_ylabel(f"{bench} accuracy (%)")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def kept_share_series(cells: list[Cell]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{cell label (and variant): {quadrant: [(step, share of the kept tokens, mean over
    seeds)]}}``."""
    grouped: dict[str, list[Cell]] = {}
    for c in cells:
        if c.kept_shares and c.rule != "untrained":
            grouped.setdefault(c.label + (f" {c.variant}" if c.variant else ""), []).append(c)
    series = {}
    for name, group in sorted(grouped.items(), key=lambda kv: (rule_rank(kv[1][0].rule), kv[0])):
        steps = sorted(set().union(*(c.kept_shares for c in group)))
        series[name] = {q: [(s,
                             statistics.fmean(c.kept_shares[s][q] for c in group
                                              if q in c.kept_shares.get(s, {})))
                            for s in steps if any(q in c.kept_shares.get(s, {}) for c in group)]
                        for q in QUADRANTS}
    return series


def plot_kept_shares(cells: list[Cell], title: str, path: Path) -> None:
    """Each quadrant's share of the kept tokens over training steps, one line per rule (mean over
    seeds)."""
    plt = pyplot()
    series = kept_share_series(cells)
    fig, axes = plt.subplots(1, len(QUADRANTS), figsize=(4.2 * len(QUADRANTS), 3.8), sharey=True,
                             squeeze=False)
    for ax, q in zip(axes[0], QUADRANTS):
        for name, by_q in series.items():
            points = by_q[q]
            ax.plot([s for s, _ in points], [100 * v for _, v in points], marker="o", ms=3,
                    label=name)
        ax.set_title(f"{q.upper()} ({QUADRANT_NAMES[q]})", fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of the kept tokens (%)")
    axes[0][0].set_ylim(0, 100)
    if series:
        axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{title}: where each rule's kept tokens lie, step by step")
    fig.tight_layout()
    save_figure(fig, path)


