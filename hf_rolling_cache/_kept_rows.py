"""Rows of the last decoder layer that nobody reads are not computed (prefill forwards under `use_cuda_graphs`).

A prefill forward from ``generate`` asks for the logits of its last position only (``logits_to_keep=1``), and the
cache needs every position's keys and values, which a layer computes from its input. So in the model's last decoder
layer, every product that comes after the keys and values and works position by position (the query projection, the
attention's output projection, the MLP) only has to compute the rows that are read: in a 32-layer 7B model, about 3%
of a prompt's arithmetic. The other rows of those products' outputs are the kept rows broadcast (a view, no copy):
whatever the layer computes from them is never read. Exact for the rows read; never where anything else reads the
layer's rows (hidden states, attentions, router logits, a loss over ``labels``, a hook on the layer or inside it).
"""

from __future__ import annotations

import types

import torch

from ._fused import _global_hooks, wrapped
from .cache import RollingSlidingWindowCache

# What a forward can be asked to return beyond its logits, each read from every position of some layer's output
# (Transformers' own cut of a layer's rows, Gemma 4's shared key/value layers, stops for the same three).
_OTHER_OUTPUTS = ("output_hidden_states", "output_attentions", "output_router_logits")


def last_row_only(model: torch.nn.Module, kwargs: dict) -> bool:
    """Whether a forward's caller reads only its last position's logits: ``logits_to_keep=1`` (as generate's
    prefill asks), and nothing else (`others_read`). Other counts of rows are left whole (assisted decoding asks
    for each draft's rows: nothing to save, and each count would compile again)."""
    keep = kwargs.get("logits_to_keep")
    return type(keep) is int and keep == 1 and not others_read(model, kwargs)


def others_read(model: torch.nn.Module, kwargs: dict) -> bool:
    """Whether a forward is asked for more than logits, each read from every position of some layer: labels (a
    loss), or any ``output_*``, by argument or by the model's config or its decoder's (a vision-language model's
    text config)."""
    if kwargs.get("labels") is not None:
        return True
    if any(kwargs.get(name) for name in kwargs if name.startswith("output_")):
        return True
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    configs = [model.config, getattr(decoder, "config", None)]
    return any(
        kwargs.get(name) is None and any(getattr(config, name, False) for config in configs) for name in _OTHER_OUTPUTS
    )


def eager_prefill_swaps(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[tuple]:
    """`last_layer_swaps` for an eager forward of ``model`` (keyword arguments only) of several tokens per sequence
    on a rolling cache, where its caller reads only the last row (`last_row_only`); else none."""
    tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if args or tokens is None or tokens.shape[1] < 2:
        return []  # (a decode step that runs eagerly: nothing to save)
    if not isinstance(kwargs.get("past_key_values"), RollingSlidingWindowCache):
        return []
    layer = last_decoder_layer(model)
    return last_layer_swaps(layer) if layer is not None and last_row_only(model, kwargs) else []


def last_decoder_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """``model.get_decoder().layers[-1]``, where the model has one: the top layer this forward runs (a prefill
    chunk that stops early runs fewer, `_reach`)."""
    layers = decoder_layers(model)
    return layers[-1] if layers is not None and len(layers) > 0 else None


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """``model.get_decoder().layers``, where the model has such a list."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def last_layer_swaps(layer: torch.nn.Module) -> list[tuple]:
    """``(module, name, value)`` swaps that make ``layer`` compute its query projection, its attention's output
    projection and its MLP for the last position only. None at all where someone else's code would see the
    layer's rows (a hook on it or on any module inside it, a forward of its own, a global hook); the MLP only where
    it is a dense one (its parameters all in ``nn.Linear`` children of its own: not a mixture of experts, whose
    routing may not work token by token, and whose router logits a caller may read)."""
    if _global_hooks() or any(map(wrapped, layer.modules())):
        return []
    attention = getattr(layer, "self_attn", None)
    candidates = [getattr(attention, "q_proj", None), getattr(attention, "o_proj", None)]
    candidates = [c for c in candidates if type(c) is torch.nn.Linear]
    mlp = getattr(layer, "mlp", None)
    if isinstance(mlp, torch.nn.Module) and _dense(mlp):
        candidates.append(mlp)
    return [(module, "forward", types.MethodType(_last_row_forward, module)) for module in candidates]


def _dense(mlp: torch.nn.Module) -> bool:
    """Every parameter of ``mlp`` belongs to an ``nn.Linear`` child of its own (a dense MLP: no experts)."""
    owners = [sub for sub in mlp.modules() if any(True for _ in sub.parameters(recurse=False))]
    children = set(map(id, mlp.children()))
    return bool(owners) and all(type(sub) is torch.nn.Linear and id(sub) in children for sub in owners)


def _last_row_forward(self: torch.nn.Module, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The module's own forward over the last row of ``hidden`` ([batch, tokens, features]), broadcast to every
    row (the rows before it are never read)."""
    forward = type(self).forward
    if hidden.dim() != 3 or hidden.shape[1] <= 1:
        return forward(self, hidden, *args, **kwargs)
    kept = forward(self, hidden[:, -1:], *args, **kwargs)
    if not isinstance(kept, torch.Tensor) or kept.dim() != 3:
        return forward(self, hidden, *args, **kwargs)  # not a plain product's output: computed whole
    return kept.expand(hidden.shape[0], hidden.shape[1], kept.shape[-1])
