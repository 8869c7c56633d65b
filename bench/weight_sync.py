"""Host side of the vLLM weight sync: the trainer pickles parameters over a local socket to its rollout worker.

    python bench/weight_sync.py [--mb 1024] [--repeats 3] [--bucket-mb 0 16 64 512]

Sends ``--mb`` of bf16 tensors shaped like a Qwen3-4B decoder layer's parameters to a receiving process that
unpickles them, for each bucket size (0: one parameter per message, the CPU default of rollout.sync_bucket_mb),
and prints GB/s (median of the repeats, sizes alternating) and the ratio to one parameter per message. It
measures pickling and the socket
only: the GPU-to-host copy (PCIe, ~20 GB/s pinned) and the worker's load into vLLM are not in it. Seconds per
step for a student of P parameters: 2P bytes / the printed rate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from multiprocessing import Process
from multiprocessing.connection import Client, Listener
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tip.vllm_server import recv, send  # noqa: E402

# One Qwen3-4B decoder layer (hidden 2560, intermediate 9728, 32 query / 8 KV heads of 128): its parameters.
LAYER = [(4096, 2560), (1024, 2560), (1024, 2560), (2560, 4096), (9728, 2560), (9728, 2560), (2560, 9728),
         (2560,), (2560,), (128,), (128,)]


def receiver(address: str, authkey: bytes) -> None:
    with Client(address, authkey=authkey) as conn:
        while True:
            msg = recv(conn)
            if msg == "stop":
                return
            send(conn, "ok")


def parameters(total_mb: int) -> list[torch.Tensor]:
    out, size = [], 0
    while size < total_mb * 2**20:
        for shape in LAYER:
            out.append(torch.randn(shape).to(torch.bfloat16))
            size += out[-1].numel() * 2
    return out


def sync(conn, params, bucket_bytes: int) -> float:
    start = time.perf_counter()
    bucket, size = [], 0
    for i, p in enumerate(params):
        bucket.append((f"p{i}", p))
        size += p.numel() * 2
        if size >= bucket_bytes:
            send(conn, ("load_weights", bucket))
            recv(conn)
            bucket, size = [], 0
    if bucket:
        send(conn, ("load_weights", bucket))
        recv(conn)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, nargs="+", default=[0, 16, 64, 512])
    args = ap.parse_args()
    params = parameters(args.mb)
    gb = sum(p.numel() * 2 for p in params) / 1e9
    authkey = os.urandom(16)
    with tempfile.TemporaryDirectory() as tmp:
        listener = Listener(os.path.join(tmp, "socket"), family="AF_UNIX", authkey=authkey)
        proc = Process(target=receiver, args=(listener.address, authkey))
        proc.start()
        conn = listener.accept()
        rates: dict[float, list[float]] = {mb: [] for mb in args.bucket_mb}
        for _ in range(args.repeats):  # side by side, alternating
            for mb in args.bucket_mb:
                rates[mb].append(gb / sync(conn, params, int(mb * 2**20)))
        send(conn, "stop")
        proc.join()
        listener.close()
    med = {mb: statistics.median(v) for mb, v in rates.items()}
    base = med.get(0.0) or next(iter(med.values()))
    print(f"{len(params)} bf16 parameters, {gb:.2f} GB, median of {args.repeats}")
    for mb, rate in med.items():
        name = "one parameter per message" if mb == 0 else f"buckets of {mb:g} MB"
        print(f"  {name:28s} {rate:6.2f} GB/s   {rate / base:.2f}x")


if __name__ == "__main__":
    main()
