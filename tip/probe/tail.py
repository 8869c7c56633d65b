"""The part of a model the probe (and tail-only training) differentiates: the last decoder blocks,
the final norm and the output layer, with the gradient cut before them."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tip.config import ConfigError


def tail_parameters(model, blocks: int) -> list[torch.nn.Parameter]:
    """The last ``blocks`` decoder layers, the final norm and the output layer (a tied output layer
    is the input embedding: its gradient is then the output layer's part only, because
    ``cut_before_tail`` detaches the tail's input)."""
    decoder = model.get_decoder()
    layers = list(decoder.layers)
    if not 1 <= blocks <= len(layers):
        raise ConfigError(f"probe.blocks={blocks} is not allowed: expected 1 to {len(layers)} "
                          "(the student's decoder layers)")
    modules = [*layers[-blocks:], decoder.norm, model.get_output_embeddings()]
    params, seen = [], set()
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def train_tail_only(model, blocks: int) -> list[torch.nn.Parameter]:
    """``tail_parameters``, the only parameters of ``model`` that require gradients from now on."""
    params = tail_parameters(model, blocks)
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


@contextmanager
def cut_before_tail(model, blocks: int):
    """While inside, the first tail block's input hidden states are detached: backward runs through
    the tail and the output layer only (with a tied embedding, the input lookup would otherwise pull
    the gradient through every frozen block)."""
    def detach(module, args, kwargs):
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    handle = list(model.get_decoder().layers)[-blocks].register_forward_pre_hook(
        detach, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
