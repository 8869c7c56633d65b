"""logger=wandb: offline runs that hold the logged metrics and config, finished even when the run fails."""

import pytest

from tip.train import train
from tip.wandb_logging import resolve_mode

from support import compose_config
from wandb_records import config, exit_code, history


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key either
    (tmp_path / "home").mkdir()


def run_file(run_dir):
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return path


@pytest.mark.slow  # seconds-long: test-fast keeps under 5 minutes
def test_without_an_api_key_the_run_is_offline_and_holds_metrics_and_config(tmp_path, no_wandb_key):
    cfg = compose_config("experiment=smoke", "logger=wandb", "selector=q3", "keep=0.2", "train.save_final=false")
    train(cfg, tmp_path / "run")
    path = run_file(tmp_path / "run")
    rows = history(path)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for key in ("kept_frac", "q3/frac", "q3/kept", "mean_delta", "tokens_per_s", "peak_mem_mb", "grad_norm"):
        assert key in train_rows[0], key
    assert any("embedded/accuracy" in r for r in rows)
    cfg_logged = config(path)
    assert cfg_logged["selector"]["name"] == "q3" and cfg_logged["keep"] == 0.2
    assert exit_code(path) == 0
    # experiment=smoke records tokens: the microscope page of the last recorded step is an HTML panel of the run,
    # its plots are images.
    (page,) = path.parent.glob("files/media/html/token_microscope_*.html")
    assert 'id="data"' in page.read_text() and '"step":2' in page.read_text()
    assert list(path.parent.glob("files/media/images/token_scatter_*.png"))
    assert list(path.parent.glob("files/media/images/quadrant_shares_*.png"))


def test_a_failing_run_still_finishes_its_wandb_run_marked_failed(tmp_path, no_wandb_key):
    teacher = tmp_path / "teacher"  # passes the checks before the run (a folder with a config) and fails to load
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    cfg = compose_config("experiment=smoke", "logger=wandb", f"pair.teacher={teacher}")
    with pytest.raises(ValueError, match="Unrecognized model"):
        train(cfg, tmp_path / "run")
    assert exit_code(run_file(tmp_path / "run")) == 1


def test_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="logger.mode='cloud' is not allowed"):
        resolve_mode("cloud")
