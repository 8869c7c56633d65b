"""Read the records of a W&B run file (run-<id>.wandb), which wandb 0.31 no longer reads back in Python.

The file is a 7-byte header (":W&B", a 2-byte magic, a version byte) followed by LevelDB-log blocks of 32 KiB:
each chunk has a 4-byte checksum, a 2-byte little-endian length and a type (1 full, 2 first, 3 middle, 4 last);
a block's tail shorter than a chunk header is padding. Each assembled record is a wandb_internal_pb2.Record.
"""

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path, wait_s: float = 60.0) -> list:
    """The run file's records once it is complete. wandb buffers the file and writes it from its own core process
    (wandb/wandb#9525: an offline run's file is empty while it runs); here, read right after ``run.finish()`` on a
    loaded machine, a file once lacked its exit record and once its run record. So this waits, up to ``wait_s``,
    for the exit record every finished run writes; then it returns what is there, and the caller's assertion says
    what is missing."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            out = _read_records(path)
        except Exception:  # a record still half written
            out = []
        if any(r.WhichOneof("record_type") == "exit" for r in out) or time.monotonic() > deadline:
            return out if out else _read_records(path)
        time.sleep(0.5)


def _read_records(path: Path) -> list:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def history(path: Path) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records(path) if r.WhichOneof("record_type") == "history"]


def config(path: Path) -> dict:
    """The run's config: the run record's initial values, then any later config updates."""
    out = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for item in updates:
            out[item.key] = json.loads(item.value_json)
    return out


def exit_code(path: Path) -> int | None:
    codes = [r.exit.exit_code for r in records(path) if r.WhichOneof("record_type") == "exit"]
    return codes[-1] if codes else None
