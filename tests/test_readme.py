"""Every command and config key the README and its guides (docs/*.md) show is real: training and evaluation
commands compose through Hydra (with every override they name), modules, scripts and make targets exist, and the
keys their tables list are in the config. The README stays a front page: short, and every guide it links exists."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from support import CONF_DIR, DATA_ROOT, ROOT, compose_config

FRONT_PAGE = (ROOT / "README.md").read_text()
GUIDES = sorted((ROOT / "docs").rglob("*.md"))  # the guides and, under results/, the logs
README = "\n".join([FRONT_PAGE, *(g.read_text() for g in GUIDES)])  # commands and keys, wherever they live


def code_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def first_value(value: str) -> str:
    """The first value of a sweep list ``a,b`` (not inside brackets)."""
    depth, out = 0, ""
    for ch in value:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            break
        out += ch
    return out


def overrides_of(tokens: list[str]) -> list[str]:
    out = []
    for tok in tokens:
        if "=" not in tok or tok.startswith("-") or "<" in tok:
            continue
        key, value = tok.split("=", 1)
        if key.startswith("hydra.") or key.startswith("hydra/"):
            continue  # Hydra's own settings; launchers are checked below
        out.append(f"{key}={first_value(value)}")
    return out


def launcher_of(tokens: list[str]) -> str | None:
    return next((t.split("=", 1)[1] for t in tokens if t.startswith("hydra/launcher=")), None)


COMMANDS = code_lines()
TRAIN = [c for c in COMMANDS if re.search(r"(-m|--module) tip\.train|make train", c)]
EVAL = [c for c in COMMANDS if "-m tip.eval" in c]


def test_the_readme_shows_commands():
    assert len(TRAIN) >= 15 and len(EVAL) >= 3


def test_the_readme_is_a_front_page_whose_links_exist():
    assert len(FRONT_PAGE.encode()) <= 10_240, "the README is a front page: move reference text to docs/"
    for name in ("## Set-up", "## File map", "## A five-minute tour", "## Guides", "## What tip shows",
                 "## The loop"):
        assert name in FRONT_PAGE
    assert "(docs/results/README.md)" in FRONT_PAGE  # results live apart from the front page
    assert re.search(r"```bash\nmake train .*\nmake test .*\n```", FRONT_PAGE), "the two set-up commands"
    for page, text in [(ROOT / "README.md", FRONT_PAGE), *((g, g.read_text()) for g in GUIDES)]:
        for target in re.findall(r"\]\(([^)#]+?\.(?:md|png))(?:#[^)]*)?\)", text):
            if not target.startswith("http"):
                assert (page.parent / target).is_file(), f"{page.name} links to {target}, which does not exist"
    for guide in ("concepts", "running", "sweeps", "gpus", "testbed", "performance"):
        assert f"(docs/{guide}.md)" in FRONT_PAGE


@pytest.mark.parametrize("command", TRAIN)
def test_every_training_command_composes(command):
    tokens = shlex.split(command.replace('ARGS="', "").replace('"', ""))
    cfg = compose_config(*overrides_of(tokens))
    assert cfg.selector.name
    launcher = launcher_of(tokens)
    if launcher and launcher != "basic":
        assert (Path(CONF_DIR) / "hydra" / "launcher" / f"{launcher}.yaml").is_file(), launcher


@pytest.mark.parametrize("command", EVAL)
def test_every_evaluation_command_composes(command):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"data_root={DATA_ROOT}", *overrides_of(shlex.split(command))])
    assert cfg.eval.benchmarks


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in TRAIN and c not in EVAL])
def test_every_other_command_names_something_that_exists(command):
    loop = re.fullmatch(r"for \w+ in .*?; do (.*?); done", command)  # a shell loop: its body
    tokens = shlex.split(loop[1] if loop else command)
    if tokens[0] == "make":
        assert re.search(rf"(?m)^{re.escape(tokens[1])}:", (ROOT / "Makefile").read_text()), command
    elif tokens[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(tokens[2]) is not None, command
    elif tokens[0] == "python":
        assert (ROOT / tokens[1]).is_file(), command
    elif tokens[0] in ("cat", "wandb", ".", "pip"):
        pass
    else:
        raise AssertionError(f"a README command this test does not know how to check: {command}")


def table_keys() -> list[str]:
    """Keys of the README's option tables: `group.*` rows list their sub-keys; `a.b` cells name keys."""
    keys = []
    for row in re.findall(r"(?m)^\| `([a-z_]+)\.\*` \| (.*) \|$", README):
        prefix, cells = row
        keys += [f"{prefix}.{k}" for k in re.findall(r"`([a-z_.{},]+)`", cells)]
    keys += re.findall(r"`((?:train|rollout|selection|selector|eval|teacher|logger|pair|engine|divergence)\.[a-z_]+)`",
                       README)
    return sorted(k for k in set(keys) if not k.endswith((".json", ".py", ".yaml", ".md")))


# Keys that only exist under one option of their group.
UNDER = {"logger.": "logger=wandb", "teacher.": "teacher=self_privileged", "selector.": "selector=entropy_jsd_sample",
         "selector.is_weight_cap": "selector=entropy_sample_is_capped",
         **{f"rollout.{k}": "rollout=vllm" for k in ("vllm_python", "max_model_len", "enforce_eager", "sleep",
                                                    "sync_bucket_mb", "gpu_memory_utilization", "max_logp_gap",
                                                    "sleep_level", "weight_transfer", "prefix_caching")}}


def expand(key: str) -> list[str]:
    match = re.fullmatch(r"(.*)\{(.*)\}", key)
    return [f"{match[1]}{k}" for k in match[2].split(",")] if match else [key]


@pytest.mark.parametrize("key", table_keys())
def test_every_key_the_readme_names_exists(key):
    prefixes = [prefix for prefix in UNDER if key.startswith(prefix)]  # the longest matching prefix decides
    cfg = compose_config(*([UNDER[max(prefixes, key=len)]] if prefixes else []))
    for full in expand(key):
        node = cfg
        for part in full.split("."):
            assert part in node, f"README names {full}, which the config does not have"
            node = node[part]


def test_docs_holds_the_guides_and_results_hold_the_logs():
    """A newcomer reads docs/ in the README's order: every page there is a guide the README lists;
    results and measurement logs live under docs/results/ (issue 38)."""
    top = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [n for n in top if f"(docs/{n})" not in FRONT_PAGE] == []
    assert not [n for n in top if "result" in n or "decision" in n or "measurement" in n]
    logs = {p.name for p in (ROOT / "docs" / "results").glob("*.md")}
    assert {"README.md", "measurements.md", "testbed_v1.md", "testbed_v2_decisions.md"} <= logs
