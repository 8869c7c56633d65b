"""Checks on a composed config, run before any model loads and before DeepSpeed builds its op: a
wrong value fails with one message naming the key, the value and what is allowed.

Hydra refuses an unknown group option (``experiment=smok``: no group default is ``optional``) and an
unknown key (``kep=0.1``); ``check_overrides`` refuses what Hydra lets through: a key added with
``+`` that nothing reads, and ``cell=`` beside the ``selector=`` or ``keep=`` it would replace;
``check_site_dir`` a file in ``conf/local/`` that no config reads; ``check_runnable`` what the
machine cannot run (a precision, vLLM, a model path)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tip.data import DATA_KINDS
from tip.engine import GATHER_FOR_GENERATE, OPTIMIZERS, PRECISIONS
from tip.env import ENVIRONMENTS, EpisodeLimits
from tip.errors import UserError
from tip.grading import GRADERS
from tip.keep import KEEP_SCHEDULES, SCOPES
from tip.losses import DENOMINATORS
from tip.models import ATTENTION, missing_attention
from tip.rollout import ROLLOUT_BACKENDS, WEIGHT_TRANSFERS
from tip.selection import RULES, SELECTOR_PARAMS, SelectionParams
from tip.signals import DIVERGENCES
from tip.taxonomy import NORM_SCOPES
from tip.wandb_logging import LOGGER_MODES

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"  # every config group; conf/sweeps links to the top-level sweeps/


class ConfigError(UserError):
    """A configuration value that cannot run."""


def require_conf_dir() -> None:
    """Stop a command line when the checkout's config directory is missing. tip is used from a
    checkout, installed in place (``pip install -e .``): a plain wheel has no conf/ beside the
    package."""
    if not (CONF_DIR / "config.yaml").is_file():
        raise SystemExit(f"tip's configs are not at {CONF_DIR}: tip runs from a checkout of its "
                         "repository, installed in place (`make install`, or `pip install -e .`); "
                         "a plain wheel install has no conf/")


def _need(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _one_of(key: str, value: Any, allowed) -> None:
    _need(value in allowed, key, value, "expected one of " + ", ".join(map(str, allowed)))


def _number(key: str, value: Any, lo: float, hi: float, lo_open: bool = False,
            hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    _need(ok, key, value, f"expected a number in {interval}")


def _integer(key: str, value: Any, lo: int, also: str | None = None) -> None:
    _need(isinstance(value, int) and not isinstance(value, bool) and value >= lo, key, value,
          f"expected an integer >= {lo}" + (f" or {also!r}" if also else ""))


def _threshold(key: str, value: Any) -> None:
    _need(value == "median" or (isinstance(value, (int, float)) and not isinstance(value, bool)),
          key, value, "expected 'median' or a number")


def check_source(key: str, source: Any, files: bool = True) -> None:
    kind = source.get("kind")
    _one_of(f"{key}.kind", kind, DATA_KINDS)
    if kind == "jsonl" and files:
        path = Path(str(source.get("path")))
        _need(path.is_file(), f"{key}.path", str(path),
              "no such file; set data_root=<folder holding the JSONL files> or the path itself, "
              f"or {key}.kind=hub to read the hub copy (how to get the files: docs/running.md, "
              "Data)")
    if kind in ("embedded", "embedded_agent"):
        _integer(f"{key}.size", source.get("size"), 1)


def parse_cell(cell: str) -> tuple[str, float]:
    """``'<selector>@<keep>[/<divergence>]'`` -> (label, keep), the label ``<selector>`` or
    ``<selector>/<divergence>``; keep is NaN when it is not a number (unchecked: the report labels
    even cells that failed on a bad value)."""
    rule, _, rest = cell.partition("@")
    keep, _, divergence = rest.partition("/")
    label = f"{rule}/{divergence}" if divergence else rule
    try:
        return label, float(keep)
    except ValueError:
        return label, float("nan")


def selector_node(rule: str) -> DictConfig:
    """What ``selector=<rule>`` composes: the rule's own file, conf/selector/<rule>.yaml."""
    return OmegaConf.load(CONF_DIR / "selector" / f"{rule}.yaml")


def selection_of(run: SelectionParams, rule: str) -> SelectionParams:
    """How a run of ``rule`` would select, beside the run that selected with ``run``: the same
    shared settings, and the rule's own parameters (the run's rule: as it ran; any other: its
    file's). The probe and the microscope compare rules with it."""
    return run if rule == run.rule else run.for_rule(selector_node(rule))


def apply_cell(cfg: DictConfig) -> None:
    """``cell=<selector>@<keep>`` is exactly ``selector=<selector> keep=<keep>`` (the selector's
    file replaces the composed one, parameters included); ``cell=<selector>@<keep>/<divergence>``
    also sets ``divergence.name`` (a rule paired with its source's loss, e.g. rel_conf@1.0/jsd);
    ``cell=untrained`` is ``selector=all keep=1.0 train.steps=0`` (the student as loaded). Sweeps
    whose cells are not a grid list them this way."""
    cell = cfg.get("cell")
    if cell is None:
        return
    allowed = ("expected '<selector>@<keep>' (e.g. q3@0.1, all@1.0), '<selector>@<keep>/"
               "<divergence>' (rel_conf@1.0/jsd) or 'untrained'")
    if cell == "untrained":
        cfg.selector, cfg.keep, cfg.train.steps = selector_node("all"), 1.0, 0
        return
    _need("@" in str(cell), "cell", cell, allowed)
    label, keep = parse_cell(str(cell))
    rule, _, divergence = label.partition("/")
    _one_of("cell selector", rule, sorted(RULES))
    keep_text = str(cell).partition("@")[2].partition("/")[0]
    _need(keep == keep, "cell", cell, f"{keep_text!r} is not a number; {allowed}")
    if divergence:
        _one_of("cell divergence", divergence, DIVERGENCES)
        cfg.divergence.name = divergence
    cfg.keep, cfg.selector = keep, selector_node(rule)


BLOCKS = ("keep_schedule", "selection", "selection.quadrant_thresholds", "train", "rollout",
          "engine", "engine.deepspeed", "pair", "teacher", "selector", "divergence", "data",
          "data.source", "eval", "eval.benchmarks", "env", "logger", "model", "probe")
"""Keys that hold a block of keys (a mapping), never a single value."""
LISTS = ("keep_schedule.milestones",)
"""Keys that hold a list."""


def check_shapes(cfg: DictConfig) -> None:
    """A value of the wrong shape (``keep_schedule=bogus``: a string where a block of keys belongs)
    is refused naming the key, before any other check reads inside it."""
    for key in BLOCKS:
        value = OmegaConf.select(cfg, key)
        _need(isinstance(value, DictConfig), key,
              value if not isinstance(value, ListConfig) else list(value),
              f"expected a block of keys ({key}.<key>=<value> sets one of them)")
    for key in LISTS:
        value = OmegaConf.select(cfg, key)
        _need(isinstance(value, ListConfig), key, value,
              "expected a list, e.g. [[5, 0.5], [10, 0.2]]")


def check_config(cfg: DictConfig, files: bool = True) -> None:
    """Every check of a composed config, section by section; ``files=False`` leaves out whether the
    data files exist (``tip.plan`` reads none)."""
    check_shapes(cfg)
    _integer("seed", cfg.seed, 0)
    check_selection(cfg)
    check_train(cfg.train)
    check_rollout(cfg.rollout)
    check_engine(cfg)
    check_teacher(cfg.teacher, cfg.train)
    check_env(cfg.env)
    check_model(cfg.model.attn_implementation, "model.attn_implementation")
    check_source("data.source", cfg.data.source, files)
    check_eval(cfg.eval, files)


def check_selection(cfg: DictConfig) -> None:
    """keep, its schedule, the selector and its parameters, the divergence, the selection block."""
    _number("keep", cfg.keep, 0.0, 1.0, lo_open=True)
    ks = cfg.keep_schedule
    _one_of("keep_schedule.kind", ks.kind, KEEP_SCHEDULES)
    _number("keep_schedule.start", ks.start, 0.0, 1.0, lo_open=True)
    if ks.kind == "step":
        _need(len(ks.milestones) > 0, "keep_schedule.milestones", ks.milestones,
              "a step schedule needs [[step, keep], ...] (e.g. [[5, 0.5], [10, 0.2]])")
    for i, milestone in enumerate(ks.milestones):
        _need(len(milestone) == 2, f"keep_schedule.milestones[{i}]", milestone,
              "expected [step, keep]")
        _integer(f"keep_schedule.milestones[{i}][0]", milestone[0], 1)
        _number(f"keep_schedule.milestones[{i}][1]", milestone[1], 0.0, 1.0, lo_open=True)
    _one_of("selector", cfg.selector.name, sorted(RULES))
    _one_of("divergence", cfg.divergence.name, DIVERGENCES)
    _number("divergence.beta", cfg.divergence.beta, 0.0, 1.0)

    sel = cfg.selection
    _one_of("selection.scope", sel.scope, SCOPES)
    _one_of("selection.norm_scope", sel.norm_scope, NORM_SCOPES)
    _number("selection.clip_quantile", sel.clip_quantile, 0.0, 1.0, lo_open=True)
    # A rule reads the parameters its own file declares, no others (``+selector.entropy_alpha=2``
    # on q3 would be ignored).
    own = sorted(set(selector_node(cfg.selector.name)) - {"name"})
    for key in sorted(set(cfg.selector) - {"name"}):
        _need(key in own, f"selector.{key}", cfg.selector[key],
              f"selector={cfg.selector.name} has no parameter {key!r}; it takes "
              + (", ".join(own) if own else "none"))
        _one_of("selector parameter", key, sorted(SELECTOR_PARAMS))
        _number(f"selector.{key}", cfg.selector[key], 0.0, math.inf, hi_open=True)
    _threshold("selection.quadrant_thresholds.entropy", sel.quadrant_thresholds.entropy)
    _threshold("selection.quadrant_thresholds.divergence", sel.quadrant_thresholds.divergence)


def check_train(tr) -> None:
    _integer("train.steps", tr.steps, 0)
    _integer("train.prompts_per_step", tr.prompts_per_step, 1)
    _integer("train.micro_batch_size", tr.micro_batch_size, 1)
    if tr.chunk_size != "auto":
        _integer("train.chunk_size", tr.chunk_size, 1, also="auto")
    _integer("train.warmup_steps", tr.warmup_steps, 0)
    _integer("train.eval_every", tr.eval_every, 0)
    _need(isinstance(tr.eval_before, bool), "train.eval_before", tr.eval_before,
          "expected true or false")
    for key in ("gradient_checkpointing", "packing"):
        _need(isinstance(tr[key], bool), f"train.{key}", tr[key], "expected true or false")
    _number("train.lr", tr.lr, 0.0, math.inf, lo_open=True, hi_open=True)
    _number("train.weight_decay", tr.weight_decay, 0.0, math.inf, hi_open=True)
    _number("train.grad_clip", tr.grad_clip, 0.0, math.inf, hi_open=True)
    _one_of("train.lr_schedule", tr.lr_schedule, ("cosine", "constant"))
    _one_of("train.optimizer", tr.optimizer, tuple(OPTIMIZERS))
    _one_of("train.denominator", tr.denominator, DENOMINATORS)
    _integer("train.checkpoint_every", tr.checkpoint_every, 0)
    _integer("train.max_checkpoints", tr.max_checkpoints, 1)
    _integer("train.max_skipped_steps", tr.max_skipped_steps, 0)
    _integer("train.token_log_every", tr.token_log_every, 0)


def check_rollout(ro) -> None:
    _one_of("rollout.backend", ro.get("backend"), ROLLOUT_BACKENDS)
    _integer("rollout.n", ro.n, 1)
    _integer("rollout.max_new_tokens", ro.max_new_tokens, 1)
    _need(ro.temperature in (0, 1), "rollout.temperature", ro.temperature,
          "expected 1.0 (signals and loss are those of P_S at temperature 1, so rollouts must be "
          "its samples) or 0 (greedy, for deterministic tests)")
    if ro.backend == "hf":
        _integer("rollout.max_seqs_per_generate", ro.max_seqs_per_generate, 1)
    if ro.backend == "vllm":
        if ro.max_model_len is not None:
            _integer("rollout.max_model_len", ro.max_model_len, 2)
        for key in ("enforce_eager", "sleep"):
            _need(ro[key] in ("auto", True, False), f"rollout.{key}", ro[key],
                  "expected auto, true or false")
        _one_of("rollout.sleep_level", ro.sleep_level, (1, 2))
        _one_of("rollout.weight_transfer", ro.weight_transfer, ("auto", *WEIGHT_TRANSFERS))
        _need(isinstance(ro.prefix_caching, bool), "rollout.prefix_caching", ro.prefix_caching,
              "expected true or false")
        _number("rollout.sync_bucket_mb", ro.sync_bucket_mb, 0.0, math.inf, hi_open=True)
        if ro.get("max_logp_gap") is not None:
            _number("rollout.max_logp_gap", ro.max_logp_gap, 0.0, math.inf, lo_open=True,
                    hi_open=True)
    _number("rollout.top_p", ro.top_p, 0.0, 1.0, lo_open=True)


def check_engine(cfg: DictConfig) -> None:
    """The engine, precision, the process group's timeout, the pair's vocabulary rule, the
    logger."""
    _one_of("engine.stage", cfg.engine.stage, (0, 1, 2, 3))
    _one_of("engine.offload_optimizer", cfg.engine.offload_optimizer, ("none", "cpu", "nvme"))
    _one_of("engine.offload_param", cfg.engine.offload_param, ("none", "cpu", "nvme"))
    if "gather_for_generate" in cfg.engine:
        _one_of("engine.gather_for_generate", cfg.engine.gather_for_generate, GATHER_FOR_GENERATE)
    if cfg.engine.get("hpz_partition_size", "auto") != "auto":
        _integer("engine.hpz_partition_size", cfg.engine.hpz_partition_size, 1, also="auto")
    _one_of("precision", cfg.precision, PRECISIONS)
    _number("dist_timeout_s", cfg.dist_timeout_s, 0.0, math.inf, lo_open=True, hi_open=True)
    _one_of("pair.vocab", cfg.pair.vocab, ("truncate", "error"))
    _one_of("logger", cfg.logger.name, ("jsonl", "none", "wandb"))
    if cfg.logger.name == "wandb":
        _one_of("logger.mode", cfg.logger.mode, LOGGER_MODES)


def check_model(attn_implementation: str, key: str) -> None:
    """The attention kernels: a known name, runnable here (a missing package is named before any
    model loads)."""
    import torch

    _one_of(key, attn_implementation, tuple(ATTENTION))
    why = missing_attention(attn_implementation, "cuda" if torch.cuda.is_available() else "cpu")
    _need(not why, key, attn_implementation, why + "; allowed here: auto, sdpa, eager")


def check_teacher(teacher, tr) -> None:
    _one_of("teacher.mode", teacher.mode, ("separate", "self_privileged"))
    if teacher.mode != "self_privileged":
        return
    _one_of("teacher.weights", teacher.weights, ("snapshot", "live"))
    _integer("teacher.refresh_every", teacher.refresh_every, 1)
    # A resumed snapshot is rebuilt from the student at a refresh step, so checkpoints must
    # fall on one.
    if teacher.weights == "snapshot" and tr.checkpoint_every:
        _need(tr.checkpoint_every % teacher.refresh_every == 0, "train.checkpoint_every",
              tr.checkpoint_every,
              "with teacher.weights=snapshot it must be a multiple of teacher.refresh_every "
              f"({teacher.refresh_every}), so a resumed run rebuilds the same snapshot")
    _need("{solution}" in teacher.context_template, "teacher.context_template",
          teacher.context_template, "it must contain {solution} (the privileged context)")


def check_env(env) -> None:
    """The ``env`` node: ``none`` (single-turn rollouts) or a registered environment with its
    episode limits."""
    _one_of("env", env.name, ("none", *sorted(ENVIRONMENTS)))
    if env.name != "none":
        for key in EpisodeLimits.__dataclass_fields__:
            if env.get(key) is not None:
                _integer(f"env.{key}", env.get(key), 1)


def check_launcher(launcher: str | None, cuda_available: bool) -> None:
    """hydra/launcher=parallel runs cells side by side, one process each, on one node: on GPUs every
    cell's process would take cuda:0."""
    _need(not (launcher == "parallel" and cuda_available), "hydra/launcher", launcher,
          "on a GPU machine cells side by side would all take cuda:0; use hydra/launcher=slurm "
          "(one task per GPU "
          "per cell) or basic (cells one after another, each with every GPU of its launcher)")


def check_eval(ev, files: bool = True) -> None:
    """The ``eval`` node: benchmarks and the sampling protocol."""
    _need(len(ev.benchmarks) > 0, "eval.benchmarks", dict(ev.benchmarks),
          "expected at least one benchmark")
    for name, bench in ev.benchmarks.items():
        check_source(f"eval.benchmarks.{name}.source", bench.source, files)
        _one_of(f"eval.benchmarks.{name}.grader", bench.get("grader", "math_verify"), GRADERS)
    if ev.get("limit") is not None:
        _integer("eval.limit", ev.limit, 1)
    _integer("eval.samples", ev.samples, 1)
    _integer("eval.max_new_tokens", ev.max_new_tokens, 1)
    _integer("eval.batch_size", ev.batch_size, 1)
    _integer("eval.max_seqs_per_generate", ev.max_seqs_per_generate, 1)
    _integer("eval.top_k", ev.top_k, 0)
    _number("eval.temperature", ev.temperature, 0.0, math.inf, hi_open=True)
    _number("eval.top_p", ev.top_p, 0.0, 1.0, lo_open=True)


FREE_FORM = ("engine.deepspeed", "pair.chat_template_kwargs")
"""Blocks handed whole to another library (DeepSpeed's config, the chat template's arguments): a
key added there is read by that library, so ``+`` may add one."""


def check_overrides(cfg: DictConfig, overrides: list[str] | tuple[str, ...]) -> None:
    """What the command line's overrides (Hydra's ``overrides.task``) ask that Hydra lets through
    but nothing would read: a key added with ``+``/``++`` outside ``FREE_FORM`` (``+train.step=5``
    where the key is ``steps``), a key removed with ``~``, and ``cell=`` beside the ``selector=``,
    ``selector.<param>=`` or ``keep=`` that the cell replaces."""
    for text in overrides:
        key, _, value = text.partition("=")
        bare = key.lstrip("+~")
        if "/" in bare or bare.startswith("hydra.") or not key.startswith(("+", "~")) \
                or any(bare == f or bare.startswith(f + ".") for f in FREE_FORM):
            continue
        block, _, leaf = bare.rpartition(".")
        if key.startswith("~"):
            raise ConfigError(f"{text} is not allowed: it removes {bare}, which tip reads; set "
                              f"{bare}=<value> instead")
        if block == "selector":
            continue  # a rule's parameters are checked against its own file (check_selection)
        if key.startswith("++") and _in_base(block, leaf, overrides):
            continue  # ++ on a key that is there is a plain override
        node = OmegaConf.select(cfg, block) if block else cfg
        takes = sorted(k for k in node if k != leaf) if isinstance(node, DictConfig) else []
        where = f"{block} has no key {leaf!r}" if block else f"there is no top-level key {leaf!r}"
        raise ConfigError(f"{text} is not allowed: {where}, and tip reads none it adds; "
                          f"{block or 'the top level'} takes {', '.join(takes)}")
    given = {o.partition("=")[0].lstrip("+") for o in overrides}
    replaced = sorted(k for k in given if k in ("selector", "keep") or k.startswith("selector."))
    if cfg.get("cell") is not None and replaced:
        raise ConfigError(f"cell={cfg.cell} is not allowed beside {', '.join(replaced)}: a cell "
                          "sets the selector (its own file) and keep itself; give either cell= or "
                          "selector=/keep=")


def _in_base(block: str, leaf: str, overrides) -> bool:
    """Whether ``block.leaf`` is in the config composed without the ``+``/``++`` overrides (what
    ``++`` then only overrides)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    kept = [o for o in overrides if not o.startswith(("+", "~"))]
    if GlobalHydra.instance().is_initialized():
        base = compose("config", overrides=kept)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            base = compose("config", overrides=kept)
    node = OmegaConf.select(base, block) if block else base
    return isinstance(node, DictConfig) and leaf in node


def check_output_dirs(argv: list[str]) -> None:
    """``hydra.run.dir=`` / ``hydra.sweep.dir=`` naming a file: Hydra would fail creating it with a
    raw traceback before tip runs, so the command line is read first."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and Path(value).expanduser().is_file():
            _need(False, key, value, "it is a file; expected a directory (new, or a run's own)")


SITE_FILES = {"slurm.yaml": "hydra/launcher=slurm's site values (partition, account, ...)"}
"""The files of ``conf/local/`` (git-ignored) that a config reads."""


def check_site_dir(local: Path = CONF_DIR / "local") -> None:
    """A file in ``conf/local/`` that no config reads (``slurm.yml``) would be skipped silently
    (the launcher's site file is an optional default): refuse it, naming the files that are read."""
    if not local.is_dir():
        return
    for path in sorted(local.iterdir()):
        if path.name not in SITE_FILES and not path.name.startswith("."):
            read = "; ".join(f"{local / n}: {what}" for n, what in SITE_FILES.items())
            raise ConfigError(f"{path} is not read by any config; the site files are {read}")


def check_weight_sync(ro, device_type: str) -> None:
    """rollout=vllm on GPUs: the socket transfer cannot follow a level-2 sleep. It loads with
    ``model.load_weights`` directly, bypassing vLLM's layerwise reload and
    ``process_weights_after_loading`` (which a level-2 sleep, having discarded the weights, needs),
    and pins a whole model of host memory per rank."""
    on_gpu = device_type == "cuda"
    transfer = ro.weight_transfer if ro.weight_transfer != "auto" else \
        ("ipc" if on_gpu else "socket")
    sleeps = ro.sleep if ro.sleep != "auto" else on_gpu
    if on_gpu and transfer == "socket" and sleeps and ro.sleep_level == 2:
        raise ConfigError("rollout.weight_transfer=socket is not allowed with "
                          "rollout.sleep_level=2 on GPUs: after a level-2 sleep the weights must "
                          "come through vLLM's weight transfer API; use "
                          "rollout.weight_transfer=ipc (auto on GPUs), rollout.sleep_level=1 or "
                          "rollout.sleep=false")


def check_runnable(cfg: DictConfig) -> None:
    """What this machine must have for the config, checked without loading anything: the precision
    on this device, vLLM for rollout=vllm, the pair's models at their paths."""
    import torch

    from tip.models import check_model_ref
    from tip.vllm_worker import missing_vllm

    if cfg.precision == "fp16" and not torch.cuda.is_available():
        _need(False, "precision", cfg.precision, "DeepSpeed has no fp16 on the CPU; here use "
              "auto (fp32), fp32 or bf16")
    if cfg.rollout.backend == "vllm":
        check_weight_sync(cfg.rollout, "cuda" if torch.cuda.is_available() else "cpu")
        why = missing_vllm(cfg.rollout.get("vllm_python"))
        _need(not why, "rollout", "vllm", why + "; on CPU, `make vllm-env` builds .venv-vllm, then "
              "rollout.vllm_python=.venv-vllm/bin/python (or TIP_VLLM_PYTHON); on GPUs, pip "
              "install vllm")
    refs = [("pair.student", cfg.pair.student)]
    if cfg.teacher.mode == "separate":
        refs.append(("pair.teacher", cfg.pair.teacher))
    if cfg.pair.get("tokenizer"):
        refs.append(("pair.tokenizer", cfg.pair.tokenizer))
    for key, ref in refs:
        check_model_ref(key, str(ref))
