"""What every testbed pair is made of: one character-level tokenizer, a tiny Qwen3 model of a
given shape, and the pair's files (each model with the tokenizer, and ``build.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from tip.checkpoint import atomic_dir

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list("0123456789+-*/=;:.,()[]{}\\ ") + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character over digits, operators, brackets, backslash, space and lowercase
    letters."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side="left", model_max_length=256,
    )


@dataclass
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    steps: int
    lr: float
    # vLLM's CPU attention kernels support head sizes 32, 64, ...; not hidden/heads = 24
    head_dim: int = 32
    # label smoothing: the probability kept off the target token, spread uniformly
    smoothing: float = 0.01


def make_model(spec: ModelSpec, vocab_size: int, tok: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    return Qwen3ForCausalLM(cfg)


def save_pair(out: Path, models_: dict, tok, report: dict, measure_key: str, measure) -> None:
    """Record each model's size and ``measure(model)`` under ``report[name][measure_key]``, then
    write the pair (``write_pair``)."""
    for name, model in models_.items():
        report[name]["params"] = sum(p.numel() for p in model.parameters())
        report[name][measure_key] = measure(model)
        print(f"{name}: held-out greedy {measure_key}: {report[name][measure_key]}", flush=True)
    write_pair(out, models_, tok, report)


def write_pair(out: Path, models_: dict, tok, report: dict) -> None:
    """Each model with the tokenizer in ``out/<name>`` and ``report`` as ``build.json``, all at once
    (a rebuild replaces the pair; a failed one leaves the old pair whole)."""

    def write(tmp: Path) -> None:
        for name, model in models_.items():
            model.save_pretrained(tmp / name)
            tok.save_pretrained(tmp / name)
        (tmp / "build.json").write_text(json.dumps(report, indent=2) + "\n")

    atomic_dir(out, write, replace=True)
