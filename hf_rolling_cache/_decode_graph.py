"""One captured decode step of a rolling cache (`graphs.use_cuda_graphs`): when a step is captured (again), its
warm-up on side streams and its capture (per device of a split model, `_segments`), the checks that it still fits a
call, and its replay."""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import time
import warnings
from typing import TYPE_CHECKING

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ._all_reduce import one_shot_all_reduces, step_begins
from ._segments import NotCapturable, SegmentedCapture, side_stream
from .cache import RollingSlidingWindowCache

if TYPE_CHECKING:
    from ._compiled import CompiledLayers

TENSORS = ("input_ids", "attention_mask", "position_ids", "past_key_values")  # a step's inputs that are tensors


def decode_graph(
    model, placement, cache: RollingSlidingWindowCache, eager_forward, kwargs, compiled: CompiledLayers | None
) -> DecodeGraph | EagerSteps:
    """``cache``'s captured decode step, captured (again) where there is none or it no longer fits this call."""
    cache.reserve(cache.get_seq_length() + 1)  # a global layer that grows gets new buffers: captured again below
    graph = cache.decode_graph
    options = {k: v for k, v in kwargs.items() if k not in TENSORS}
    # Once per turn (eager steps ran since the last replay: a prefill, a new generate call), not at every step:
    # a step captured before reads each weight where it was then.
    new_turn = graph is not None and getattr(graph, "replayed_through", None) != cache.get_seq_length()
    weights_moved = new_turn and getattr(graph, "weights", None) not in (None, _weight_addresses(model))
    if graph is None or weights_moved or not graph.still_valid(cache, kwargs["input_ids"], options, compiled):
        cache.decode_graph = None
        step_forward = eager_forward
        if placement.split:  # Accelerate's hook on the top module would copy the logits back mid-capture
            unhooked = getattr(model, "_old_forward", None)
            if unhooked is not None and not getattr(unhooked, "replays_decode_steps", False):
                step_forward = unhooked  # (dispatched after use_cuda_graphs, its hook sits outside ours already)
        try:
            placed = placement.modules if placement.split else ()
            graph = DecodeGraph(cache, step_forward, kwargs["input_ids"], options, compiled, placed)
            graph.weights = _weight_addresses(model)
        except NotCapturable as reason:
            _warn_eager(str(reason))
            cache.decode_on_device = False  # plain eager steps, with every check of the host plans
            graph = EagerSteps(eager_forward)
        cache.decode_graph = graph
    return graph


def _weight_addresses(model: torch.nn.Module) -> tuple[int, ...]:
    """Where the model's parameters and buffers are (a tensor-parallel shard's local tensor). If any moved since a
    step was captured (a new Parameter, ``model.to``, ``load_state_dict(assign=True)``), the graph would read the
    old place, freed or stale: the step is captured again."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return tuple(getattr(t, "_local_tensor", t).data_ptr() for t in tensors)


@contextlib.contextmanager
def _collector_paused():
    """No cyclic garbage collection while a step is captured. The collector runs at any allocation and may free an
    earlier cache (a cache is in reference cycles) and so its CUDA graphs; a graph destroyed while another is being
    captured invalidates that capture, and cuBLAS's next product in it fails (CUBLAS_STATUS_INTERNAL_ERROR). Garbage
    waits for the next collection after the capture."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@functools.cache
def _warn_eager(reason: str) -> None:
    warnings.warn(f"use_cuda_graphs: decode steps of this model run eagerly ({reason}).", stacklevel=4)


class EagerSteps:
    """Stands in for a graph where a model's decode step cannot be captured: every step runs eagerly."""

    def __init__(self, eager_forward) -> None:
        self.eager_forward = eager_forward

    def still_valid(self, *args) -> bool:
        return True

    def run(self, cache, kwargs):
        return self.eager_forward(**kwargs)


_REFRESH_EVERY = 64  # replays between the host's reads of the counters while some ring is not yet full


def _rings_full(cache: RollingSlidingWindowCache) -> bool:
    """Every sliding layer's ring holds a whole window in every row (as far as the host knows): its decode steps
    attend over all slots, without a key mask."""
    return cache.ledger.rings_full(cache.window, cache.window + cache.slack)


class DecodeGraph:
    """One captured decode step: static input buffers, the graph (one per device for a split model), and the
    logits it writes."""

    def __init__(
        self,
        cache: RollingSlidingWindowCache,
        eager_forward,
        input_ids: torch.Tensor,
        options: dict,
        compiled: CompiledLayers | None = None,
        placed: tuple[tuple[torch.nn.Module, torch.device], ...] = (),
    ):
        started = time.perf_counter()
        batch, device = input_ids.shape[0], input_ids.device
        self.options = options  # the graph keeps no reference to its cache: the cache owns the graph
        self.compiled = compiled
        self.input_ids = input_ids.clone()
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.step_mask = torch.zeros(batch, 1, dtype=torch.long, device=device)  # all padding: a no-op step
        self.advance_after_replay = bool(placed)  # a split step's counters advance after its last segment
        self.rings_full = _rings_full(cache)  # captured without the sliding layers' key mask
        self._replays = 0
        self.weights: tuple[int, ...] | None = None  # where the weights were at capture (`_weight_addresses`)
        self.replayed_through: int | None = None
        cache.decode_on_device = True
        devices = sorted({device, *(d for _, d in placed)}, key=str)

        def step():
            step_begins()  # tensor parallel: the step's sums counted from its first (`_all_reduce.summed_product`)
            return eager_forward(
                input_ids=self.input_ids, attention_mask=self.step_mask, position_ids=self.position_ids,
                past_key_values=cache, **options,
            )

        # Warm up on side streams (cuBLAS, allocator, compilation), then capture. With every row marked as padding
        # neither run writes a slot or advances a counter (capturing executes nothing): the ledger discards both.
        # Each run is discarded on its own: the capture must plan with the counters the warm-up found (a step
        # that looked one column ahead could grow a global layer inside the capture, into the graph's pool).
        swapped = compiled.swapped_in(cache) if compiled is not None else contextlib.nullcontext()
        ledger = cache.ledger
        ledger.defer_advance = self.advance_after_replay
        try:
            with swapped, one_shot_all_reduces():  # tensor parallel: the step's all-reduces one-shot (_all_reduce)
                with ledger.discarding():
                    for d in devices:
                        side_stream(d).wait_stream(torch.cuda.current_stream(d))
                    try:
                        with contextlib.ExitStack() as side_streams:
                            for d in devices:
                                side_streams.enter_context(torch.cuda.stream(side_stream(d)))
                            warm_up = SegmentedCapture(ledger, device, placed, capture=False)
                            with warm_up.switching():
                                step()
                            warm_up.finish()
                    finally:  # also when it raised: later eager steps must not overtake its writes
                        for d in devices:
                            torch.cuda.current_stream(d).wait_stream(side_stream(d))
                with ledger.discarding(), _collector_paused():
                    capture = SegmentedCapture(ledger, device, placed)
                    try:
                        with capture.switching():
                            logits = step().logits
                    except BaseException:
                        capture.abandon()
                        raise
                    capture.finish()
        finally:
            ledger.defer_advance = False
        self.segments = capture.segments
        self.logits = logits if logits.device == device else torch.empty_like(logits, device=device)
        self._device_logits = logits  # where the last segment writes them
        self.buffers = self._buffers(cache)
        for d in devices:
            torch.cuda.synchronize(d)
        cache.decode_graph_warmup_s = time.perf_counter() - started

    @staticmethod
    def _buffers(cache: RollingSlidingWindowCache) -> tuple[int, ...]:
        """Addresses the graph reads and writes: if any changes, the graph is stale."""
        storage = [t.data_ptr() for layer in cache.layers for t in layer.storage()]
        return (*cache.ledger.step_buffers, *storage)

    def still_valid(
        self, cache: RollingSlidingWindowCache, input_ids: torch.Tensor, options: dict, compiled: CompiledLayers | None
    ) -> bool:
        return (
            cache.decode_on_device
            and compiled is self.compiled
            and input_ids.shape == self.input_ids.shape
            and input_ids.device == self.input_ids.device
            and options == self.options
            and cache.ledger.step_buffers is not None
            and self._buffers(cache) == self.buffers
            and self.rings_full == _rings_full(cache)  # once every ring is full, a capture without key mask
        )

    def run(self, cache: RollingSlidingWindowCache, kwargs: dict) -> CausalLMOutputWithPast:
        cache.ledger.check_usable()
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
        if position_ids is None:  # as the eager model counts them: columns so far, padding included
            self.position_ids.fill_(cache.get_seq_length())
        else:
            self.position_ids.copy_(position_ids[:, -1:])
        for segment in self.segments:
            for source, copy in segment.handoff:
                copy.copy_(source)  # across devices: ordered after both devices' work so far
            with torch.cuda.device(segment.device):
                segment.graph.replay()
        if self.logits is not self._device_logits:
            self.logits.copy_(self._device_logits)
        cache.ledger.commit_replayed(advance=self.advance_after_replay)
        self.replayed_through = cache.get_seq_length()  # a column count: the next call that finds another is a turn
        self._replays += 1
        if not self.rings_full and self._replays % _REFRESH_EVERY == 0:
            cache.ledger.counters.seen  # noqa: B018 - a small read: the host learns when every ring is full
        return CausalLMOutputWithPast(logits=self.logits, past_key_values=cache)
