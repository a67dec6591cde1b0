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

Exact: every value that the last logits and the kept cache read comes from the same computation as without the
skip. A layer that runs may compute rows that feed nothing kept, from ring slots a skipped layer left behind
(zeros, or an older column's keys and values: finite numbers); those rows go nowhere.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Iterator, Sequence

import torch
from transformers.generation.utils import GenerationMixin

from ._compiled import _installed
from ._fused import _global_hooks, _hooked, wrapped
from ._kept_rows import others_read
from .cache import RollingSlidingWindowCache

_WATCHERS = "_hf_rolling_cache_prefill_watchers"  # how many of enable / use_cuda_graphs watch the model's prefill


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
    model, whoever asks: `enable` and `use_cuda_graphs` each watch, and each `unwatch` when undone)."""
    count = getattr(model, _WATCHERS, 0)
    if count == 0 and type(model)._prefill is GenerationMixin._prefill and "_prefill" not in vars(model):
        # (not a model's own prefill, nor one someone set on the instance)
        model._prefill = types.MethodType(_watched_prefill, model)
    setattr(model, _WATCHERS, count + 1)


def unwatch(model: torch.nn.Module) -> None:
    count = getattr(model, _WATCHERS, 0)
    if count > 1:
        setattr(model, _WATCHERS, count - 1)
        return
    if getattr(vars(model).get("_prefill"), "__func__", None) is _watched_prefill:
        del model._prefill
    vars(model).pop(_WATCHERS, None)


_watching = threading.local()


def _watched_prefill(model, input_ids, generation_config, model_kwargs, *args, **kwargs):
    """generate's ``_prefill``, its chunk forwards stopping after the layers they must run (`layers_to_run`)."""
    prefill = functools.partial(GenerationMixin._prefill, model)
    end = _prefill_end(model, input_ids, generation_config, model_kwargs)
    if end is None or getattr(_watching, "active", False):
        return prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
    cache = model_kwargs["past_key_values"]
    forward = model.forward
    windows = [layer.window for layer in cache.layers]
    capacities = [layer.capacity for layer in cache.layers]

    @functools.wraps(forward)
    def chunk_forward(*call_args, **call_kwargs):
        tokens = call_kwargs.get("input_ids")
        if (
            call_args or tokens is None or tokens.shape[1] < 2 or call_kwargs.get("past_key_values") is not cache
            or others_read(model, call_kwargs)
        ):  # (a chunk of one column is decode-shaped: CUDA graph decoding may capture it, and a capture holds every
            # layer for the steps after it)
            return forward(*call_args, **call_kwargs)
        chunk_end = cache.get_seq_length() + tokens.shape[1]
        if chunk_end >= end:  # the last chunk: its logits are read
            return forward(*call_args, **call_kwargs)
        count = layers_to_run(windows, capacities, chunk_end, end)
        with _first_layers(model, count), cache.ledger.first_layers_only(count):
            return forward(*call_args, **call_kwargs)

    _watching.active = True
    try:
        with _installed([(model, "forward", chunk_forward)]):
            return prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
    finally:
        _watching.active = False


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
    layers = _decoder_layers(model)
    if layers is None or len(layers) != len(cache.layers) or _global_hooks():
        return None
    if _hooked(model) or any(wrapped(module) for module in model.modules() if module is not model):
        return None
    return input_ids.shape[1]


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


@contextlib.contextmanager
def _first_layers(model: torch.nn.Module, count: int) -> Iterator[None]:
    """Inside the block the decoder has its first ``count`` layers only (the same modules)."""
    decoder = model.get_decoder()
    layers = decoder._modules["layers"]
    if count >= len(layers):
        yield
        return
    decoder._modules["layers"] = layers[:count]
    try:
        yield
    finally:
        decoder._modules["layers"] = layers

