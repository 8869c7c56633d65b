"""``python -m tip.probe``: the student's rollouts, ``probe.batches`` measured pairs of batches,
probe.json, probe.md and probe.png in the run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tip.config import CONF_DIR, ConfigError, check_config, require_conf_dir
from tip.errors import one_line_errors
from tip.models import load_model, load_tokenizer, resolve_attention
from tip.probe.measure import probe_batch
from tip.probe.predictions import verdicts
from tip.probe.tables import plot, render
from tip.rollout import RolloutBatch, hf_generate
from tip.selection import RULES


def student_rollouts(student, tokenizer, prompt_ids: list[list[int]], cfg) -> RolloutBatch:
    return hf_generate(student, tokenizer, prompt_ids, n=cfg.probe.samples, temperature=1.0,
                       max_new_tokens=cfg.probe.max_new_tokens)


def check_probe(cfg) -> None:
    pr = cfg.probe
    for key in ("prompts", "samples", "max_new_tokens", "blocks", "batches"):
        if not isinstance(pr[key], int) or isinstance(pr[key], bool) or pr[key] < 1:
            raise ConfigError(f"probe.{key}={pr[key]!r} is not allowed: expected an integer >= 1")
    for rule in pr.rules:
        if rule not in RULES:
            raise ConfigError(f"probe.rules: {rule!r} is not a rule; known: {', '.join(RULES)}")
    for key in ("entropy", "divergence"):
        value = pr.absolute.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"probe.absolute.{key}={value!r} is not allowed: expected a number "
                              ">= 0 (h normalised, delta in nats)")
    for keep in pr.keeps:
        if not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ConfigError(f"probe.keeps: {keep!r} is not allowed: expected numbers in (0, 1]")


def run_probe(cfg: DictConfig, run_dir: Path) -> dict:
    """``probe.batches`` independent (probed, held-out) pairs of batches from disjoint prompts."""
    from tip.data import load_examples
    from tip.parts import training_prompt_ids

    check_config(cfg)
    check_probe(cfg)
    if (run_dir / "probe.json").exists():
        raise ConfigError(f"{run_dir / 'probe.json'} exists: a finished probe is never "
                          "overwritten; choose another hydra.run.dir")
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from tip.engine import resolve_precision

    dtype = resolve_precision(cfg.precision, device)
    tokenizer = load_tokenizer(cfg.pair.tokenizer or cfg.pair.student)
    examples = load_examples(cfg.data.source, "train")
    need = 2 * cfg.probe.prompts * cfg.probe.batches
    if len(examples) < need:
        raise ConfigError(f"probe needs {need} training prompts (2 x probe.prompts x "
                          f"probe.batches), the data has {len(examples)}")
    order = torch.randperm(len(examples), device="cpu",
                           generator=torch.Generator(device="cpu").manual_seed(cfg.seed))
    prompts = training_prompt_ids(cfg, tokenizer, [examples[i] for i in order[:need].tolist()])
    attention = resolve_attention(cfg.model.attn_implementation, device.type)
    # the student's tail is differentiated twice (token_alignments): eager attention has a double
    # backward, torch's fused SDPA kernels do not
    student = load_model(cfg.pair.student, dtype, "student", "eager").to(device).eval()
    teacher = load_model(cfg.pair.teacher, dtype, "teacher", attention).to(device).eval()
    teacher.requires_grad_(False)
    batches, p = [], cfg.probe.prompts
    for b in range(cfg.probe.batches):
        t0 = time.time()
        torch.manual_seed(cfg.seed + b)
        chunk = prompts[2 * p * b: 2 * p * (b + 1)]
        probed = student_rollouts(student, tokenizer, chunk[:p], cfg).to(device)
        held_out = student_rollouts(student, tokenizer, chunk[p:], cfg).to(device)
        batches.append(probe_batch(student, teacher, probed, held_out, cfg, cfg.seed + b))
        batches[-1]["seconds"] = round(time.time() - t0, 1)
        print(f"batch {b + 1}/{cfg.probe.batches}: {batches[-1]['tokens']} tokens, "
              f"{batches[-1]['seconds']} s", flush=True)
    result = {"pair": {"student": cfg.pair.student, "teacher": cfg.pair.teacher},
              "divergence": cfg.divergence.name,
              "probe": OmegaConf.to_container(cfg.probe, resolve=True), "batches": batches}
    result["verdicts"] = verdicts(result)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    (run_dir / "probe.md").write_text(render(result) + "\n")
    plot(result, run_dir / "probe.png")
    print(render(result), flush=True)
    print(f"wrote probe.json, probe.md and probe.png to {run_dir}", flush=True)
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    with one_line_errors(multirun=False):
        run_probe(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    require_conf_dir()
    hydra_main()
