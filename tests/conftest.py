"""Shared test helpers: the config directory, the shared data folder and an in-process training run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import tip

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(Path(tip.__file__).resolve().parent / "conf")
DATA_ROOT = Path(os.environ.get("TIP_DATA_ROOT", ROOT.parent / "shared" / "data")).resolve()


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"data_root={DATA_ROOT}", *overrides])


@pytest.fixture
def needs_shared_data():
    if not (DATA_ROOT / "math500.jsonl").is_file():
        pytest.skip(f"the shared data sets are not at {DATA_ROOT} (set TIP_DATA_ROOT)")
    return DATA_ROOT
