"""W&B runs for training runs: offline unless an API key is configured, named by the run's
overrides, grouped by the sweep, with the resolved config. ``python -m wandb sync <dir>`` uploads
offline runs later."""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


LOGGER_MODES = ("auto", "online", "offline", "disabled")


def resolve_mode(mode: str) -> str:
    if mode not in LOGGER_MODES:
        raise ValueError(f"logger.mode={mode!r} is not allowed: expected one of "
                         f"{', '.join(LOGGER_MODES)}")
    if mode != "auto":
        return mode
    return "online" if api_key_configured() else "offline"


def run_identity(run_dir: Path) -> tuple[str, str | None]:
    """(name, group) from Hydra when it runs us: the cell's overrides and the sweep directory."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        overrides = hc.job.override_dirname or run_dir.name
        group = Path(hc.sweep.dir).name if hc.mode.name == "MULTIRUN" else None
        return overrides, group
    except (ValueError, AttributeError):  # not under Hydra (tests, notebooks)
        return run_dir.name, None


def start_run(cfg: DictConfig, run_dir: Path):
    """A W&B run for this training run (main rank only), or None when logger.name is not wandb."""
    lg = cfg.logger
    if lg.name != "wandb":
        return None
    import wandb

    name, group = run_identity(run_dir)
    # A resumed run (a requeued SLURM job) continues the same W&B run.
    id_file = Path(run_dir) / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    run = wandb.init(
        project=lg.project, entity=lg.entity, group=lg.group or group, name=lg.name_run or name,
        tags=list(lg.tags), mode=resolve_mode(lg.mode), dir=str(run_dir), id=run_id, resume="allow",
        config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
    )
    id_file.write_text(run_id)
    return run
