"""A sweep directory's guard, as a Hydra callback (``hydra.callbacks.sweep_dir`` in
conf/config.yaml): it runs before Hydra's sweeper writes ``multirun.yaml`` into the directory.

One directory holds one sweep. A rerun with the same sweep resumes its unfinished cells (each cell
resumes or restarts in its own directory); one whose every cell is finished, or one that names
other overrides, is refused before any file there changes."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tip.errors import UserError


class SweepDirError(UserError):
    """A sweep directory that this sweep may not use."""


def sweep_definition(config: DictConfig) -> dict[str, str]:
    """What makes a sweep: its command line's overrides and its sweeper's parameters."""
    found = {o.partition("=")[0]: o.partition("=")[2] for o in config.hydra.overrides.task}
    params = config.hydra.sweeper.get("params") or {}
    found.update({str(k): str(v) for k, v in params.items()})
    return found


def planned_cells(config: DictConfig) -> int:
    """How many cells Hydra's basic sweeper makes of the sweep."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(
        [f"{k}={v}" for k, v in sweep_definition(config).items()])
    return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))


def cell_status(cell: Path) -> str | None:
    path = cell / "status.json"
    return json.loads(path.read_text()).get("status") if path.is_file() else None


class SweepDirGuard(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Hydra turns a callback's exception into a warning and goes on: a refusal must exit.
        try:
            self.check(config)
        except SweepDirError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                traceback.print_exc()
            else:
                print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        print(f"sweep directory: {config.hydra.sweep.dir}", flush=True)

    @staticmethod
    def check(config: DictConfig) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        saved = sweep_dir / "multirun.yaml"
        if saved.is_file():
            old = sweep_definition(OmegaConf.load(saved))
            new = sweep_definition(config)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if changed:
                what = "; ".join(f"{k}: {old.get(k, '(absent)')} there, {new.get(k, '(absent)')} "
                                 "now" for k in changed)
                raise SweepDirError(f"{sweep_dir} holds another sweep ({what}); one directory "
                                    "holds one sweep: give this one its own hydra.sweep.dir")
            n = planned_cells(config)
            if all(cell_status(sweep_dir / str(i)) == "completed" for i in range(n)):
                raise SweepDirError(f"every cell of the sweep in {sweep_dir} is finished ({n}); "
                                    f"its report: python -m tip.report {sweep_dir}")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = config.hydra.sweep.dir
        print(f"sweep directory: {sweep_dir}\nits report: python -m tip.report {sweep_dir}",
              flush=True)
