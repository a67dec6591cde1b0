"""A chunk of generate's chunked prefill runs only the layers whose keys and values are still read
(`use_cuda_graphs` and `enable`).

generate keeps only the cache from every prefill chunk but the last (their logits are dropped). In a sliding layer
the keys and values at column c are read by queries at columns up to c + W - 1 only: information climbs at most
one window per layer ("much like the receptive field in CNNs", as "KV Caching in Mistral with Transformers and
xFormers" puts it: the next token's second layer needs the first layer's last W - 1 outputs, which depend on the
last 2W - 1 input tokens). So the last position's logits and what the decode steps will read (each ring's last
``capacity`` columns) need the top layer's keys and values from the last window of columns, the layer below from
about two windows, and so on down to the first layer, or to a global layer, which keeps and reads every column (and
with it every layer below).
A chunk that ends before a layer's reach stops under that layer: in a 32768-token prompt of a 32-layer model with
W = 4096, in chunks of 4096, the first chunk runs 25 layers, the second 26, ... the seventh 31 (28 of the 256
layer runs are skipped, 11% of the prompt's arithmetic).

How: `watch` installs, once, a wrapper of generate's ``_prefill`` (noting where the prompt ends), a hook before
and after each call of the model (a chunk whose outputs nobody reads gets its count of layers), and the decoder's
layer list as `_CutLayers`, which shows the cut to that call's thread only: other threads using the model meanwhile
see every layer. The cache's ledger commits a stopped chunk's step after its layers (``StepLedger.layers_run``).

Exact: every value that the last logits and the kept cache read comes from the same computation as without the
skip. A layer that runs may compute rows that feed nothing kept, from ring slots a skipped layer left behind
(zeros, or an older column's keys and values: finite numbers); those rows go nowhere.
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Sequence

import torch
from transformers.generation.utils import GenerationMixin

from ._fused import _global_hooks, wrapped
from ._kept_rows import decoder_layers, others_read
from .cache import RollingSlidingWindowCache

_WATCHERS = "_hf_rolling_cache_prefill_watchers"  # how many of enable / use_cuda_graphs watch the model's prefill
_HOOKS = "_hf_rolling_cache_prefill_hooks"  # the handles of the hooks `watch` put on the model


def layers_to_run(windows: Sequence[int | None], capacities: Sequence[int], chunk_end: int, prefill_end: int) -> int:
    """How many of the first layers a prefill chunk ending at column ``chunk_end`` must run, when the prefill ends
    at ``prefill_end`` and nothing reads the chunk's outputs but the cache (``windows[i]``: layer i's window, None
    for a global layer; ``capacities[i]``: its slots per sequence). At least one (a chunk's forward opens its step
    in the cache's ledger from a layer)."""
    read_from = prefill_end - 1  # the top layer's output is read at the last column only (the logits)
    for layer in reversed(range(len(windows))):
        window = windows[layer]
        if window is None:
            return layer + 1  # a global layer keeps every column: it and every layer below run for every chunk
        # its keys and values: those the rows read above attend to, and the ring's last `capacity` columns
        kv_from = max(0, min(read_from - window + 1, prefill_end - capacities[layer]))
        if chunk_end > kv_from:
            return layer + 1
        read_from = kv_from  # the layer below computes them: its output is read from there on
    return 1


def watch(model: torch.nn.Module) -> None:
    """Chunks of ``model.generate``'s chunked prefill on a rolling cache run only the layers they must (once per
    model, whoever asks: `enable` and `use_cuda_graphs` each watch, and each `unwatch` when undone).

    Installed once, never per call, so that other threads using the model meanwhile see it whole: generate's
    ``_prefill`` (noting, for its thread, where the prompt ends), a hook before and after each call of the model
    (deciding, for its thread, how many layers a chunk runs), and the decoder's layer list as `_CutLayers` (which
    shows its thread's cut only)."""
    count = getattr(model, _WATCHERS, 0)
    setattr(model, _WATCHERS, count + 1)
    layers = decoder_layers(model)
    if (
        count > 0 or type(model)._prefill is not GenerationMixin._prefill or "_prefill" in vars(model)
        or layers is None or type(layers) is not torch.nn.ModuleList
    ):
        return  # (a model's own prefill, one someone set on the instance, or layers in a list of another kind)
    model._prefill = types.MethodType(_watched_prefill, model)
    layers.__class__ = _CutLayers
    setattr(model, _HOOKS, (
        model.register_forward_pre_hook(_before_call, with_kwargs=True),
        model.register_forward_hook(_after_call, with_kwargs=True, always_call=True),
    ))


def unwatch(model: torch.nn.Module) -> None:
    count = getattr(model, _WATCHERS, 0)
    if count > 1:
        setattr(model, _WATCHERS, count - 1)
        return
    vars(model).pop(_WATCHERS, None)
    if getattr(vars(model).get("_prefill"), "__func__", None) is _watched_prefill:
        del model._prefill
    for handle in vars(model).pop(_HOOKS, ()):
        handle.remove()
    layers = decoder_layers(model)
    if type(layers) is _CutLayers:
        layers.__class__ = torch.nn.ModuleList


class _CutLayers(torch.nn.ModuleList):
    """A watched decoder's layer list (the same object, its class swapped): inside a stopped chunk's forward on
    this thread, its first ``count`` layers only; whole everywhere else."""

    def _shown(self) -> list[torch.nn.Module]:
        layers = list(self._modules.values())
        count = getattr(_per_thread, "cuts", {}).get(id(self))
        return layers if count is None else layers[:count]

    def __len__(self) -> int:
        return len(self._shown())

    def __iter__(self):
        return iter(self._shown())

    def __getitem__(self, index):
        if isinstance(index, slice):
            return torch.nn.ModuleList(self._shown()[index])
        return super().__getitem__(index)  # (an int: counted from the end of what is shown, by len)


_per_thread = threading.local()  # .prefill: (model, cache, end, windows, capacities); .cuts: {id(layers): count}


def _watched_prefill(model, input_ids, generation_config, model_kwargs, *args, **kwargs):
    """generate's ``_prefill``, noting for this thread where its chunks end, so that the hook before each call of
    the model stops a chunk after the layers it must run (`layers_to_run`)."""
    prefill = functools.partial(GenerationMixin._prefill, model)
    end = _prefill_end(model, input_ids, generation_config, model_kwargs)
    if end is None or getattr(_per_thread, "prefill", None) is not None:
        return prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
    cache = model_kwargs["past_key_values"]
    windows = [layer.window for layer in cache.layers]
    capacities = [layer.capacity for layer in cache.layers]
    _per_thread.prefill = (model, cache, end, windows, capacities)
    try:
        return prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
    finally:
        _per_thread.prefill = None


def _before_call(model, args, kwargs) -> None:
    """Before each call of a watched model: in a chunk of this thread's watched prefill whose outputs nobody reads,
    show this thread the first layers only, and have the cache's ledger commit after them."""
    if not hasattr(_per_thread, "calls"):
        _per_thread.calls, _per_thread.cuts = [], {}
    _per_thread.calls.append(None)  # (popped by `_after_call`, which runs whatever happens)
    prefill = getattr(_per_thread, "prefill", None)
    if prefill is not None and prefill[0] is model:
        _, cache, end, windows, capacities = prefill
        tokens = kwargs.get("input_ids")
        if (
            not args and tokens is not None and tokens.shape[1] > 1 and kwargs.get("past_key_values") is cache
            and not others_read(model, kwargs)
        ):  # (a chunk of one column is decode-shaped: CUDA graph decoding may capture it, and a capture holds every
            # layer for the steps after it)
            chunk_end = cache.get_seq_length() + tokens.shape[1]
            if chunk_end < end:  # (not the last chunk: its logits are read)
                count = layers_to_run(windows, capacities, chunk_end, end)
                layers = id(decoder_layers(model))
                _per_thread.calls[-1] = (layers, cache)
                _per_thread.cuts[layers] = count
                cache.ledger.layers_run = count


def _after_call(model, args, kwargs, output) -> None:
    """After each call of a watched model (an exception too): the layers whole again, and the ledger as before."""
    stopped = _per_thread.calls.pop()
    if stopped is not None:
        layers, cache = stopped
        del _per_thread.cuts[layers]
        cache.ledger.layers_run = None


def _prefill_end(model, input_ids, generation_config, model_kwargs) -> int | None:
    """The column generate's chunked prefill ends at, where it is sure and the layers may stop early: a rolling cache
    (without holes: left padding only) that holds fewer columns than ``input_ids``, and the attention mask as long
    as ``input_ids`` (or, where generate dropped a mask of ones, the length it recorded): then Transformers
    prefills ``input_ids`` from the cache's length on. No ``inputs_embeds``; decoder layers as many as the cache's;
    nobody else's code around any module (a hook would miss the layers' runs, or see a stopped chunk's rows).
    Else None."""
    cache = model_kwargs.get("past_key_values")
    if (
        generation_config.prefill_chunk_size is None
        or not isinstance(cache, RollingSlidingWindowCache) or cache.ledger.allow_holes
        or model_kwargs.get("inputs_embeds") is not None or not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2 or getattr(model.config, "is_encoder_decoder", False)
    ):
        return None
    mask = model_kwargs.get("attention_mask")
    mask_length = mask.shape[-1] if mask is not None else getattr(generation_config, "_mask_length", None)
    if mask_length != input_ids.shape[1] or cache.get_seq_length() >= input_ids.shape[1]:
        return None
    layers = decoder_layers(model)
    if layers is None or len(layers) != len(cache.layers) or _global_hooks():
        return None
    if _others_hooks(model) or any(wrapped(module) for module in model.modules() if module is not model):
        return None
    return input_ids.shape[1]


def _others_hooks(model: torch.nn.Module) -> bool:
    """Hooks on ``model`` besides the two of `watch`."""
    ours = {handle.id for handle in vars(model).get(_HOOKS, ())}
    return (
        bool(set(model._forward_pre_hooks) - ours) or bool(set(model._forward_hooks) - ours)
        or hasattr(model, "_hf_hook")
    )

