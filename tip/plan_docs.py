"""The memory tables the docs show, written from ``tip.plan``: docs/paper_plans.md (every paper
overlay's plan) and the summary table in docs/gpus.md.

    python -m tip.plan_docs      # rewrite both from the code (tests fail when they drift)
"""

from __future__ import annotations

from pathlib import Path

from tip.config import REPO_ROOT
from tip.memory_plan import GB, PHASES, driver_total
from tip.plan import estimate, render

PAPER_RUNS = [("paper_qwen3_8b_to_4b", 8, "Qwen3-8B → 4B"),
              ("paper_llama70b_to_8b", 8, "Llama-3.3-70B → 3.1-8B"),
              ("paper_qwen25_14b_to_1p5b", 4, "Qwen2.5-14B → 1.5B"),
              ("paper_qwen3_14b_to_1p7b", 8, "Qwen3-14B → 1.7B"),
              ("paper_qwen3_32b_to_1p7b", 8, "Qwen3-32B → 1.7B")]
"""The paper overlays and the GPUs each plan is printed for (docs/paper_plans.md, docs/gpus.md)."""
TABLE_START, TABLE_END = "<!-- tip.plan table: start -->", "<!-- tip.plan table: end -->"


def paper_docs() -> tuple[str, str]:
    """docs/paper_plans.md, and the summary table docs/gpus.md holds between ``TABLE_START`` and
    ``TABLE_END``: both written by ``python -m tip.plan_docs`` (tests check they do not
    drift from the code)."""
    pages = ["# tip.plan of each paper overlay", "",
             "Per-GPU memory of the paper's math runs on 80 GB GPUs, as `python -m tip.plan` "
             "prints it before any weights load (the models' shapes from "
             "tip/assets/model_configs/; the DAPO-Math prompts not at hand, so at the paper's "
             "2,048-token maximum). Written by `python -m tip.plan_docs`; a test fails when the "
             "code and this page differ.",
             "", "How far to trust it: docs/results/measurements.md, \"tip.plan against measured "
             "peaks\"."]
    rows = ["| overlay | GPUs | resident | + scoring | + gradient pass | + rollout (vLLM) | "
            "+ evaluation | peak, GB (phase) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for overlay, gpus, pair in PAPER_RUNS:
        overrides = [f"experiment={overlay}"]
        plan, header = estimate(overrides, gpus, prompt_tokens=None)
        flag = f"--gpus {gpus} " if gpus != 8 else ""
        pages += ["", f"## {overlay}", "", f"`python -m tip.plan {flag}experiment={overlay}`", "",
                  "```", render(plan, header, driver_total(80.0)), "```"]
        phases = [plan.phase_bytes(p) / GB for p in ("resident", *PHASES)]
        rows.append(f"| `{overlay}` ({pair}) | {gpus} | "
                    + " | ".join(f"{x:.1f}" for x in phases)
                    + f" | **{plan.peak / GB:.1f}** ({plan.peak_phase}) |")
    return "\n".join(pages) + "\n", "\n".join(rows)


def write_docs(root: Path) -> None:
    page, table = paper_docs()
    (root / "docs" / "paper_plans.md").write_text(page)
    gpus = root / "docs" / "gpus.md"
    text = gpus.read_text()
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    gpus.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")




if __name__ == "__main__":
    write_docs(REPO_ROOT)
