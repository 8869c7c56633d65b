"""tip.plan's estimate against the measured peak of the same run on this CPU.

    python bench/plan_check.py            # the embedded pair: ZeRO-3 and ZeRO-0, with and without checkpointing
    python bench/plan_check.py --real     # also Qwen2.5-Coder-1.5B -> 0.5B (experiment=real_cpu; ~21 GB, minutes)

Each case runs tip.train's main in a child process that prints its own peak resident set size (not its
children's: DeepSpeed's op probes run compilers). A second child imports what a run imports, starts the
process group and loads the tokenizer and data, and stops before any model loads: its peak is the runtime's share
(Python, torch, DeepSpeed, transformers), which tip.plan leaves out on CPU. Printed: plan / (measured - runtime);
1.00 is exact, below 1 an underestimate. The embedded cases cap responses short enough that the longest rollout
reaches the cap: tip.plan counts every response at full length.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tip.plan import estimate  # noqa: E402

BIG_BATCH = ["engine=zero0", "rollout.n=64", "train.prompts_per_step=16", "train.micro_batch_size=1024",
             "rollout.max_new_tokens=8", "eval.max_new_tokens=8", "train.steps=1", "train.eval_before=false"]
CASES = {  # responses capped short enough that the longest rollout reaches the cap (tip.plan's worst case)
    "embedded, ZeRO-3, smoke": ["experiment=smoke"],
    "embedded, ZeRO-0, 1024 rollouts x 17 tokens": BIG_BATCH,
    "embedded, ZeRO-0, same, checkpointing": BIG_BATCH + ["train.gradient_checkpointing=true"],
}
REAL = {"Qwen2.5-Coder 1.5B -> 0.5B, ZeRO-0 (real_cpu)": ["pair=qwen25_coder_cpu", "experiment=real_cpu"]}
COMMON = ["logger=none", "train.save_final=false"]
RUNTIME = """
import resource, sys
from hydra import compose, initialize_config_dir
import deepspeed  # noqa: F401
from tip.config import CONF_DIR
from tip.data import load_examples
from tip.distributed import init_distributed
from tip.models import load_tokenizer
from tip.parts import training_prompt_ids
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("config", overrides=sys.argv[1:])
init_distributed(60)
training_prompt_ids(cfg, load_tokenizer(cfg.pair.student), load_examples(cfg.data.source, "train"))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


TRAIN = """
import resource, runpy, sys
sys.argv = ["tip.train", *sys.argv[1:]]
runpy.run_module("tip.train", run_name="__main__")
print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def own_peak(script: str, args: list[str]) -> int:
    """Peak RSS (bytes) of a child process running ``script``, as it reports it on its last line."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1].split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", action="store_true", help="also the real Qwen2.5-Coder pair (python -m tip.pairs fetch)")
    args = ap.parse_args()
    cases = {**CASES, **(REAL if args.real else {})}
    print(f"{'case':<48}{'plan MB':>9}{'measured':>10}{'runtime':>9}{'plan/(meas.-runtime)':>22}")
    for name, overrides in cases.items():
        plan, _ = estimate(overrides + COMMON, gpus=1, device="cpu")
        with tempfile.TemporaryDirectory() as tmp:
            measured = own_peak(TRAIN, [*overrides, *COMMON, f"hydra.run.dir={tmp}/run"])
        runtime = own_peak(RUNTIME, overrides)
        ratio = plan.peak / max(measured - runtime, 1)
        print(f"{name:<48}{plan.peak / 1e6:>9.0f}{measured / 1e6:>10.0f}{runtime / 1e6:>9.0f}{ratio:>22.2f}",
              flush=True)


if __name__ == "__main__":
    main()
