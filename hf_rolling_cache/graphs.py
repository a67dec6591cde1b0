"""CUDA graph decoding: capture one decode step of a rolling cache and replay it for every later token.

A decode step of an eager 7B model spends most of its time in Python (32 layers of modules), not in its kernels.
With the decode plan computed on the device (`DeviceDecodePlan`: counters, slots and key mask are tensors, shapes
are static), the whole step can be captured once per cache and replayed: a step then costs its kernels.

    hf_rolling_cache.use_cuda_graphs(model)
    model.generate(..., past_key_values=RollingSlidingWindowCache(config=model.config))

Only decode-shaped calls (one column, a rolling cache with history, on CUDA) are replayed; everything else runs
the model as before. Padding in a decode step is handled in the graph (a padded row writes nothing).

With ``compile=True`` the captured step runs each decoder layer through ``torch.compile`` (regional compilation:
one compiled code per layer class and kind, shared by its layers, as ``layer_idx`` is a tensor while swapped in),
so Transformers' RMSNorms, rotary, SiLU and residual adds become a few fused kernels, each layer's q/k/v and
gate/up projections are one weight product each (`_fused`), and on CUDA a step of at most 16 rows multiplies by
a Triton kernel of ours rather than cuBLAS (`_narrow_products`). The cache's ``update`` and
the attention function stay eager (they are ``torch.compiler.disable``d, so each is a graph break) and are captured
as they are. Compilation happens once per model and batch size, in the first decode step's warm-up. With
``compile_prefill=True`` prefill on one GPU runs the layers compiled too, for any number of tokens (dynamic shapes,
compiled at the first prefill), its elementwise work fused, its attention by cuDNN's fused kernel where NVIDIA's
cudnn-frontend is installed (`_cudnn`), else by FlexAttention (`_flex`). Every prefill forward on a rolling cache,
compiled or not, computes its last layer's products after the keys and values only for the positions whose logits
are read (`_kept_rows`: generate's prefill reads one).

A model split over GPUs by Accelerate (``device_map``) is captured as one graph per device, its hand-offs (hidden
states, rotary tables, the step's counters) copied between the replays (`_segments.SegmentedCapture`); such a model's
layers are not compiled. Under tensor parallelism (``tp_plan``, one process per GPU) each process captures its
own step, the all-reduces included (so drop the caches before ``destroy_process_group``: destroying a communicator
that a live graph uses waits forever).

A cache whose steps are replayed lets generate check for the end one step late (`_stop_check`): the host queues
the next replay while the GPU runs this one.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import time
import warnings
import weakref

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import _stop_check
from ._all_reduce import one_shot_all_reduces, step_begins
from ._compiled import CompiledLayers, _installed
from ._kept_rows import eager_prefill_swaps, rows_read
from ._segments import NotCapturable, Placement, SegmentedCapture, placement_of, side_stream
from .cache import RollingSlidingWindowCache

_ORIGINAL_FORWARD = "_hf_rolling_cache_eager_forward"
_COMPILED = "_hf_rolling_cache_compiled_layers"
_HAD_FORWARD = "_hf_rolling_cache_instance_forward"  # the instance had its own forward (an Accelerate hook)
_CACHES = "_hf_rolling_cache_replayed_caches"  # the caches it ran on (weakly): release frees their graphs


def use_cuda_graphs(model: torch.nn.Module, *, compile: bool = False, compile_prefill: bool = False) -> None:
    """Replay decode steps of ``model`` with a rolling cache as CUDA graphs (captured once per cache); its prefill
    forwards compute only the rows read of the last layer's products after its keys and values (`_kept_rows`).

    Args:
        model: a causal LM using the "rolling_xformers" attention.
        compile: also compile each decoder layer with ``torch.compile`` before capturing: its elementwise work
            fused, its q/k/v and gate/up products each computed as one (`_fused`), and a batch of up to 16 rows
            multiplied by our product kernel (`_narrow_products`). The first decode step then
            takes a one-off warm-up (seconds for a 7B model; see ``cache.decode_graph_warmup_s``), and later steps
            are faster.
        compile_prefill: with ``compile``, prefill forwards on one GPU (inference, without gradients) run the
            compiled layers as well (their elementwise work fused; their token dimension dynamic) and attend, in
            bf16/fp16, with cuDNN's fused attention where NVIDIA's cudnn-frontend is installed (`_cudnn`: a 32k-token
            prompt's first token about 29% sooner on an H100), else with FlexAttention (`_flex`: about 22%
            sooner), for a compilation at the first prefill (12-17 s for a 7B model; less in a process that finds
            PyTorch's compile caches), again at the first prompt of several 128-token tiles or chunks if the first
            had one, and at each new batch size. Worth it for long prompts, or many.
    """
    if compile_prefill and not compile:
        raise ValueError("use_cuda_graphs(compile_prefill=True) compiles the decoder layers: pass compile=True too.")
    if not torch.cuda.is_available():
        _warn_no_cuda()
    if hasattr(model, _ORIGINAL_FORWARD):
        compiled = getattr(model, _COMPILED)
        if (compiled is not None) == compile and (compiled is None or compiled.prefill == compile_prefill):
            return  # already on, as asked
        release_cuda_graphs(model)  # switch: caches re-capture their graph on their next decode step
    eager_forward = model.forward
    compiled = CompiledLayers(model, prefill=compile_prefill) if compile else None
    _stop_check.install(replays_steps)

    placement = None  # where Accelerate runs the model's parts, read at the first decode step (after any dispatch)
    caches = weakref.WeakSet()

    @functools.wraps(eager_forward)
    def forward(*args, **kwargs):
        nonlocal placement
        cache = kwargs.get("past_key_values")
        if isinstance(cache, RollingSlidingWindowCache):
            if placement is None:
                placement = placement_of(model)
            if placement.offloaded:
                cache.replayed_by = None  # never replayed (see replays_steps)
            elif cache not in caches or cache.replayed_by is None or cache.replayed_by() is not model:
                # once per cache (again after a reset or another model ran on it), not at every step
                cache.replayed_by = weakref.ref(model)
                caches.add(cache)
        if not args and _replayable(placement, cache, kwargs):
            return _decode_graph(model, placement, cache, eager_forward, kwargs, compiled).run(cache, kwargs)
        if compiled is not None and not args and _compiled_prefill(placement, cache, kwargs, compiled):
            with compiled.prefill_swapped_in(rows_read(model, kwargs)):
                return eager_forward(**kwargs)
        with _installed(eager_prefill_swaps(model, args, kwargs)):
            return eager_forward(*args, **kwargs)

    forward.replays_decode_steps = True  # Accelerate dispatching the model later makes this its _old_forward
    setattr(model, _HAD_FORWARD, "forward" in vars(model))
    setattr(model, _ORIGINAL_FORWARD, eager_forward)
    setattr(model, _COMPILED, compiled)
    setattr(model, _CACHES, caches)
    model.forward = forward


def replays_steps(cache: RollingSlidingWindowCache) -> bool:
    """Whether ``cache``'s decode steps are replayed as graphs: the model that last ran on it still has
    `use_cuda_graphs` on, and its step was not found uncapturable (then generate may check for the end a step
    late, `_stop_check`)."""
    model = cache.replayed_by() if cache.replayed_by is not None else None
    return model is not None and hasattr(model, _ORIGINAL_FORWARD) and not isinstance(cache.decode_graph, _EagerSteps)


@functools.cache
def _warn_no_cuda() -> None:
    warnings.warn(
        "use_cuda_graphs: CUDA is not available here, so every decode step runs eagerly (the same tokens, without "
        "graphs).",
        stacklevel=3,
    )


def release_cuda_graphs(model: torch.nn.Module) -> None:
    """Undo `use_cuda_graphs`: the model runs every step eagerly again, and the caches it ran on drop their
    captured graphs (their memory, and the communicators a tensor-parallel step's graph holds)."""
    for cache in list(getattr(model, _CACHES, ())):
        cache.decode_graph = None
    if hasattr(model, _ORIGINAL_FORWARD):
        compiled = getattr(model, _COMPILED)
        if getattr(model, _HAD_FORWARD):
            model.forward = getattr(model, _ORIGINAL_FORWARD)  # the forward it had (an Accelerate hook's)
        else:
            del model.forward  # the instance attribute; the class's forward shows through again
        for name in (_ORIGINAL_FORWARD, _COMPILED, _HAD_FORWARD, _CACHES):
            delattr(model, name)
        if compiled is not None:
            compiled.release()  # after the graphs that read the fused weights are gone, and the model is eager


def _replayable(placement: Placement, cache, kwargs) -> bool:
    input_ids = kwargs.get("input_ids")
    if not isinstance(cache, RollingSlidingWindowCache) or input_ids is None or placement.offloaded:
        return False  # offloaded weights arrive as new tensors each forward: a replay would read freed memory
    devices = {layer.device for layer in cache.layers if layer.is_initialized}
    return (
        input_ids.is_cuda
        and input_ids.shape[1] == 1
        and cache.get_seq_length() > 0
        and (devices == {input_ids.device} or (all(d.type == "cuda" for d in devices) and placement.split))
        and kwargs.get("inputs_embeds") is None
        and not kwargs.get("output_attentions")
        and not kwargs.get("output_hidden_states")
        and all(isinstance(v, (bool, int, float, str, type(None))) for k, v in kwargs.items() if k not in _TENSORS)
        and not torch.cuda.is_current_stream_capturing()
    )


_TENSORS = ("input_ids", "attention_mask", "position_ids", "past_key_values")


def _compiled_prefill(placement: Placement, cache, kwargs, compiled: CompiledLayers) -> bool:
    """A forward of several tokens per sequence on a rolling cache, on one GPU, with ``compile_prefill=True``: its
    layers run compiled (`CompiledLayers.prefill_swapped_in`). Not for a model split over devices, offloaded or
    sharded (tensor parallel), inside someone else's capture, or with gradients on (inference only)."""
    input_ids = kwargs.get("input_ids")
    return (
        compiled.prefill
        and isinstance(cache, RollingSlidingWindowCache)
        and input_ids is not None
        and input_ids.is_cuda
        and input_ids.shape[1] > 1
        and not placement.offloaded
        and not placement.split
        and not compiled.sharded
        and not torch.cuda.is_current_stream_capturing()
        and not torch.is_grad_enabled()
    )


def _decode_graph(
    model, placement, cache: RollingSlidingWindowCache, eager_forward, kwargs, compiled: CompiledLayers | None
) -> _DecodeGraph:
    cache.reserve(cache.get_seq_length() + 1)  # a global layer that grows gets new buffers: captured again below
    graph = cache.decode_graph
    options = {k: v for k, v in kwargs.items() if k not in _TENSORS}
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
            graph = _DecodeGraph(cache, step_forward, kwargs["input_ids"], options, compiled, placed)
            graph.weights = _weight_addresses(model)
        except NotCapturable as reason:
            _warn_eager(str(reason))
            cache.decode_on_device = False  # plain eager steps, with every check of the host plans
            graph = _EagerSteps(eager_forward)
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


class _EagerSteps:
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


class _DecodeGraph:
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
