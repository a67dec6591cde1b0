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
are read (`_kept_rows`: generate's prefill reads one), and generate's prefill chunks stop under the layers whose keys
and values nothing reads (`_reach`).

A model split over GPUs by Accelerate (``device_map``) is captured as one graph per device, its hand-offs (hidden
states, rotary tables, the step's counters) copied between the replays (`_segments.SegmentedCapture`); such a model's
layers are not compiled. Under tensor parallelism (``tp_plan``, one process per GPU) each process captures its
own step, the all-reduces included (so drop the caches before ``destroy_process_group``: destroying a communicator
that a live graph uses waits forever).

A cache whose steps are replayed lets generate check for the end one step late (`_stop_check`): the host queues
the next replay while the GPU runs this one.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch

from . import _reach, _stop_check
from ._compiled import CompiledLayers, _installed
from ._decode_graph import TENSORS, EagerSteps, decode_graph
from ._kept_rows import eager_prefill_swaps, last_decoder_layer, last_row_only
from ._segments import Placement, placement_of
from .cache import RollingSlidingWindowCache

_ORIGINAL_FORWARD = "_hf_rolling_cache_eager_forward"
_COMPILED = "_hf_rolling_cache_compiled_layers"
_HAD_FORWARD = "_hf_rolling_cache_instance_forward"  # the instance had its own forward (an Accelerate hook)
_CACHES = "_hf_rolling_cache_replayed_caches"  # the caches it ran on (weakly): release frees their graphs


def use_cuda_graphs(model: torch.nn.Module, *, compile: bool = False, compile_prefill: bool = False) -> None:
    """Replay decode steps of ``model`` with a rolling cache as CUDA graphs (captured once per cache); its prefill
    forwards compute only the rows read of the last layer's products after its keys and values (`_kept_rows`), and
    generate's prefill chunks run only the layers whose keys and values are read (`_reach`).

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
            return decode_graph(model, placement, cache, eager_forward, kwargs, compiled).run(cache, kwargs)
        if compiled is not None and not args and _compiled_prefill(placement, cache, kwargs, compiled):
            with compiled.prefill_swapped_in(last_row_only(model, kwargs), last_decoder_layer(model)):
                return eager_forward(**kwargs)
        with _installed(eager_prefill_swaps(model, args, kwargs)):
            return eager_forward(*args, **kwargs)

    forward.replays_decode_steps = True  # Accelerate dispatching the model later makes this its _old_forward
    setattr(model, _HAD_FORWARD, "forward" in vars(model))
    setattr(model, _ORIGINAL_FORWARD, eager_forward)
    setattr(model, _COMPILED, compiled)
    setattr(model, _CACHES, caches)
    model.forward = forward
    _reach.watch(model)


def replays_steps(cache: RollingSlidingWindowCache) -> bool:
    """Whether ``cache``'s decode steps are replayed as graphs: the model that last ran on it still has
    `use_cuda_graphs` on, and its step was not found uncapturable (then generate may check for the end a step
    late, `_stop_check`)."""
    model = cache.replayed_by() if cache.replayed_by is not None else None
    return model is not None and hasattr(model, _ORIGINAL_FORWARD) and not isinstance(cache.decode_graph, EagerSteps)


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
        _reach.unwatch(model)
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
        and all(isinstance(v, (bool, int, float, str, type(None))) for k, v in kwargs.items() if k not in TENSORS)
        and not torch.cuda.is_current_stream_capturing()
    )


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
