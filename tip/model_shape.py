"""What one model takes, before any weights load: its parameter count and the bytes autograd saves
per token, measured on the meta device (model_shape), from a config found locally, in the Hugging
Face cache or in tip's snapshots of the paper's models (``tip/assets/model_configs``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tip.models import PairError, resolve_model_ref

SNAPSHOT_DIR = Path(__file__).resolve().parent / "assets" / "model_configs"


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs to know of one model, at one precision."""

    ref: str
    source: str  # where its config came from
    params: int  # unique parameters (a tied output layer counted once)
    largest_layer: int  # parameters of the largest decoder layer
    head: int  # parameters of the output layer
    vocab: int
    hidden: int
    layers: int
    weight_bytes: int  # bytes per parameter at the run's precision
    kv_per_token: int  # KV-cache bytes per token (all layers, keys and values)
    layer_activations_per_token: float  # bytes autograd saves per token in one decoder layer
    top_activations_per_token: float  # bytes saved per token outside the layers (final norm)
    # a decoder layer's working set per token without gradient (the frozen teacher)
    forward_per_token: float

    @property
    def activations_per_token(self) -> float:
        return self.layers * self.layer_activations_per_token + self.top_activations_per_token

    @property
    def checkpointed_activations_per_token(self) -> float:
        """Each layer keeps only its input; backward recomputes one layer at a time."""
        return (self.layers * self.hidden * self.weight_bytes + self.layer_activations_per_token
                + self.top_activations_per_token)


def load_model_config(ref: str):
    """(config, where it came from): a local directory, the HF cache, or tip's snapshot of a paper
    model."""
    from transformers import AutoConfig

    try:
        path = resolve_model_ref(ref)
    except PairError:
        path = None
    if path is not None and (Path(path) / "config.json").is_file():
        return AutoConfig.from_pretrained(path), str(Path(path) / "config.json")
    # a hub id: its cached config, never a download
    if path is not None and not Path(path).exists():
        try:
            return AutoConfig.from_pretrained(path, local_files_only=True), "the Hugging Face cache"
        except (OSError, ValueError):
            pass
    snapshot = SNAPSHOT_DIR / (ref.replace("/", "--") + ".json")
    if snapshot.is_file():
        fields = json.loads(snapshot.read_text())
        return AutoConfig.for_model(**fields), f"tip's snapshot {snapshot.name} (shape fields only)"
    known = ", ".join(sorted(p.stem.replace("--", "/") for p in SNAPSHOT_DIR.glob("*.json")))
    raise PairError(f"no config for {ref!r}: not a local directory with config.json, not in the "
                    f"Hugging Face cache, and not one of tip's snapshots ({known}); point the pair "
                    "at a local directory, or download the config with `huggingface-cli download "
                    f"{ref} config.json`")


def _flash_like_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          **kwargs):
    """Meta-device stand-in for FlashAttention: keeps q, k, v, the output and the log-sum-exp for
    backward."""

    class Kept(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, *_ = ctx.saved_tensors
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    return Kept.apply(query, key, value).transpose(1, 2).contiguous(), None


def _saved_bytes(run, params: set[int]) -> int:
    """Bytes of the distinct tensors autograd saves while ``run()`` runs (parameters excluded)."""
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values())


def model_shape(ref: str, dtype: torch.dtype, probe_tokens: int = 256) -> ModelShape:
    """Instantiate ``ref``'s config on the meta device and measure it (no weights are read)."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    config, source = load_model_config(ref)
    AttentionInterface.register("tip_plan_attention", _flash_like_attention)
    config._attn_implementation = "tip_plan_attention"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    decoder = model.get_decoder()
    layers = list(decoder.layers)
    hidden = config.hidden_size
    x = torch.zeros(1, probe_tokens, hidden, dtype=dtype, device="meta", requires_grad=True)
    positions = torch.arange(probe_tokens, device="meta")[None]
    rope = decoder.rotary_emb(x, positions)

    def one_layer():
        layers[0](x, attention_mask=None, position_embeddings=rope, position_ids=positions)

    per_layer = _saved_bytes(one_layer, params) / probe_tokens
    top = _saved_bytes(lambda: decoder.norm(x), params) / probe_tokens
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    width = dtype.itemsize
    head = model.get_output_embeddings().weight
    # Without gradient a layer holds its input and residual, the normed copy in fp32, q/k/v/o, and
    # the MLP's gate, up and their product at once.
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    forward = (3 * hidden + 3 * intermediate + (heads + 2 * kv_heads)
               * head_dim) * width + 4 * hidden
    return ModelShape(
        ref=ref, source=source, params=sum(p.numel() for p in model.parameters()),
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        head=head.numel(), vocab=head.shape[0], hidden=hidden, layers=len(layers),
                      weight_bytes=width,
        kv_per_token=2 * len(layers) * kv_heads * head_dim * width,
        layer_activations_per_token=per_layer, top_activations_per_token=top,
                      forward_per_token=forward)
