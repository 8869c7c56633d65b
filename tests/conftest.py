"""Fixtures shared by the tests; shared paths and helpers are in support.py."""

from __future__ import annotations

import pytest

from support import DATA_ROOT, compose_config


@pytest.fixture
def needs_shared_data():
    if not (DATA_ROOT / "math500.jsonl").is_file():
        pytest.skip(f"the shared data sets are not at {DATA_ROOT} (set TIP_DATA_ROOT)")
    return DATA_ROOT


@pytest.fixture
def compose():
    """``compose(*overrides)``: the training config, as the command line composes it."""
    return compose_config
