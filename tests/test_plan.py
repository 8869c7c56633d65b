"""tip.plan: per-GPU memory from the models' configs, before any weights load."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tip.memory_plan import GB, RunShape, plan_memory
from tip.model_shape import SNAPSHOT_DIR, ModelShape, load_model_config, model_shape
from tip.models import PairError, resolve_model_ref
from tip.plan import estimate

from support import ROOT


def _saved_bytes_of_a_real_forward(model, batch: int, tokens: int) -> int:
    """What autograd really saves in the decoder's forward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (batch, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_decoder()(input_ids=ids, use_cache=False)
    return sum(saved.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_meta_device_activation_count_matches_a_real_forward(checkpointing):
    """The embedded student, fp32 on this CPU (its SDPA kernel keeps the log-sum-exp, not T x T, like CUDA's)."""
    ref = "embedded://student"
    model = AutoModelForCausalLM.from_pretrained(resolve_model_ref(ref))
    shape = model_shape(ref, torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        # In the forward only the layers' inputs are kept; one layer is recomputed in backward.
        predicted = shape.checkpointed_activations_per_token - shape.layer_activations_per_token
    else:
        predicted = shape.activations_per_token
    batch, tokens = 4, 96
    real = _saved_bytes_of_a_real_forward(model, batch, tokens)
    assert real == pytest.approx(predicted * batch * tokens, rel=0.1), (real, predicted * batch * tokens)


def test_parameter_counts_are_exact():
    ref = "embedded://teacher"
    model = AutoModelForCausalLM.from_pretrained(resolve_model_ref(ref))
    shape = model_shape(ref, torch.float32)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.head == model.get_output_embeddings().weight.numel()
    assert shape.layers == model.config.num_hidden_layers


# Published sizes (the model cards), which the shipped snapshots must reproduce.
PAPER_MODELS = {"Qwen/Qwen3-0.6B": 0.596e9,  # its card: 0.6B, 0.44B without the embedding (sweeps=gpu_central_claim)
                "Qwen/Qwen3-1.7B": 1.72e9, "Qwen/Qwen3-4B": 4.02e9, "Qwen/Qwen3-8B": 8.19e9,
                "Qwen/Qwen3-14B": 14.77e9, "Qwen/Qwen3-32B": 32.76e9, "Qwen/Qwen2.5-1.5B-Instruct": 1.54e9,
                "Qwen/Qwen2.5-14B-Instruct": 14.77e9, "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
                "meta-llama/Llama-3.3-70B-Instruct": 70.55e9}


def test_every_paper_model_has_a_snapshot_with_its_published_size(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert {p.stem.replace("--", "/") for p in SNAPSHOT_DIR.glob("*.json")} == set(PAPER_MODELS)
    for ref, size in PAPER_MODELS.items():
        shape = model_shape(ref, torch.bfloat16)
        assert shape.params == pytest.approx(size, rel=0.005), ref
        assert "snapshot" in shape.source


def test_a_model_without_any_config_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PairError, match=r"no config for 'someone/Unknown-7B'.*Qwen/Qwen3-4B"):
        load_model_config("someone/Unknown-7B")


def _shape(params=1_000_000_000, hidden=2048, layers=16, vocab=100_000, width=2) -> ModelShape:
    return ModelShape(ref="m", source="test", params=params, largest_layer=params // (layers + 2),
                      head=vocab * hidden, vocab=vocab, hidden=hidden, layers=layers, weight_bytes=width,
                      kv_per_token=2 * layers * 1024 * width, layer_activations_per_token=30 * hidden,
                      top_activations_per_token=6 * hidden,
                      forward_per_token=12 * hidden)


def _run(**changes) -> RunShape:
    base = dict(gpus=8, stage=3, offload_optimizer=False, offload_param=False, gather_for_generate=True,
                prompt_tokens=1000, response_tokens=3000, rollouts_per_rank=16, micro=4, chunk=512, checkpointing=True,
                backend="vllm", vllm_fraction=0.3, vllm_sleeps=True, rollout_seqs=16, eval_seqs=16,
                eval_response_tokens=3000, reduce_bucket=500_000_000, prefetch_bucket=50_000_000)
    return RunShape(**{**base, **changes})


def _item(plan, phase, starts):
    (item,) = [i for i in plan.items if i.phase == phase and i.what.startswith(starts)]
    return item


def test_zero_stages_partition_what_they_should():
    student, teacher = _shape(), _shape(params=4_000_000_000, hidden=4096)
    p = student.params
    for stage, weights, grads, optimizer in [(0, 2 * p, 2 * p, 8 * p), (1, 2 * p, 4 * p, 12 * p / 8),
                                             (2, 2 * p, 4 * p / 8, 12 * p / 8), (3, 2 * p / 8, 4 * p / 8, 12 * p / 8)]:
        plan = plan_memory(_run(stage=stage), student, teacher, 80 * GB, on_cuda=True)
        assert _item(plan, "resident", "student weights").bytes == pytest.approx(weights), stage
        assert _item(plan, "resident", "student gradients").bytes == pytest.approx(grads), stage
        assert _item(plan, "resident", "optimizer state").bytes == pytest.approx(optimizer), stage
        teacher_share = 8 if stage == 3 else 1
        assert _item(plan, "resident", "teacher weights").bytes == pytest.approx(2 * teacher.params / teacher_share)
    offloaded = plan_memory(_run(offload_optimizer=True), student, teacher, 80 * GB, on_cuda=True)
    assert _item(offloaded, "resident", "optimizer state").host
    # ZeRO-3's fp32 reduce bucket stays on the GPU for the run (issue 40)
    bucket = 4 * _run().reduce_bucket  # its whole size, whatever the model (DeepSpeed allocates it so)
    assert offloaded.phase_bytes("resident") == pytest.approx(2 * p / 8 + 2 * teacher.params / 8 + bucket)
    assert any("offloaded to CPU memory" in n for n in offloaded.notes)


def test_checkpointing_micro_batch_and_vllm_reservation_enter_where_they_should():
    student, teacher = _shape(), _shape()
    on = plan_memory(_run(), student, teacher, 80 * GB, on_cuda=True)
    off = plan_memory(_run(checkpointing=False), student, teacher, 80 * GB, on_cuda=True)
    tokens = 4 * 4000
    assert _item(on, "gradient", "student activations").bytes == pytest.approx(
        tokens * (16 * 2048 * 2 + 36 * 2048))
    assert _item(off, "gradient", "student activations").bytes == pytest.approx(tokens * (16 * 30 + 6) * 2048)
    double = plan_memory(_run(micro=8), student, teacher, 80 * GB, on_cuda=True)
    assert _item(double, "gradient", "student activations").bytes == pytest.approx(
        2 * _item(on, "gradient", "student activations").bytes)
    assert _item(on, "rollout", "vLLM").bytes == pytest.approx(0.3 * 80 * GB)
    awake = plan_memory(_run(vllm_sleeps=False), student, teacher, 80 * GB, on_cuda=True)  # rollout.sleep=false
    assert _item(awake, "resident", "vLLM").bytes == pytest.approx(0.3 * 80 * GB)
    assert awake.peak == pytest.approx(on.peak - on.phase_bytes(on.peak_phase) + awake.phase_bytes(awake.peak_phase)
                                       + 0.3 * 80 * GB)
    hf = plan_memory(_run(backend="hf"), student, teacher, 80 * GB, on_cuda=True)
    assert _item(hf, "rollout", "KV cache").bytes == pytest.approx(16 * 4000 * student.kv_per_token)
    # One micro-batch: the student's activations are held while the teacher scores.
    assert not [i for i in on.items if i.phase == "scoring" and i.what.startswith("student activations")]
    one = plan_memory(_run(micro=16), student, teacher, 80 * GB, on_cuda=True)
    assert _item(one, "scoring", "student activations").bytes > 0
    # Two processes with rollout=vllm: the worker's context is held in every phase, on top of the trainer's.
    assert on.peak == pytest.approx(on.phase_bytes("resident") + on.phase_bytes(on.peak_phase) + 3.0 * GB)
    assert _item(on, "runtime", "vLLM worker").bytes == pytest.approx(1.0 * GB)
    assert not [i for i in hf.items if i.what.startswith("vLLM")]
    assert hf.peak == pytest.approx(hf.phase_bytes("resident") + hf.phase_bytes(hf.peak_phase) + 2.0 * GB)


PAPER_OVERLAYS = {"paper_qwen3_8b_to_4b": 8, "paper_llama70b_to_8b": 8, "paper_qwen25_14b_to_1p5b": 4,
                  "paper_qwen3_14b_to_1p7b": 8, "paper_qwen3_32b_to_1p7b": 8}


@pytest.mark.parametrize("overlay", sorted(PAPER_OVERLAYS))
def test_each_paper_overlay_fits_an_80_gb_gpu_by_its_plan(overlay, monkeypatch):
    """On the paper's GPU count (4 or 8), at the paper's lengths: the overlays' micro-batch sizes were chosen so."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan, header = estimate([f"experiment={overlay}"], gpus=PAPER_OVERLAYS[overlay], gpu_gb=80)
    assert "2,048 + 8,192 tokens" in header[-1]
    assert plan.peak <= 0.9 * 80 * GB, (overlay, plan.peak / GB)
    assert any(i.phase == "rollout" and i.what.startswith("vLLM") for i in plan.items)  # asleep in the step on GPUs


def test_the_cli_prints_the_plan_without_loading_weights(capsys):
    from tip.config import ConfigError
    from tip.plan import main

    assert main(["--device", "cpu", "--gpus", "1", "experiment=smoke"]) == 0
    out = capsys.readouterr().out
    assert "1 CPU process, fp32, ZeRO-3, rollout=hf" in out
    assert "student embedded://student" in out and "peak" in out
    with pytest.raises(ConfigError, match="train.prompts_per_step=3 with rollout.n=1 is not allowed on 4 GPUs"):
        main(["train.prompts_per_step=3", "rollout.n=1", "--gpus", "4"])


@pytest.mark.slow
def test_the_command_line_prints_one_line_for_a_bad_value():
    bad = subprocess.run([sys.executable, "-m", "tip.plan", "train.prompts_per_step=3", "rollout.n=1", "--gpus",
                          "4"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        "tip.plan: train.prompts_per_step=3 with rollout.n=1 is not allowed on 4 GPUs: the step's 3 rollouts must "
        "divide evenly over the GPUs (4)"]


def test_the_attention_mask_is_counted_unless_flash_attention_builds_none():
    """SDPA and eager get a boolean T x T mask per row (0.42 GB at 4 x 10k tokens), held through the forward and
    backward; FlashAttention (variable-length over packed rows) none. Before, tip.plan counted neither."""
    student, teacher = _shape(), _shape()
    sdpa = plan_memory(_run(prompt_tokens=2000, response_tokens=8000), student, teacher, 80 * GB, on_cuda=True)
    flash = plan_memory(_run(prompt_tokens=2000, response_tokens=8000, attention="flash_attention_2"), student,
                        teacher, 80 * GB, on_cuda=True)
    assert _item(sdpa, "gradient", "attention mask").bytes == pytest.approx(4 * 10_000 ** 2)
    assert _item(sdpa, "scoring", "attention mask").bytes == pytest.approx(4 * 10_000 ** 2)
    assert not [i for i in flash.items if i.what.startswith("attention mask")]
    assert sdpa.phase_bytes("gradient") == pytest.approx(flash.phase_bytes("gradient") + 0.4 * GB)


def test_evaluation_through_the_engine_and_its_kv_cache_are_counted():
    """With rollout=vllm the evaluation phase is the engine's reservation, not HF generate's gathered student and KV
    cache; a level-1 sleep keeps the engine's weights in host memory, level 2 nothing; the notes compare the engine's
    KV cache with a rollout's worst case (a prompt's samples share its blocks with prefix caching) and give the
    largest reservation that fits."""
    student, teacher = _shape(), _shape()
    plan = plan_memory(_run(vllm_sleep_level=2, prompts_per_rank=1), student, teacher, 80 * GB, on_cuda=True)
    assert _item(plan, "evaluation", "vLLM").bytes == pytest.approx(0.3 * 80 * GB)
    assert not [i for i in plan.items if "HF generate" in i.what or i.host]
    level1 = plan_memory(_run(vllm_sleep_level=1), student, teacher, 80 * GB, on_cuda=True)
    assert _item(level1, "resident", "vLLM's weights while it sleeps").bytes == pytest.approx(2 * student.params)
    assert _item(level1, "resident", "vLLM's weights while it sleeps").host
    kv_tokens = int((0.3 * 80 * GB - 2 * student.params - 1.5 * GB) // student.kv_per_token)
    worst = 1 * 1000 + 16 * 3000  # one prompt's blocks shared by its 16 samples
    assert f"about {kv_tokens:,} tokens for a rollout's worst case of {worst:,}" in plan.notes[0]
    unshared = plan_memory(_run(prefix_caching=False), student, teacher, 80 * GB, on_cuda=True)
    assert f"worst case of {16 * 4000:,}" in unshared.notes[0]
    fixed = plan.phase_bytes("resident") + plan.phase_bytes("runtime")
    assert f"up to {(0.9 * 80 * GB - fixed) / (80 * GB):.2f} keeps" in plan.notes[1]


def test_the_plan_counts_hpz_the_reduce_bucket_and_the_drivers_total():
    """Issue 40: the plan left out hpZ's second weight partition when a run spans nodes, counted the fp32 reduce
    bucket at 2 bytes and only in the step, and sized vLLM's share from --gpu-gb x 1e9 instead of the total the
    driver reports (vLLM's gpu_memory_utilization is a share of that). Llama-70B -> 8B on 16 GPUs: about 40 GB
    resident (the issue measured 39.5), where the plan said 17.9."""
    from tip.memory_plan import DRIVER_VISIBLE, driver_total
    from tip.plan import estimate

    assert driver_total(80) == pytest.approx(85.0e9, rel=0.002) and DRIVER_VISIBLE < 1
    two_nodes, _ = estimate(["experiment=paper_llama70b_to_8b"], gpus=16)
    one_node, _ = estimate(["experiment=paper_llama70b_to_8b"], gpus=8)
    items = {i.what: i.bytes for i in two_nodes.items if i.phase == "resident"}
    assert items["teacher hpZ secondary partition (bf16, 1/8)"] == pytest.approx(70.55e9 * 2 / 8, rel=0.01)
    assert items["student hpZ secondary partition (bf16, 1/8)"] == pytest.approx(8.03e9 * 2 / 8, rel=0.01)
    assert items["ZeRO-3 reduce bucket (fp32, held through the run)"] == 4 * 500_000_000
    assert not any("reduce" in i.what for i in two_nodes.items if i.phase in ("scoring", "gradient"))
    assert not any("hpZ" in i.what for i in one_node.items)  # one node: no secondary partition
    assert 38e9 < two_nodes.phase_bytes("resident") < 42e9
    vllm = next(i for i in two_nodes.items if i.phase == "rollout")
    assert vllm.bytes == pytest.approx(0.35 * driver_total(80))
    assert items["weight-sync staging buffer (packed CUDA IPC)"] == pytest.approx(max(2**30, 128_256 * 4096 * 2))
    assert two_nodes.peak <= 0.9 * driver_total(80)  # the overlay's share fits on 16 GPUs too


@pytest.mark.slow
def test_the_docs_memory_tables_are_the_codes():
    """docs/paper_plans.md and docs/gpus.md's table are what `python -m tip.plan_docs` writes now (they
    had drifted: vLLM at 0.3 and HF evaluation, where the overlays run vLLM at 0.6, issue 40)."""
    from tip.plan_docs import TABLE_END, TABLE_START, paper_docs

    page, table = paper_docs()
    assert (ROOT / "docs" / "paper_plans.md").read_text() == page
    gpus = (ROOT / "docs" / "gpus.md").read_text()
    assert gpus.split(TABLE_START)[1].split(TABLE_END)[0].strip() == table


@pytest.mark.slow
def test_the_plans_hpz_and_reduce_bucket_terms_are_what_deepspeed_allocates(tmp_path):
    """Four gloo processes stand in for 2 nodes of 2 GPUs (engine.hpz_partition_size=2): each rank's hpZ secondary
    partitions of the student and the teacher, and ZeRO-3's reduce bucket, as DeepSpeed allocates them, against the
    plan's terms (issue 40)."""
    import json

    from tip.memory_plan import RunShape, resident_items
    from tip.model_shape import model_shape

    from support import DATA_ROOT, torchrun

    out = tmp_path / "hpz.json"
    overrides = ["experiment=smoke", "engine=zero3", "engine.hpz_partition_size=2", "logger=none",
                 f"data_root={DATA_ROOT}", "+engine.deepspeed.zero_optimization.reduce_bucket_size=1000000"]
    proc = torchrun(4, str(ROOT / "tests" / "hpz_memory.py"), str(out), *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    student, teacher = model_shape("embedded://student", torch.float32), model_shape("embedded://teacher",
                                                                                    torch.float32)
    run = RunShape(gpus=4, stage=3, offload_optimizer=False, offload_param=False, gather_for_generate=True,
                   prompt_tokens=16, response_tokens=16, rollouts_per_rank=2, micro=2, chunk=64,
                   checkpointing=False, backend="hf", vllm_fraction=0.0, vllm_sleeps=False, rollout_seqs=2,
                   eval_seqs=2, eval_response_tokens=16, reduce_bucket=1_000_000, prefetch_bucket=50_000_000,
                   hpz=2)
    plan = {i.what: i.bytes for i in resident_items(run, student, teacher)}
    for r in ranks:
        assert r["student_params"] == student.params and r["teacher_params"] == teacher.params
        # DeepSpeed rounds each parameter's partition up: within a few percent of numel / hpz
        assert r["student_secondary"] == pytest.approx(plan["student hpZ secondary partition (fp32, 1/2)"],
                                                       rel=0.05)
        assert r["teacher_secondary"] == pytest.approx(plan["teacher hpZ secondary partition (fp32, 1/2)"],
                                                       rel=0.05)
        assert r["reduce_bucket"] == plan["ZeRO-3 reduce bucket (fp32, held through the run)"]
