"""The token microscope: a self-contained HTML page of one step's token records.

    python -m tip.microscope <run dir> [step=S] [keeps=0.1,0.2,0.5] [out=page.html]

It shows the step's rollouts with every response token coloured by quadrant and the kept tokens
outlined (hover a token for its numbers and the student's and teacher's most likely tokens there); a
rule comparison (which tokens each selection rule would keep at a chosen keep, from the same logged
signals and batch statistics: rules are pure functions of them, so no model is needed); the h-delta
scatter coloured by quadrant (the paper's Fig. 2 view) and each quadrant's share of the tokens and
of the kept tokens over the run's steps. The page needs no network. Records come from
``train.token_log_every`` (``tip.token_records``); the page is written atomically to ``<run
dir>/microscope/step_<S>.html`` unless ``out=`` says otherwise.
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path

import torch

from tip.checkpoint import write_atomic
from tip.config import selection_of
from tip.selection import RULES, SelectionParams, select
from tip.signals import TokenSignals
from tip.sweep_cells import read_jsonl
from tip.sweep_plots import pyplot, save_figure
from tip.taxonomy import QUADRANT_NAMES, QUADRANTS
from tip.token_records import OPTIONAL_COLUMNS, logged_steps, read_token_records, stats_of

DEFAULT_KEEPS = (0.1, 0.2, 0.5)
COMPARISON_SEED = 0  # the stochastic rules (random, entropy_sample) show one draw from this seed
QUADRANT_COLOURS = {"q1": "#e4572e", "q2": "#f3a712", "q3": "#7b2cbf", "q4": "#8fb996"}
# __TITLE__ and __DATA__ filled in
PAGE_TEMPLATE = Path(__file__).resolve().parent / "assets" / "microscope_page.html"
NUMBER_COLUMNS = ("h", "delta", "delta_fwd", "h_hat", "d_hat", "score", "student_top_p",
                  "teacher_top_p")


def signals_by_rank(cols: dict[str, list]) -> dict[int, tuple[TokenSignals, list[int]]]:
    """Each rank's (B, T) signals rebuilt from its records (read on the host, where rules are
    re-run), with the record index of every valid position in the mask's row-major order (records
    come sorted by rank, rollout and position, so that is their own order)."""
    rank, rollout, position = (torch.tensor(cols[c], dtype=torch.long, device="cpu")
                               for c in ("rank", "rollout", "position"))
    out = {}
    for r in sorted(set(cols["rank"])):
        idx = (rank == r).nonzero(as_tuple=True)[0]
        rows, cols_at = rollout[idx], position[idx]
        shape = (int(rows.max()) + 1, int(cols_at.max()) + 1)
        values = {}
        for name in ("h", "delta", "delta_fwd", "h_teacher"):
            values[name] = torch.zeros(shape, device="cpu")
            values[name][rows, cols_at] = torch.tensor(cols[name], dtype=torch.float32,
                                                       device="cpu")[idx]
        for name in OPTIONAL_COLUMNS:  # the TokenSignals fields of the same names
            if name in cols:
                values[name] = torch.zeros(shape, device="cpu")
                values[name][rows, cols_at] = torch.tensor(cols[name], dtype=torch.float32,
                                                           device="cpu")[idx]
        mask = torch.zeros(shape, dtype=torch.bool, device="cpu")
        mask[rows, cols_at] = True
        out[r] = (TokenSignals(values["h"], values["delta"], values["delta_fwd"], mask,
                               teacher_entropy=values["h_teacher"],
                               **{name: values.get(name) for name in OPTIONAL_COLUMNS}),
                  idx.tolist())
    return out


def compare_rules(cols: dict[str, list], meta: dict, keeps) -> dict[str, dict[str, list[bool]]]:
    """``{rule: {keep: kept flag per record}}`` for every registered rule whose signals the records
    hold (a rule that reads an optional signal, such as the JSD, needs a run whose own rule computed
    it), re-run on the logged signals with the step's selection settings and batch statistics
    (``select`` itself, per rank as in the run)."""
    stats = stats_of(meta["batch_stats"])
    n = len(cols["h"])
    out: dict[str, dict[str, list[bool]]] = {}
    by_rank = signals_by_rank(cols)
    run = SelectionParams.of_meta(meta)
    for rule in RULES:
        if any(name not in cols for name in RULES[rule].needs):
            continue
        params = selection_of(run, rule)
        out[rule] = {}
        for keep in keeps:
            flags = [False] * n
            for signals, order in by_rank.values():
                generator = torch.Generator(device="cpu").manual_seed(COMPARISON_SEED)
                kept = select(params, signals, keep, generator, stats,
                              meta["batch_stats"].get("log_vocab")).kept
                for i, flag in zip(order, kept[signals.mask].tolist()):
                    flags[i] = flag
            out[rule][_keep_key(keep)] = flags
    return out


def _keep_key(keep: float) -> str:
    return f"{keep:g}"


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def step_shares(run_dir: Path) -> list[dict]:
    """Each trained step's quadrant shares of all tokens and of the kept tokens (metrics.jsonl: the
    global batch of every step, not only the recorded ones)."""
    return [{"step": r["step"],
             **{f"{q}/{part}": r.get(f"{q}/{part}") for part in ("frac", "of_kept")
                                   for q in QUADRANTS}}
            for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r.get("kind") == "train"]


def page_data(run_dir: Path, step: int, keeps=DEFAULT_KEEPS) -> dict:
    """Everything the page shows, as JSON-ready values."""
    cols, meta = read_token_records(run_dir, step)
    keeps = sorted({*keeps, meta["keep"]})
    tokens = {name: cols[name] for name in ("rank", "rollout", "prompt", "position", "token",
                                            "quadrant",
                                             "student_top", "teacher_top")}
    tokens["kept"] = [int(k) for k in cols["kept"]]
    for name in NUMBER_COLUMNS:
        tokens[name] = [_finite(x) for x in cols[name]]
    comparison = compare_rules(cols, meta, keeps)
    prompts = {}
    for rank, rollout, text in zip(cols["rank"], cols["rollout"], cols["prompt_text"]):
        prompts.setdefault(f"{rank}:{rollout}", text)
    return {
        "run": str(Path(run_dir).resolve()), "step": step, "meta": meta,
            "keeps": [_keep_key(k) for k in keeps],
        "tokens": tokens, "prompts": prompts,
        "comparison": {rule: {k: "".join("1" if f else "0" for f in flags)
                              for k, flags in by_keep.items()}
                       for rule, by_keep in comparison.items()},
        "rule_docs": {rule: spec.doc for rule, spec in RULES.items()},
        "not_compared": {rule: f"needs {', '.join(RULES[rule].needs)}, which this run did "
                               "not record"
                         for rule in RULES if rule not in comparison},
        "quadrants": {q: {"name": QUADRANT_NAMES[q],
                          "colour": QUADRANT_COLOURS[q]} for q in QUADRANTS},
        "steps": step_shares(run_dir), "logged_steps": logged_steps(run_dir),
    }


def render_page(data: dict) -> str:
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = f"tip token microscope: {Path(data['run']).name}, step {data['step']}"
    page = PAGE_TEMPLATE.read_text(encoding="utf-8")
    return page.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def write_page(run_dir: Path, step: int | None = None, keeps=DEFAULT_KEEPS,
               out: Path | None = None) -> Path:
    """Write the page of ``step`` (default: the last recorded step) and return its path."""
    run_dir = Path(run_dir)
    steps = logged_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"{run_dir} has no token records: train with "
                                "train.token_log_every=N (N > 0)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"step={step} has no token records in {run_dir}; recorded steps: "
                         f"{', '.join(map(str, steps))}")
    out = Path(out) if out else run_dir / "microscope" / f"step_{step:06d}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, render_page(page_data(run_dir, step, keeps)))
    return out


def plot_images(data: dict, out_dir: Path) -> dict[str, Path]:
    """The page's two plots as PNG files (for W&B): the h-delta scatter and the quadrant shares over
    steps."""
    plt = pyplot()
    tokens, meta, out_dir = data["tokens"], data["meta"], Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for i, q in enumerate(QUADRANTS, start=1):
        pts = [(h, d) for h, d, label in zip(tokens["h"], tokens["delta"],
                                             tokens["quadrant"]) if label == i]
        ax.scatter([max(h, 1e-6) for h, _ in pts], [max(d, 1e-7) for _, d in pts], s=5, alpha=0.7,
                   color=QUADRANT_COLOURS[q], label=f"{q.upper()} {QUADRANT_NAMES[q]}")
    stats = meta["batch_stats"]
    ax.axvline(stats["entropy_median"], ls="--", color="#333", lw=1)
    ax.axhline(max(stats["divergence_median"], 1e-7), ls="--", color="#333", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="student entropy h (log)",
           ylabel="δ = KL(P_S‖P_T) (log)", title=f"step {data['step']}: tokens by quadrant")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["token_scatter"] = out_dir / f"scatter_step_{data['step']:06d}.png"
    save_figure(fig, paths["token_scatter"], dpi=110)
    if data["steps"]:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
        steps = [r["step"] for r in data["steps"]]
        for ax, kind, name in zip(axes, ("frac", "of_kept"), ("all tokens", "kept tokens")):
            bottom = [0.0] * len(steps)
            for q in QUADRANTS:
                values = [100 * (r[f"{q}/{kind}"] or 0.0) for r in data["steps"]]
                ax.bar(steps, values, bottom=bottom, color=QUADRANT_COLOURS[q], label=q.upper())
                bottom = [b + v for b, v in zip(bottom, values)]
            ax.set(title=f"quadrant shares of {name}", xlabel="step")
        axes[0].set_ylabel("%")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        paths["quadrant_shares"] = out_dir / "quadrant_shares.png"
        save_figure(fig, paths["quadrant_shares"], dpi=110)
    return paths


def log_to_wandb(run, run_dir: Path) -> None:
    """The token microscope of the run's last recorded step  as a W&B HTML panel, and its plots as
    images (when matplotlib is installed)."""
    import wandb

    steps = logged_steps(run_dir)
    if not steps:
        return
    data = page_data(run_dir, steps[-1])
    media = {"token_microscope": wandb.Html(render_page(data), inject=False)}
    try:
        images = plot_images(data, Path(run_dir) / "microscope")
    except ImportError:  # matplotlib is an extra (.[sweeps]); the page holds the same plots
        images = {}
    media.update({name: wandb.Image(str(path)) for name, path in images.items()})
    run.log(media)


def parse_args(argv: list[str]) -> tuple[Path, dict]:
    """``<run dir> [step=S] [keeps=a,b] [out=path]``; anything else is refused by name."""
    usage = "usage: python -m tip.microscope <run dir> [step=S] [keeps=0.1,0.2,0.5] [out=page.html]"
    if argv and argv[0] in ("-h", "--help"):  # asked for: the usage, and success
        print(f"{usage}\n\nDraws which tokens each rule keeps, step by step, from a run's token "
              "records (train.token_log_every); writes <run dir>/microscope/index.html, or out=.")
        raise SystemExit(0)
    if not argv:
        raise SystemExit(usage)
    run_dir, options = Path(argv[0]), {}
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("step", "keeps", "out"):
            raise SystemExit(f"tip.microscope: {arg!r} is not allowed; {usage}")
        try:
            if key == "step":
                options["step"] = int(value)
            elif key == "keeps":
                options["keeps"] = tuple(float(k) for k in value.split(","))
                if not all(0 < k <= 1 for k in options["keeps"]):
                    raise ValueError
            else:
                options["out"] = Path(value)
        except ValueError:
            allowed = "an integer" if key == "step" else "numbers in (0, 1], comma-separated"
            raise SystemExit(f"tip.microscope: {key}={value!r} is not allowed: expected "
                             f"{allowed}") from None
    if not run_dir.is_dir():
        raise SystemExit(f"tip.microscope: no such run directory: {run_dir}")
    return run_dir, options


def main(argv: list[str] | None = None) -> int:
    run_dir, options = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = write_page(run_dir, **options)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"tip.microscope: {err}") from None
    print(path)
    return 0



if __name__ == "__main__":
    sys.exit(main())
