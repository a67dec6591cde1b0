"""The "rolling_xformers" attention and mask functions, registered with Transformers' interfaces.

Data flows one way per forward: the mask function records the batch's padding layout and the kind of layer it is
for (`RollingMask`: Transformers makes one per kind, sliding and full); the first layer to attend opens the step in
the cache's ledger, which reads the layout once and plans each kind; every layer then packs its real tokens, writes
its storage and attends, with its kind's plan.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

from ._cudnn import applies as cudnn_applies
from ._cudnn import cudnn_packed
from ._flex import applies as flex_applies
from ._flex import flex_packed
from ._fp8 import Fp8KVLayer
from ._kernels import attend_packed, attend_ring, attend_ring_fp8, fp8_kernel_applies, ring_attention, ring_kernel_applies
from ._layers import StagedKV
from ._plan import DeviceDecodePlan, Phase, StepPlan, build_plan, query_layout
from ._step import clock
from .cache import ATTENTION_NAME, RollingSlidingWindowCache


@dataclass(eq=False)
class RollingMask:
    """What every layer of one kind receives as ``attention_mask`` in one forward: the padding layout, the window
    Transformers built the mask for, and that kind's plan (made once, by the first layer that attends)."""

    batch_size: int
    q_length: int
    window: int | None  # the mask's local_size; None: a full causal mask (a global layer)
    padding_mask: torch.Tensor | None  # Transformers' 2D mask, True for real tokens
    device: torch.device | None = None
    num_layers: int | None = None  # the model's, to check the cache against before anything is written
    max_positions: int | None = None  # the model's max_position_embeddings
    forward: int = field(default_factory=clock.mask_made)  # masks of one forward share this number
    _plan: StepPlan | DeviceDecodePlan | None = field(default=None, repr=False)

    def plan_for(self, cache: RollingSlidingWindowCache | None, layer) -> StepPlan | DeviceDecodePlan:
        if self._plan is None:
            if cache is None:  # no cache: one forward over the whole sequence
                q_seqlens, _ = query_layout(self.padding_mask, self.batch_size, self.q_length)
                capacity = None if self.window is not None else max(q_seqlens)
                self._plan = build_plan(window=self.window, q_length=self.q_length, q_seqlens=q_seqlens,
                                        seen=(0,) * self.batch_size, capacity=capacity)
            else:
                self._plan = cache.ledger.plan(self, layer.window, lambda: layer.capacity)
        return self._plan


def rolling_mask_interface(
    batch_size: int,
    q_length: int,
    kv_length: int | None = None,
    q_offset: int | None = None,
    kv_offset: int | None = None,
    attention_mask: torch.Tensor | None = None,
    config=None,
    **kwargs,
) -> RollingMask:
    """Transformers' mask hook: instead of a dense mask, keep the 2D padding mask for the step plan."""
    _check_mask_function(kwargs.get("mask_function"), kwargs.get("local_size"))
    return RollingMask(
        batch_size=batch_size,
        q_length=q_length,
        window=kwargs.get("local_size"),
        padding_mask=attention_mask,
        device=kwargs.get("device"),
        num_layers=getattr(config, "num_hidden_layers", None),
        max_positions=getattr(config, "max_position_embeddings", None),
    )


def _attends(window: int | None) -> str:
    return "every token (a full causal mask)" if window is None else f"a sliding window of {window}"


def _check_mask_function(mask_function, local_size: int | None) -> None:
    """Accept only Transformers' plain causal and sliding-window masks: an overlay (``or_mask_function`` /
    ``and_mask_function``: bidirectional image tokens, packed sequences from ``position_ids``, block overlays) would
    be dropped by the block-diagonal masks, and the model would attend where Transformers does not."""
    if mask_function is None or (mask_function is causal_mask_function and local_size is None):
        return
    if local_size is not None and _is_sliding_causal(mask_function, local_size):
        return
    raise ValueError(
        "rolling_xformers implements Transformers' causal and sliding-window masks only, but this forward asked for "
        "another mask (an or_mask_function/and_mask_function overlay: bidirectional attention, packed sequences "
        "given by position_ids without an attention_mask, or a block overlay). Pass a 2D attention_mask with one "
        "sequence per row, or use Transformers' own attention for this model."
    )


def _closure(function) -> dict:
    cells = getattr(function, "__closure__", None) or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells)))


def _is_sliding_causal(mask_function, window: int) -> bool:
    """True for exactly ``sliding_window_causal_mask_function(window)``: ``and_masks(overlay(window), causal)``."""
    parts = _closure(mask_function).get("mask_functions")
    if mask_function.__qualname__ != "and_masks.<locals>.and_mask" or not parts or len(parts) != 2:
        return False
    overlay, causal = parts
    return (
        causal is causal_mask_function
        and overlay.__qualname__ == "sliding_window_overlay.<locals>.inner_mask"
        and _closure(overlay).get("sliding_window") == window
    )


# Keyword arguments Transformers' models pass down to the attention that change nothing in what it computes (the
# loss's num_items_in_batch and shift_labels travel with the model's **kwargs).
_INERT_OPTIONS = frozenset({
    "position_ids", "use_cache", "cache_position", "output_router_logits", "output_hidden_states",
    "num_items_in_batch", "shift_labels",
})
_IMPLEMENTED = frozenset({"sliding_window", "is_causal", "output_attentions", "softcap", "s_aux"})


def _check_options(kwargs: dict, window: int | None, mask_window: int | None, layer_idx: int | None) -> None:
    """Refuse every attention option this function does not implement, instead of dropping it, and any layer
    whose window disagrees with the storage the cache keeps for it."""
    where = f"layer {layer_idx}" if layer_idx is not None else "this layer"
    if "sliding_window" in kwargs and kwargs["sliding_window"] != window:
        raise ValueError(
            f"The model's {where} attends over {_attends(kwargs['sliding_window'])}, but the rolling cache keeps "
            f"{_attends(window)} for it. Build the cache from this model's config (after any change to its "
            "sliding_window), or use hf_rolling_cache.enable(model), which does."
        )
    if mask_window != window:
        raise ValueError(
            f"Transformers built the mask of the model's {where} for {_attends(mask_window)}, but the rolling cache "
            f"keeps {_attends(window)} for it: the model does not slide the way the cache does. Build the cache "
            "from this model's config, or use hf_rolling_cache.enable(model)."
        )
    if kwargs.get("is_causal") is False:
        raise ValueError("rolling_xformers is causal attention; this layer asked for non-causal (is_causal=False).")
    if kwargs.get("output_attentions"):
        raise ValueError(
            "rolling_xformers does not return attention weights (it never materializes them): drop "
            "output_attentions=True, or use attn_implementation='eager' for this call."
        )
    unknown = sorted(
        name for name, value in kwargs.items()
        if name not in _INERT_OPTIONS and name not in _IMPLEMENTED and value is not None and value is not False
    )
    if unknown:
        raise ValueError(
            f"rolling_xformers does not implement the attention option(s) {unknown} that this model passes; it "
            "refuses them rather than compute something else. Use Transformers' own attention for this model."
        )


def rolling_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | StagedKV,
    value: torch.Tensor | StagedKV,
    attention_mask: RollingMask | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Rolling-window attention for one layer; shaped like Transformers' ``sdpa_attention_forward``.

    ``query`` is ``[B, H_q, q, D]``; ``key``/``value`` are the `StagedKV` of a `RollingSlidingWindowCache`, or
    plain ``[B, H_kv, q, D]`` tensors when no cache is used. ``softcap`` caps the scores as ``tanh(s / c) * c``
    (Gemma 2); ``s_aux`` holds one attention-sink logit per query head (GPT-OSS): it joins each softmax's
    denominator and attends to nothing. Returns ``[B, q, H_q, D]`` (zeros at padding).
    """
    clock.attending()
    if not isinstance(attention_mask, RollingMask):
        raise ValueError(
            "rolling_xformers attention got a precomputed attention mask; it needs the model's 2D padding mask. "
            "Pass attention_mask as [batch, length] (1 = token, 0 = padding), not a 4D mask."
        )
    if dropout:
        raise ValueError("rolling_xformers is an inference attention: it does not apply dropout (use model.eval()).")
    if isinstance(key, StagedKV):
        cache, layer, layer_idx, new_keys, new_values = key.cache, key.layer, key.layer_idx, key.keys, key.values
        window = layer.window
    else:
        if key.shape[-2] != query.shape[-2]:
            raise ValueError(
                "rolling_xformers attention needs a RollingSlidingWindowCache as past_key_values (it got a cache of "
                f"another kind, holding {key.shape[-2]} keys for {query.shape[-2]} queries). Pass "
                "past_key_values=RollingSlidingWindowCache(config=model.config), or call hf_rolling_cache.enable(model)."
            )
        cache, layer, layer_idx, new_keys, new_values = None, None, None, key, value
        window = attention_mask.window
    _check_options(kwargs, window, attention_mask.window, layer_idx)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    extras = _Extras(softcap, s_aux)
    # kernels and copies on this layer's device, whichever device is current (split models)
    on_device = torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()
    with on_device:
        return _attend(query, attention_mask, cache, layer, layer_idx, new_keys, new_values, scaling, extras)


@dataclass(frozen=True)
class _Extras:
    """What some models add to the scores: a tanh cap, and one sink logit per query head."""

    softcap: float | None
    sinks: torch.Tensor | None  # [H_q]


def _attend(query, attention_mask, cache, layer, layer_idx, new_keys, new_values, scaling, extras):
    plan = attention_mask.plan_for(cache, layer)
    if plan.phase is Phase.DECODE:  # one token per sequence: write it, then attend over its filled slots
        slots, keep = plan.decode_slots(query.device)
        out = None
        if ring_kernel_applies(query, layer, plan, extras.softcap, extras.sinks):  # the write inside the kernel
            out = ring_attention(query, new_keys[:, :, 0], new_values[:, :, 0], layer.slot_keys, layer.slot_values,
                                 slots, keep, plan.kv_seqlens_on(query.device), plan.key_span, scaling)
        if out is None:  # (or Triton could not build the kernels here)
            layer.write_decode(new_keys[:, :, 0], new_values[:, :, 0], slots, keep)
            out = _attend_decode(query, layer, plan, scaling, extras)
        cache.ledger.layer_written(plan, layer_idx)
        return out, None

    if plan.num_queries == 0:  # every column of this chunk is padding (a batch padded to a fixed length): a no-op
        if cache is not None:
            cache.ledger.layer_written(plan, layer_idx)
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], new_values.shape[-1]), None
    indices = plan.indices(query.device)
    packed_query = _pack(query, indices.query_index)  # [T, H_q, D]
    packed_keys = _pack(new_keys, indices.query_index)  # [T, H_kv, D]
    packed_values = _pack(new_values, indices.query_index)
    if plan.phase is Phase.SUBSEQUENT_PREFILL:  # the held tokens (a ring unrotated) ++ the chunk
        keys, values = layer.history_with(packed_keys, packed_values, plan, indices)
    else:  # first chunk: nothing held yet
        keys, values = packed_keys, packed_values
    out = None  # the compiled prefill's kernels first (`_compiled_prefill`), where they run
    if cudnn_applies(packed_query, extras.softcap, extras.sinks):
        out = cudnn_packed(packed_query, keys, values, plan, scaling)
    if out is None and flex_applies(packed_query, extras.softcap, extras.sinks):
        out = flex_packed(packed_query, keys, values, plan, scaling)
    if out is None:
        out = attend_packed(packed_query, keys, values, plan, scaling, extras.softcap, extras.sinks)
    if cache is not None:  # attend, then write
        layer.write(packed_keys, packed_values, indices)
        cache.ledger.layer_written(plan, layer_idx)
    return _unpack(out, indices.query_index, query.shape[0], query.shape[2]), None


def _attend_decode(query, layer, plan, scaling, extras) -> torch.Tensor:
    """One query per sequence over its layer's filled slots: an 8-bit ring read by xFormers' split-K kernel where
    it runs (CUDA, no score cap or sinks), else the slots as the model's dtype (an 8-bit ring dequantized)."""
    if isinstance(layer, Fp8KVLayer) and extras.softcap is None and extras.sinks is None:
        if fp8_kernel_applies(query, plan):
            out = attend_ring_fp8(query, layer.attended_fp8(), plan, scaling)
            if out is not None:
                return out
    keys, values = layer.attended(plan.key_span)
    key_mask = plan.key_bias(query.device, query.dtype)
    return attend_ring(query, keys, values, key_mask, scaling, extras.softcap, extras.sinks)


def _pack(states: torch.Tensor, query_index: torch.Tensor | None) -> torch.Tensor:
    """``[B, H, q, D]`` -> the real tokens as ``[T, H, D]``, sequence after sequence."""
    batch, heads, length, head_dim = states.shape
    flat = states.transpose(1, 2).reshape(batch * length, heads, head_dim)
    return flat if query_index is None else flat.index_select(0, query_index)


def _unpack(packed: torch.Tensor, query_index: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """Packed ``[T, H, D]`` -> ``[B, q, H, D]``, zeros where the batch had padding."""
    if query_index is None:
        return packed.view(batch, length, *packed.shape[1:])
    out = packed.new_zeros(batch * length, *packed.shape[1:])
    out.index_copy_(0, query_index, packed)
    return out.view(batch, length, *packed.shape[1:])


def register() -> None:
    """Register "rolling_xformers" with Transformers' attention and mask interfaces (done on import)."""
    # Under torch.compile (use_cuda_graphs(compile=True), or a user's own) the attention is a graph break: its
    # plan and bookkeeping are Python, and its kernels are already the fused ones.
    AttentionInterface.register(ATTENTION_NAME, torch.compiler.disable(rolling_attention_forward))
    AttentionMaskInterface.register(ATTENTION_NAME, rolling_mask_interface)
