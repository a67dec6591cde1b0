"""CUDA graph decoding: capture one decode step of a rolling cache and replay it for every later token.

A decode step of an eager 7B model spends most of its time in Python (32 layers of modules), not in its kernels.
With the decode plan computed on the device (`DeviceDecodePlan`: counters, slots and key mask are tensors, shapes
are static), the whole step can be captured once per cache and replayed: a step then costs its kernels.

    hf_rolling_cache.use_cuda_graphs(model)
    model.generate(..., past_key_values=RollingSlidingWindowCache(config=model.config))

Only decode-shaped calls (one column, a rolling cache with history, on CUDA) are replayed; everything else runs
the model as before. Padding in a decode step is handled in the graph (a padded row writes nothing).
"""

from __future__ import annotations

import functools

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import RollingSlidingWindowCache

_ORIGINAL_FORWARD = "_hf_rolling_cache_eager_forward"


def use_cuda_graphs(model: torch.nn.Module) -> None:
    """Replay decode steps of ``model`` with a rolling cache as CUDA graphs (captured once per cache)."""
    if hasattr(model, _ORIGINAL_FORWARD):
        return
    eager_forward = model.forward

    @functools.wraps(eager_forward)
    def forward(*args, **kwargs):
        cache = kwargs.get("past_key_values")
        if not args and _replayable(cache, kwargs):
            return _decode_graph(cache, eager_forward, kwargs).run(cache, kwargs)
        return eager_forward(*args, **kwargs)

    setattr(model, _ORIGINAL_FORWARD, eager_forward)
    model.forward = forward


def release_cuda_graphs(model: torch.nn.Module) -> None:
    """Undo `use_cuda_graphs`: the model runs every step eagerly again."""
    if hasattr(model, _ORIGINAL_FORWARD):
        del model.forward  # the instance attribute; the class's forward shows through again
        delattr(model, _ORIGINAL_FORWARD)


def _replayable(cache, kwargs) -> bool:
    input_ids = kwargs.get("input_ids")
    return (
        isinstance(cache, RollingSlidingWindowCache)
        and input_ids is not None
        and input_ids.is_cuda
        and input_ids.shape[1] == 1
        and cache.get_seq_length() > 0
        and all(layer.device == input_ids.device for layer in cache.layers if layer.is_initialized)
        and kwargs.get("inputs_embeds") is None
        and not kwargs.get("output_attentions")
        and not kwargs.get("output_hidden_states")
        and all(isinstance(v, (bool, int, float, str, type(None))) for k, v in kwargs.items() if k not in _TENSORS)
        and not torch.cuda.is_current_stream_capturing()
    )


_TENSORS = ("input_ids", "attention_mask", "position_ids", "past_key_values")


def _decode_graph(cache: RollingSlidingWindowCache, eager_forward, kwargs) -> _DecodeGraph:
    graph = cache._decode_graph
    options = {k: v for k, v in kwargs.items() if k not in _TENSORS}
    if graph is None or not graph.still_valid(cache, kwargs["input_ids"], options):
        cache._decode_graph = None
        graph = cache._decode_graph = _DecodeGraph(cache, eager_forward, kwargs["input_ids"], options)
    return graph


class _DecodeGraph:
    """One captured decode step: static input buffers, the graph, and the logits it writes."""

    def __init__(self, cache: RollingSlidingWindowCache, eager_forward, input_ids: torch.Tensor, options: dict):
        batch, device = input_ids.shape[0], input_ids.device
        self.options = options  # the graph keeps no reference to its cache: the cache owns the graph
        self.input_ids = input_ids.clone()
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.step_mask = torch.zeros(batch, 1, dtype=torch.long, device=device)  # all padding: a no-op step
        cache.decode_on_device = True
        columns = cache._progress.columns

        def step():
            return eager_forward(
                input_ids=self.input_ids, attention_mask=self.step_mask, position_ids=self.position_ids,
                past_key_values=cache, **options,
            )

        # Warm up on a side stream (cuBLAS, allocator), then capture. With every row marked as padding neither
        # run writes a slot or advances a counter; capturing executes nothing.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step().logits
        cache._progress.columns = columns  # the Python of both runs counted two steps that changed nothing
        self.buffers = self._buffers(cache)

    @staticmethod
    def _buffers(cache: RollingSlidingWindowCache) -> tuple[int, ...]:
        """Addresses the graph reads and writes: if any changes, the graph is stale."""
        rings = [t.data_ptr() for layer in cache.layers for t in (layer.keys, layer.values)]
        return (cache._progress.device_seen.data_ptr(), cache._step_real.data_ptr(), *rings)

    def still_valid(self, cache: RollingSlidingWindowCache, input_ids: torch.Tensor, options: dict) -> bool:
        return (
            cache.decode_on_device
            and input_ids.shape == self.input_ids.shape
            and input_ids.device == self.input_ids.device
            and options == self.options
            and cache._progress.device_seen is not None
            and self._buffers(cache) == self.buffers
        )

    def run(self, cache: RollingSlidingWindowCache, kwargs: dict) -> CausalLMOutputWithPast:
        cache._check_usable()
        attention_mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if attention_mask is not None and attention_mask.shape[1] != cache.get_seq_length() + 1:
            raise ValueError(
                f"The attention_mask has {attention_mask.shape[1]} columns, but this cache has processed "
                f"{cache.get_seq_length()} and a decode step brings 1: pass the mask of the whole conversation."
            )
        self.input_ids.copy_(kwargs["input_ids"])
        if attention_mask is None:
            self.step_mask.fill_(1)
        else:
            self.step_mask.copy_(attention_mask[:, -1:])
        if position_ids is None:
            self.position_ids.copy_(cache._progress.device_seen[:, None])
        else:
            self.position_ids.copy_(position_ids[:, -1:])
        self.graph.replay()
        cache._progress.columns += 1
        cache._progress.advanced_on_device()
        return CausalLMOutputWithPast(logits=self.logits, past_key_values=cache)
