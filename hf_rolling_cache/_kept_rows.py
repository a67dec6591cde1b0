"""Rows of the last decoder layer that nobody reads are not computed (the compiled prefill's).

A prefill forward from ``generate`` asks for the logits of its last position only (``logits_to_keep=1``), and the
cache needs every position's keys and values, which a layer computes from its input. So in the model's last decoder
layer, every product that comes after the keys and values and works position by position (the query projection, the
attention's output projection, the MLP) only has to compute the rows that are read: in a 32-layer 7B model, about 3%
of a prompt's arithmetic. The other rows of those products' outputs are the kept rows broadcast (a view, no copy):
whatever the layer computes from them is never read. Exact for the rows read; never where anything else reads the
layer's output (hidden states, attentions, a loss over ``labels``).
"""

from __future__ import annotations

import types

import torch

from ._fused import wrapped

_ROWS = "_hf_rolling_cache_kept_rows"


def rows_read(config, kwargs: dict) -> int | None:
    """How many of a forward's last positions the caller reads from its last layer's output, when that is all it
    reads: ``logits_to_keep`` as a positive int (generate passes 1), without hidden states, attentions or labels
    asked for (by argument or by the model's config). None: every row is read."""
    keep = kwargs.get("logits_to_keep")
    if type(keep) is not int or keep < 1 or kwargs.get("labels") is not None:
        return None
    for name in ("output_hidden_states", "output_attentions"):
        asked = kwargs.get(name)
        if asked or (asked is None and getattr(config, name, False)):
            return None
    return keep


def last_layer_swaps(layer: torch.nn.Module, rows: int) -> list[tuple]:
    """``(module, name, value)`` swaps that make ``layer`` compute its query projection, its attention's output
    projection and its MLP for the last ``rows`` positions only. A module is left whole where someone else's code
    runs around it (a hook, a forward of its own), or, for the MLP, where it holds parameters outside ``nn.Linear``
    modules (a mixture of experts with a layout of its own: not known to work token by token)."""
    attention = getattr(layer, "self_attn", None)
    candidates = [getattr(attention, "q_proj", None), getattr(attention, "o_proj", None)]
    candidates = [c for c in candidates if type(c) is torch.nn.Linear]
    mlp = getattr(layer, "mlp", None)
    if isinstance(mlp, torch.nn.Module) and _products_only(mlp):
        candidates.append(mlp)
    swaps = []
    for module in candidates:
        if not wrapped(module):
            swaps += [(module, _ROWS, rows), (module, "forward", types.MethodType(_kept_rows_forward, module))]
    return swaps


def _products_only(module: torch.nn.Module) -> bool:
    """Every parameter of ``module`` belongs to an ``nn.Linear`` (a dense MLP, or one of token-wise experts)."""
    owners = [sub for sub in module.modules() if any(True for _ in sub.parameters(recurse=False))]
    return bool(owners) and all(type(sub) is torch.nn.Linear for sub in owners)


def _kept_rows_forward(self: torch.nn.Module, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The module's own forward over the last rows of ``hidden`` ([batch, tokens, features]), broadcast to every
    row."""
    rows = getattr(self, _ROWS)
    forward = type(self).forward
    if hidden.dim() != 3 or hidden.shape[1] <= rows:
        return forward(self, hidden, *args, **kwargs)
    kept = forward(self, hidden[:, -rows:], *args, **kwargs)
    if rows == 1:
        return kept.expand(hidden.shape[0], hidden.shape[1], kept.shape[-1])
    # several rows: the rows before them repeat the first (never read either)
    filler = kept[:, :1].expand(hidden.shape[0], hidden.shape[1] - rows, kept.shape[-1])
    return torch.cat([filler, kept], dim=1)
