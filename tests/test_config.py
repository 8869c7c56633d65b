"""Every YAML composes through Hydra's compose API, and bad values fail before any model loads."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from tip.config import ConfigError, apply_cell, check_config
from tip.selection import RULES

from support import CONF_DIR, compose_config

# Every config group in conf/ (hydra/launcher and sweeps are composed in test_sweeps.py).
GROUPS = sorted(d.name for d in Path(CONF_DIR).iterdir() if d.is_dir() and d.name not in ("hydra", "sweeps", "local")
                and any(d.glob("*.yaml")))


def options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_every_group_is_composed_here():
    assert {"teacher", "protocol", "pair", "selector", "engine", "rollout"} <= set(GROUPS)


def test_every_selector_rule_has_a_config_and_back():
    assert set(options("selector")) == set(RULES)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option, request):
    cfg = compose_config(f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "pair":  # the paper pairs are hub ids: composing is all that can be checked offline
        return
    if cfg.data.source.kind == "jsonl" or any(b.source.kind == "jsonl" for b in cfg.eval.benchmarks.values()):
        request.getfixturevalue("needs_shared_data")  # file-backed options are checked where the files are
    check_config(cfg)


def test_the_users_command_line_composes():
    cfg = compose_config("selector=q3", "keep=0.1")
    assert cfg.selector.name == "q3" and cfg.keep == 0.1
    check_config(cfg)


def test_engine_variants_are_deepspeed_json():
    z3 = compose_config("engine=zero3_offload").engine
    assert z3.deepspeed.zero_optimization.stage == 3
    assert z3.deepspeed.zero_optimization.offload_param.device == "cpu"
    z2 = compose_config("engine=zero2").engine
    assert z2.deepspeed.zero_optimization.stage == 2


@pytest.mark.parametrize("override,message", [
    ("keep=1.5", r"keep=1.5 is not allowed: expected a number in \(0.0, 1.0\]"),
    ("keep=0", r"keep=0 is not allowed"),
    ("divergence.beta=2", r"divergence.beta=2 is not allowed"),
    ("selection.scope=rollout", r"selection.scope='rollout' is not allowed: expected one of sequence, batch"),
    ("selection.quadrant_thresholds.entropy=mean", r"expected 'median' or a number"),
    ("train.denominator=tokens", r"train.denominator='tokens' is not allowed: expected one of auto, kept, all, weight"),
    ("rollout.temperature=-1", r"rollout.temperature=-1 is not allowed"),
    ("rollout.temperature=0.7", r"rollout.temperature=0.7 is not allowed: expected 1.0 \(signals and loss are those "
                                r"of P_S at temperature 1"),
    ("rollout=vllm rollout.max_model_len=0", r"rollout.max_model_len=0 is not allowed: expected an integer >= 2"),
    ("train.steps=1.5", r"train.steps=1.5 is not allowed: expected an integer"),
    ("train.chunk_size=big", r"train.chunk_size='big' is not allowed: expected an integer >= 1 or 'auto'"),
    ("train.chunk_size=0", r"train.chunk_size=0 is not allowed: expected an integer >= 1 or 'auto'"),
    ("engine.gather_for_generate=sometimes",
     r"engine.gather_for_generate='sometimes' is not allowed: expected one of auto, always, never"),
    ("data=gsm8k data_root=/nonexistent",
     r"data.source.path='/nonexistent/gsm8k_train.jsonl' is not allowed: no such file"),
])
def test_bad_values_give_one_clear_error(override, message):
    cfg = compose_config(*override.split())
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_unknown_selector_and_unknown_key_are_refused_by_hydra_with_the_options():
    with pytest.raises(ConfigCompositionException, match=r"(?s)selector/q5.*Available options.*soft_or"):
        compose_config("selector=q5")
    with pytest.raises(ConfigCompositionException, match="kep"):
        compose_config("kep=0.1")


PAPER_PAIRS = {"qwen3_8b_to_4b": 1e-6, "llama70b_to_8b": 3e-7, "qwen25_14b_to_1p5b": 1e-6,
               "qwen3_14b_to_1p7b": 1e-6, "qwen3_32b_to_1p7b": 1e-6}


@pytest.mark.parametrize("pair,lr", PAPER_PAIRS.items())
def test_paper_overlays_hold_the_papers_settings(pair, lr, needs_shared_data):
    cfg = compose_config(f"experiment=paper_{pair}")
    check_config(cfg)
    assert cfg.pair.name == pair and cfg.train.lr == lr and cfg.data.name == "dapo_math"
    ro = cfg.rollout
    assert (ro.backend, ro.n, ro.temperature, ro.max_new_tokens) == ("vllm", 16, 1.0, 8192)
    assert sorted(cfg.eval.benchmarks) == ["aime24", "aime25", "math500"]
    assert (cfg.eval.samples, cfg.eval.temperature, cfg.precision, cfg.train.chunk_size) == (16, 1.0, "bf16", 512)
    if pair.startswith("qwen3"):
        assert cfg.pair.chat_template_kwargs == {"enable_thinking": False}
    header = (Path(CONF_DIR) / "experiment" / f"paper_{pair}.yaml").read_text().splitlines()[:4]
    assert any(line.startswith("# GPUs in the paper:") for line in header)


def test_a_value_of_the_wrong_shape_is_refused_naming_the_key_before_any_model_loads(tmp_path):
    cfg = compose_config("keep_schedule=bogus")
    with pytest.raises(ConfigError, match=r"keep_schedule='bogus' is not allowed: expected a block of keys"):
        check_config(cfg)
    with pytest.raises(ConfigError, match=r"keep_schedule.milestones=5 is not allowed: expected a list"):
        check_config(compose_config("keep_schedule.milestones=5"))
    # The command line fails at once with that message (no model is loaded: no DeepSpeed engine starts).
    out = subprocess.run([sys.executable, "-m", "tip.train", "keep_schedule=bogus", "logger=none",
                          f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "keep_schedule='bogus' is not allowed" in out.stderr
    assert "AttributeError" not in out.stderr and "load" not in out.stdout.lower()


def test_a_selectors_parameters_live_in_its_own_file():
    cfg = compose_config("selector=entropy_jsd_sample", "selector.jsd_gamma=2")
    assert cfg.selector.jsd_gamma == 2 and cfg.selector.entropy_alpha == 1.0 and "selection" in cfg
    assert "jsd_gamma" not in cfg.selection and "entropy_alpha" not in cfg.selection
    check_config(cfg)
    with pytest.raises(ConfigCompositionException, match="jsd_gamma"):  # q3 has no such parameter
        compose_config("selector=q3", "selector.jsd_gamma=2")
    with pytest.raises(ConfigError, match=r"selector.jsd_gamma=-1 is not allowed"):
        check_config(compose_config("selector=entropy_jsd_sample", "selector.jsd_gamma=-1"))


@pytest.mark.parametrize("cell,overrides", [
    ("q3@0.1", ["selector=q3", "keep=0.1"]),
    ("entropy_jsd_sample@0.2", ["selector=entropy_jsd_sample", "keep=0.2"]),
    ("untrained", ["selector=all", "keep=1.0", "train.steps=0"]),
    ("rel_conf@1.0/jsd", ["selector=rel_conf", "keep=1.0", "divergence=jsd"]),  # a rule with its source's loss
])
def test_a_cell_is_exactly_the_overrides_it_expands_to(cell, overrides):
    # From a composition with another selector (and its parameters), as a sweep's cells are.
    cfg = compose_config("selector=entropy_sample", "selector.entropy_alpha=3", f"cell={cell}")
    apply_cell(cfg)
    want = compose_config(*overrides, f"cell={cell}")
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(want)


def test_a_cells_divergence_must_be_one_tip_has():
    cfg = compose_config("cell=rel_conf@1.0/clipped_fkl")
    with pytest.raises(ConfigError, match=r"cell divergence='clipped_fkl' is not allowed: expected one of"):
        apply_cell(cfg)


def test_the_rollout_backends_share_their_sampling_keys():
    hf, vllm = compose_config("rollout=hf").rollout, compose_config("rollout=vllm").rollout
    shared = ("n", "temperature", "top_p", "top_k", "max_new_tokens")
    assert all(hf[k] == vllm[k] for k in shared)
    for name in ("hf", "vllm"):  # written once, in the file both start from
        text = (Path(CONF_DIR) / "rollout" / f"{name}.yaml").read_text()
        assert not any(line.startswith(f"{k}:") for k in shared for line in text.splitlines())


def test_attention_kernels_are_checked_before_any_model_loads():
    from tip.models import missing_attention, resolve_attention

    with pytest.raises(ConfigError, match="model.attn_implementation='flash' is not allowed: expected one of auto"):
        check_config(compose_config("model.attn_implementation=flash"))
    # FlashAttention asked for where it cannot run: the error names why and what is allowed
    with pytest.raises(ConfigError, match="flash_attention_2 runs on CUDA only.*allowed here: auto, sdpa, eager"):
        check_config(compose_config("model.attn_implementation=flash_attention_2"))
    # on a GPU without the package (flash-attn is not installed here): the package is named
    assert "needs the package flash-attn, which is not installed" in missing_attention("flash_attention_2", "cuda")
    # auto on a GPU without flash-attn: flex_attention (issue 40; it was sdpa, dense per packed row)
    assert resolve_attention("auto", "cpu") == "sdpa" and resolve_attention("auto", "cuda") == "flex_attention"
    assert resolve_attention("eager", "cpu") == "eager"


def test_the_attention_kernels_asked_for_are_the_ones_loaded(tmp_path):
    from tip.distributed import init_distributed
    from tip.engine import release_engines
    from tip.parts import build_parts

    cfg = compose_config("experiment=smoke", "logger=none", "model.attn_implementation=eager", "engine=zero0")
    run = build_parts(cfg, init_distributed(), tmp_path)
    try:
        assert run.student.config._attn_implementation == "eager"
        assert run.teacher.config._attn_implementation == "eager"
    finally:
        release_engines(run.engine, run.teacher)
