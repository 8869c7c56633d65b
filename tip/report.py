"""The paper-style table and plot of a sweep: ``python -m tip.report <multirun dir>``.

Reads every cell directory of a Hydra multirun (finished, failed or never finished), groups cells
that differ only in their seed, and writes into ``<multirun dir>/report/``:

- ``table.md`` / ``table.csv``: rule x keep ratio x benchmark, held-out accuracy mean ± std over
  seeds, with the kept-token fraction, peak memory and step time; then every cell with its status
  (and error if it failed);
- ``cells.csv``: one row per cell;
- ``accuracy_vs_tokens.png``: accuracy against kept-token fraction per rule, the all-token baseline
  (and the untrained student, when the sweep has it) as reference lines;
- ``quadrant_kept_shares.png``: each quadrant's share of the kept tokens over training steps, one
  line per rule.

A sweep over an lr grid (``train.lr=a,b,c``) also gets every cell at the shared lr and at its own
lr, chosen on a dev half of the problems and reported on the test half (``tip.sweep_tuning``); the
paper's claims are then decided on each cell at its own lr.

When the cells logged to W&B (``logger=wandb``), the table and the plots are also logged to the
sweep's W&B group. The report is derived data: running it again (e.g. after more cells finish)
rewrites it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tip.checkpoint import write_atomic
from tip.sweep_cells import (
    Cell,
    aggregate,
    cell_rows,
    csv_text,
    find_cells,
    markdown,
    table_columns,
)
from tip.sweep_claims import claims_markdown
from tip.sweep_plots import plot, plot_kept_shares
from tip.sweep_tuning import tune, tuned_rows, tuning_markdown


def log_to_wandb(sweep_dir: Path, out: Path, rows: list[dict], cells: list[Cell], mode: str | None):
    """A "report" run in the sweep's W&B group, holding the table and the plot. Returns the run's
    directory."""
    import wandb

    from tip.wandb_logging import resolve_mode

    lg = next((c.logger for c in cells if c.logger.get("name") == "wandb"), {})
    run = wandb.init(project=lg.get("project", "tip"), entity=lg.get("entity"),
                     group=lg.get("group") or Path(sweep_dir).name, name="report",
                     job_type="report", mode=mode or resolve_mode(lg.get("mode", "auto")),
                     dir=str(out), reinit="finish_previous")
    columns = table_columns(rows)
    run.log({"results": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows]),
             "accuracy_vs_tokens": wandb.Image(str(out / "accuracy_vs_tokens.png")),
             "quadrant_kept_shares": wandb.Image(str(out / "quadrant_kept_shares.png"))})
    run_dir = Path(run.dir).parent
    run.finish()
    return run_dir


def report(sweep_dir: Path, wandb_mode: str = "auto", split_seed: int = 0,
           shared_lr: float | None = None, tune_on: str | None = None,
           also: list[Path] = ()) -> Path:
    """Write the report of ``sweep_dir`` into ``sweep_dir/report``; returns that folder. ``also``:
    further sweeps of the same experiment read as one (e.g. seeds run later at each cell's chosen
    lr)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SystemExit(f"no such sweep directory: {sweep_dir}")
    cells = find_cells(sweep_dir)
    for more in also:
        cells += find_cells(Path(more))
    rows, benchmarks = aggregate(cells)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    text = markdown(sweep_dir, rows, benchmarks, cells)
    plain = [b for b in benchmarks if "@" not in b]
    if tune_on is not None and tune_on not in plain:
        raise SystemExit(f"--tune-on {tune_on}: not a benchmark of this sweep; it has "
                         f"{', '.join(plain) or 'none'}")
    tuning = tune(cells, tune_on or plain[0], split_seed, shared_lr) if plain else None
    if tuning is None:
        claims = claims_markdown(rows, benchmarks)
    else:
        claims = tuning_markdown(tuning) + claims_markdown(
            tuned_rows(tuning, "own"), [tuning.benchmark],
            note=f"each cell at its own lr, on the test half of {tuning.benchmark}")
    if claims:  # before the per-cell list
        head, sep, tail = text.partition("\n## Cells\n")
        text = head + claims + sep + tail
    write_atomic(out / "table.md", text)
    write_atomic(out / "table.csv", csv_text(rows))
    write_atomic(out / "cells.csv", csv_text(cell_rows(cells, benchmarks)))
    plot(rows, benchmarks, sweep_dir.name, out / "accuracy_vs_tokens.png")
    plot_kept_shares(cells, sweep_dir.name, out / "quadrant_kept_shares.png")
    use_wandb = wandb_mode in ("online", "offline") or (
        wandb_mode == "auto" and any(c.logger.get("name") == "wandb" for c in cells))
    if use_wandb:
        log_to_wandb(sweep_dir, out, rows, cells, None if wandb_mode == "auto" else wandb_mode)
    print(text, end="")
    print(f"report: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tip.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (hydra.sweep.dir)")
    parser.add_argument("--wandb", choices=("auto", "online", "offline", "off"), default="auto",
                        help="auto: log to W&B when the cells did (logger=wandb), in their mode")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="an lr grid's dev/test halves of the problems (default 0)")
    parser.add_argument("--shared-lr", type=float, default=None,
                        help="the lr every cell shares in the shared-lr comparison (default: "
                             "all-token's dev-best)")
    parser.add_argument("--tune-on", default=None,
                        help="the benchmark an lr grid is chosen and reported on (default: the "
                             "first)")
    parser.add_argument("--with", dest="also", type=Path, nargs="+", default=[],
                        help="further sweep directories of the same experiment, read as one")
    args = parser.parse_args(argv)
    report(args.sweep_dir, args.wandb, args.split_seed, args.shared_lr, args.tune_on, args.also)
    return 0


if __name__ == "__main__":
    sys.exit(main())
