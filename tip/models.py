"""Loading teacher/student pairs and reaching their output heads.

Model references are local directories, hub ids, or ``embedded://teacher`` / ``embedded://student``
(the pair the project ships, see ``tip.testbed``). Loading never reaches the network when the hub is
unavailable: a hub id that is not cached fails with one message that says how to fix it.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tip.errors import UserError
from tip.signals import softcap

EMBEDDED_SCHEME = "embedded://"
EMBEDDED_DIR = Path(__file__).resolve().parent / "assets" / "embedded_pair"
EMBEDDED_MODELS = {  # embedded://NAME -> (its directory, the command that rebuilds it)
    "teacher": (EMBEDDED_DIR / "teacher", "python -m tip.testbed.arith.build"),
    "student": (EMBEDDED_DIR / "student", "python -m tip.testbed.arith.build"),
    "agent_teacher": (EMBEDDED_DIR.parent / "embedded_agent_pair" / "teacher",
                      "python -m tip.testbed.agent.build"),
    "agent_student": (EMBEDDED_DIR.parent / "embedded_agent_pair" / "student",
                      "python -m tip.testbed.agent.build"),
}


class PairError(UserError):
    """A teacher/student pair that cannot be used as configured."""


def resolve_model_ref(ref: str) -> str:
    """Map ``embedded://NAME`` to the shipped directory and ``pypi-gguf://NAME`` to the converted
    cache (``tip.pairs``); leave paths and hub ids unchanged."""
    if ref.startswith("pypi-gguf://"):
        from tip import pairs

        try:
            return pairs.resolve(ref)
        except (ValueError, FileNotFoundError) as err:
            raise PairError(str(err)) from None
    if ref.startswith(EMBEDDED_SCHEME):
        name = ref[len(EMBEDDED_SCHEME):]
        if name not in EMBEDDED_MODELS:
            raise PairError(f"unknown embedded model {ref!r}; known: "
                            + ", ".join(EMBEDDED_SCHEME + k for k in EMBEDDED_MODELS))
        path, command = EMBEDDED_MODELS[name]
        if not (path / "config.json").exists():
            raise PairError(f"the embedded model {ref!r} is missing at {path}; rebuild it with "
                            f"`{command}`")
        return str(path)
    return ref


def looks_local(ref: str) -> bool:
    """A reference that names a folder on this machine, never a hub id: an absolute or relative
    path (``/m``, ``./m``, ``../m``, ``~/m``), one with more than one ``/`` (a hub id is ``name`` or
    ``org/name``), or one that exists here, or whose first folder does (``outputs/run``)."""
    return (ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1
            or Path(ref).expanduser().exists()
            or ("/" in ref and Path(ref.split("/")[0]).is_dir()))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def check_model_ref(key: str, ref: str) -> None:
    """Can ``ref`` load here, judged without loading it: the embedded and PyPI pairs are built, a
    local path is a model folder (it is never tried as a hub id, which would retry the network for
    a typo), and a hub id is cached when the hub is offline. Raises ``PairError`` naming ``key``."""
    if "://" in ref:
        resolve_model_ref(ref)  # the embedded or PyPI pair is built
        return
    if looks_local(ref):
        folder = Path(ref).expanduser()
        if not (folder / "config.json").is_file():
            found = "is not a folder" if not folder.is_dir() else "holds no config.json"
            raise PairError(f"{key}={ref!r} is not allowed: {folder} {found}; expected a local "
                            "model folder in HF format, a hub id (org/name), or embedded://NAME")
        return
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(ref, "config.json"), str) or key == "pair.tokenizer":
        return
    if hub_offline():
        raise PairError(f"{key}={ref!r} is not allowed: the hub id is not in the Hugging Face "
                        "cache and HF_HUB_OFFLINE is set; download it where the hub is "
                        "reachable (`huggingface-cli download`) or give a local folder")
    try:  # its config only (the weights come when it loads): a typo fails before any model loads
        hf_hub_download(ref, "config.json")
    except Exception as err:  # noqa: BLE001 (the hub's errors have no common base but Exception)
        raise PairError(f"{key}={ref!r} is not allowed: it is not a local folder, not in the "
                        "Hugging Face cache, and the hub did not serve it "
                        f"({type(err).__name__}); give a local model folder, or download it "
                        "where the hub is reachable (`huggingface-cli download`)") from None


def context_length(ref: str) -> int | None:
    """The positions the model was built for (``max_position_embeddings`` of its config), read
    without loading it; None when its config does not say."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_ref(ref))
    except (OSError, ValueError):
        return None
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


def refuse_beyond_context(key: str, ref: str,
                          requests: list[tuple[str, int, int, str]]) -> None:
    """Refuse, before generating, a request longer than the model's context (its config read
    once): each request is (what, its prompt's tokens, the new tokens after it, the key that sets
    them). Past its positions a model generates on for minutes behind one warning, into garbage."""
    context = context_length(ref)
    for what, prompt, room, room_key in requests:
        if context is not None and prompt + room > context:
            raise PairError(f"{room_key}={room} is not allowed with {key}={ref}: {what} has "
                            f"{prompt} tokens, so a request needs {prompt + room} positions and "
                            f"the model has {context} (max_position_embeddings); {room_key} can "
                            f"be at most {max(context - prompt, 0)}")


def _load(loader, ref: str, what: str, key: str = "pair.student", **kwargs):
    check_model_ref(key, ref)
    path = resolve_model_ref(ref)
    try:
        return loader(path, **kwargs)
    except OSError:
        where = (" (HF_HUB_OFFLINE is set)" if hub_offline()
                 else " or the hub could not be reached")
        raise PairError(f"could not load {what} {ref!r}: it is not a local directory, and it is "
                        f"not in the Hugging Face cache{where}. Point {key}= at a local HF "
                        "directory, run where the hub is reachable, or download it first "
                        "(`huggingface-cli download`)") from None


def load_tokenizer(ref: str, key: str = "pair.student"):
    """``key``: the config key that named ``ref``, for the error message."""
    from transformers import AutoTokenizer

    tok = _load(AutoTokenizer.from_pretrained, ref, "tokenizer", key)
    if tok.pad_token_id is None:  # Llama-style tokenizers ship without one; rollouts need padding
        tok.pad_token = tok.eos_token
    return tok


def load_model(ref: str, dtype: torch.dtype, what: str, attn_implementation: str = "sdpa"):
    """``attn_implementation``: one of ``ATTENTION`` resolved (``resolve_attention``)."""
    from transformers import AutoModelForCausalLM

    key = {"student": "pair.student", "teacher": "pair.teacher"}.get(what, what)
    return _load(AutoModelForCausalLM.from_pretrained, ref, what, key, dtype=dtype,
                 attn_implementation=attn_implementation)


ATTENTION = {  # model.attn_implementation -> (the module it needs, its pip name), or None
    "auto": None, "sdpa": None, "eager": None,
    "flex_attention": ("torch.nn.attention.flex_attention", "torch 2.5 or later"),
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn-3 (flash-attention's hopper/ build)"),
}
"""model.attn_implementation: transformers' attention kernels. auto: on CUDA flash_attention_2
where flash-attn is installed (``pip install flash-attn --no-build-isolation``; make gpu-check
says whether it is), else flex_attention (torch's, no package; transformers supports it for Qwen3,
Qwen2 and Llama), never a dense T x T mask for packed rows; sdpa elsewhere."""
def packs_in_one_row(kernel: str) -> bool:
    """Whether ``kernel`` attends within each packed sequence of one row (FlashAttention's
    variable-length kernels; flex's block mask from the position ids): then a micro-batch's
    sequences go in one row, and no T x T mask is built."""
    return kernel.startswith("flash") or kernel == "flex_attention"


def missing_attention(value: str, device_type: str) -> str:
    """Why ``model.attn_implementation=value`` cannot run here ('' when it can)."""
    need = ATTENTION[value]
    if need is None:
        return ""
    if device_type != "cuda":
        return f"{value} runs on CUDA only; use sdpa (or auto) on {device_type}"
    if importlib.util.find_spec(need[0]) is None:
        return f"{value} needs the package {need[1]}, which is not installed (module {need[0]})"
    return ""


def resolve_attention(value: str, device_type: str) -> str:
    """The transformers ``attn_implementation`` that ``model.attn_implementation`` names here."""
    if value != "auto":
        return value
    if device_type != "cuda":
        return "sdpa"
    return "flash_attention_2" if not missing_attention("flash_attention_2", device_type) else \
        "flex_attention"


def output_width(model) -> int:
    """Rows of the output layer (under ZeRO-3 the local tensor is a shard; ``ds_shape`` is the full
    shape)."""
    weight = model.get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def check_vocab(tokenizer, student_width: int, teacher_width: int, rule: str) -> int:
    """The vocabulary width the divergence is taken over. Teacher and student output layers may
    differ in width (Qwen2.5-14B 152,064 vs 1.5B 151,936): ``rule='truncate'`` compares the shared
    leading ids, which must cover every id the tokenizer can emit; ``rule='error'`` refuses any
    difference."""
    if rule not in ("truncate", "error"):
        raise PairError(f"unknown pair.vocab rule {rule!r}; known: truncate, error")
    width = min(student_width, teacher_width)
    if student_width != teacher_width and rule == "error":
        raise PairError(
            f"teacher and student output widths differ ({teacher_width} vs {student_width}); "
            "set pair.vocab=truncate to compare over the shared ids"
        )
    if len(tokenizer) > width:
        raise PairError(
            f"the tokenizer has {len(tokenizer)} ids but the narrower output layer only {width}: "
            "the models do not share a vocabulary"
        )
    return width


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  packed: bool = False) -> torch.Tensor:
    """Final hidden states (B, T, H) of a causal LM without running its output head. A
    ``HiddenStatesLM`` (the frozen teacher) is called through its own forward: as the root of a
    ZeRO-3 engine, its hooks start each of DeepSpeed's traces (a call to the decoder alone bypasses
    them, so the trace never completes: no prefetch, persistent parameters gathered again).

    ``packed``: the right-padded rows run as one row of their real tokens only, each sequence's
    positions starting at 0 (``pack_rows``), and come back in the (B, T, H) layout with zeros at the
    padding; the decoder computes nothing on padding."""
    if isinstance(model, HiddenStatesLM):
        return model(input_ids, attention_mask, packed)
    decoder = model.get_decoder()
    if not packed:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state
    kernel = model.config._attn_implementation
    rows = pack_rows(input_ids, attention_mask, one_row=packs_in_one_row(kernel))
    # FlashAttention: the sequences' boundaries once per micro-batch (each layer would otherwise
    # derive them from the position ids again, with a host synchronisation)
    varlen = rows.varlen_kwargs() if kernel.startswith("flash") else {}
    # (use_cache=False matters: with a cache, transformers does not look for packed sequences)
    flat = decoder(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False,
                   **varlen).last_hidden_state
    out = flat.new_zeros(*input_ids.shape, flat.shape[-1])
    out[attention_mask.bool()] = flat.reshape(-1, flat.shape[-1])[rows.index]
    return out


@dataclass(frozen=True)
class PackedRows:
    input_ids: torch.Tensor  # (R, W)
    position_ids: torch.Tensor  # (R, W): 0, 1, ... from each sequence's start
    index: torch.Tensor  # (N,): where each real token of the padded rows went, in R x W
    lengths: tuple[int, ...] = ()  # each row's sequences' lengths, in row order (one_row: all)

    def varlen_kwargs(self) -> dict:
        """transformers' ``FlashAttentionKwargs`` of one packed row: the cumulative sequence
        lengths (int32, on the ids' device) and the longest, as FlashAttention's variable-length
        kernel takes them (``cu_seq_lens_q/k``, ``max_length_q/k``)."""
        cu = [0]
        for n in self.lengths:
            cu.append(cu[-1] + n)
        cu_seq = torch.tensor(cu, dtype=torch.int32, device="cpu").to(self.input_ids.device)
        longest = max(self.lengths)
        return {"cu_seq_lens_q": cu_seq, "cu_seq_lens_k": cu_seq, "max_length_q": longest,
                "max_length_k": longest}


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor,
              one_row: bool = False) -> PackedRows:
    """Right-padded rows (B, T) packed without their padding: their real tokens laid end to end,
    each sequence's position ids starting at 0. Without an attention mask, transformers reads the
    sequences' borders off the position ids (``masking_utils.find_packed_sequence_indices``).

    ``one_row``: every sequence in one row (for FlashAttention, whose variable-length kernel
    computes within each sequence only). Otherwise (SDPA, eager: a block-diagonal mask over the
    whole row, so a row's attention costs its length squared) the sequences go first-fit by
    decreasing length into rows as wide as the longest, and the end of a row not filled is one more
    sequence of padding, whose outputs are dropped: fewer rows than before, each no wider.

    The anchors: TRL's ``padding_free`` (``DataCollatorWithFlattening``), verl's
    ``use_remove_padding``, OpenRLHF's ``packing_samples``."""
    lengths = attention_mask.sum(-1).tolist()  # (one host synchronisation per forward)
    width = sum(lengths) if one_row else max(lengths)
    rows: list[list[int]] = []  # the sequences in each row
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(width)
        rows[r].append(i)
        room[r] -= lengths[i]
    # The layout is planned on the host from the lengths; the token ids stay on their device.
    start = [0] * len(lengths)
    positions = torch.zeros(len(rows), width, dtype=torch.long, device="cpu")
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            start[i] = r * width + offset
            positions[r, offset:offset + lengths[i]] = torch.arange(lengths[i], device="cpu")
            offset += lengths[i]
        positions[r, offset:] = torch.arange(width - offset, device="cpu")  # the padding's own run
    index = torch.cat([torch.arange(start[i], start[i] + n, device="cpu")
                       for i, n in enumerate(lengths)]).to(input_ids.device)
    ids = input_ids.new_zeros(len(rows) * width)
    ids[index] = input_ids[attention_mask.bool()]
    order = tuple(lengths[i] for members in rows for i in members)
    return PackedRows(ids.view(len(rows), width), positions.to(input_ids.device), index, order)


class HiddenStatesLM(torch.nn.Module):
    """A causal LM whose ``forward`` returns the final hidden states instead of logits.

    The DeepSpeed engine wraps this, so the training forward goes through ``engine.forward`` (ZeRO-3
    advances its gradient-accumulation micro-step there: calling the decoder directly makes the
    second micro-batch overwrite the first one's gradients) while the output head runs only at the
    kept positions.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                packed: bool = False) -> torch.Tensor:
        return hidden_states(self.lm, input_ids, attention_mask, packed)

    # What tip reads of a model beside its forward, so that a wrapped teacher is used as the model.
    @property
    def config(self):
        return self.lm.config

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()


def final_logit_softcap(model) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None)


def _head_params(model) -> list:
    head = model.get_output_embeddings()
    return [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]


@contextmanager
def gathered_heads(*models):
    """The output layers of ``models`` whole for the duration (one ZeRO-3 gather each; a model given
    twice, as the live self-teacher is, is gathered once). Outside ZeRO-3 it does nothing."""
    params, seen = [], set()
    for model in models:
        for p in _head_params(model):
            if id(p) not in seen and hasattr(p, "ds_id"):
                seen.add(id(p))
                params.append(p)
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def whole_until_accumulated(model) -> None:
    """Backward through an output layer that no module of the model uses (an untied head, run
    outside the decoder's forward) under ZeRO-3: autograd accumulates its gradient into the
    parameter itself, which must then be whole (DeepSpeed's modules gather theirs in pre-backward
    hooks). Gathers the layer now and partitions it again right after autograd has accumulated its
    gradient (DeepSpeed's own hook, registered first, reduces it). A tied head is left alone: its
    embedding module gathers it before its gradient is accumulated. Outside ZeRO-3, nothing."""
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for param in _head_params(model):
        gathered = getattr(param, "ds_status", None) != ZeroParamStatus.NOT_AVAILABLE
        if gathered or not param.requires_grad:
            continue
        param.all_gather()
        handles = []

        def partition_again(p, handles=handles):
            p.partition()
            handles.pop().remove()

        handles.append(param.register_post_accumulate_grad_hook(partition_again))


def head_logits_raw(model, hidden_rows: torch.Tensor) -> torch.Tensor:
    """Logits through the output layer's weight directly, without a module call (so no ZeRO-3
    hooks): inside ``gathered_heads`` only, when the layer may be sharded. Detached: for the frozen
    side."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        logits = torch.nn.functional.linear(hidden_rows, head.weight, getattr(head, "bias", None))
    return softcap(logits, final_logit_softcap(model))
